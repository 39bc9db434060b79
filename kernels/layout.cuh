// The two memory layouts the kernels handle, as policies that own the thread-to-data mapping.
//
// The host collapses x of shape (N, C, *) into one of:
//   LayoutNCS - (N, C, S) with S contiguous: one channel per block (blockIdx.x), the block's
//               threads tile that channel's (N, S) plane; VEC consecutive s per thread access.
//   LayoutNSC - (N*S, C) with C contiguous (channels-last): a block owns blockDim.x*VEC
//               channels (VEC per thread) and its threads walk rows.
// In both, blockIdx.y = g in [0, G) splits the rows/tiles of a channel so that small C still
// fills the GPU (a grid-level reduction: each (g, channel) writes one partial, and a second
// tiny kernel merges the G partials in order).
//
// Each policy provides:
//   channels_per_thread<VEC>()   accumulators a thread keeps (1, or VEC for NSC)
//   slot(k)                      which accumulator element k of a vector feeds
//   thread_channel<VEC>(C, c0)   first channel of this thread, false if it owns none
//   for_each_vector<VEC>(...)    calls f(offset) for every VEC-vector the thread owns
//   channel_constants(C, out, make)  out[k] = make(channel k of the thread), built once a block
//   reduce_block(acc, C, store)  block-wide merge per channel, then store(k, channel, value)
#pragma once
#include "common.cuh"
#include "reduce.cuh"

namespace iabn {

struct LayoutNCS {
  template <int VEC> __device__ static constexpr int channels_per_thread() { return 1; }
  __device__ __forceinline__ static int slot(int) { return 0; }

  template <int VEC>
  __device__ __forceinline__ static bool thread_channel(long long, long long& c0) {
    c0 = blockIdx.x;
    return true;
  }

  // The (N, S/VEC) plane is cut into tiles of blockDim.y rows x `seg` vectors; block g takes
  // tiles g, g + G, ... One division per tile, none per element.
  template <int VEC, class F>
  __device__ __forceinline__ static void for_each_vector(long long N, long long C, long long S,
                                                         long long seg, F&& f) {
    const long long c = blockIdx.x;
    const long long sv = S / VEC;
    const long long tiles_s = (sv + seg - 1) / seg;
    const long long tiles = tiles_s * ((N + blockDim.y - 1) / blockDim.y);
    for (long long t = blockIdx.y; t < tiles; t += gridDim.y) {
      const long long tn = t / tiles_s;
      const long long ts = t - tn * tiles_s;
      const long long n = tn * blockDim.y + threadIdx.y;
      if (n >= N) continue;
      const long long row = (n * C + c) * S;
      const long long end = ts * seg + seg < sv ? ts * seg + seg : sv;
      for (long long j = ts * seg + threadIdx.x; j < end; j += blockDim.x) f(row + j * VEC);
    }
  }

  // Per-channel constants (scale, shift, ...) built once per block by thread 0 and broadcast
  // through shared memory: global loads of parameters/statistics stay O(blocks), not O(threads).
  // Contains a barrier: every thread of the block must call it.
  template <int CH, class Coef, class Make>
  __device__ __forceinline__ static void channel_constants(long long, Coef (&out)[CH], Make&& make) {
    __shared__ Coef shared;
    if (threadIdx.x == 0 && threadIdx.y == 0) shared = make((long long)blockIdx.x);
    __syncthreads();
    out[0] = shared;
  }

  // Whole block -> one value: shuffle tree per warp, then warp 0 folds the per-warp results.
  template <int CH, class R, class Store>
  __device__ __forceinline__ static void reduce_block(const R (&acc)[CH], long long, Store&& store) {
    __shared__ R warp_vals[kBlockThreads / kWarp];
    const int tid = threadIdx.x + threadIdx.y * blockDim.x;
    const int lane = tid % kWarp, warp = tid / kWarp;
    R v = warp_reduce(acc[0]);
    if (lane == 0) warp_vals[warp] = v;
    __syncthreads();
    if (warp == 0) {
      const int nwarps = (blockDim.x * blockDim.y) / kWarp;
      v = lane < nwarps ? warp_vals[lane] : R::identity();
      v = warp_reduce(v);
      if (lane == 0) store(0, (long long)blockIdx.x, v);
    }
  }
};

struct LayoutNSC {
  template <int VEC> __device__ static constexpr int channels_per_thread() { return VEC; }
  __device__ __forceinline__ static int slot(int k) { return k; }

  // Requires VEC to divide C (the host checks), so a thread's channels are all valid or none.
  template <int VEC>
  __device__ __forceinline__ static bool thread_channel(long long C, long long& c0) {
    c0 = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * VEC;
    return c0 < C;
  }

  // Rows r = y + blockDim.y * (g + G * k): a grid-stride walk over the N*S rows.
  template <int VEC, class F>
  __device__ __forceinline__ static void for_each_vector(long long N, long long C, long long S,
                                                         long long, F&& f) {
    long long c0;
    if (!thread_channel<VEC>(C, c0)) return;
    const long long rows = N * S;
    const long long stride = (long long)gridDim.y * blockDim.y;
    for (long long r = (long long)blockIdx.y * blockDim.y + threadIdx.y; r < rows; r += stride)
      f(r * C + c0);
  }

  // Row 0 builds the constants of the block's blockDim.x * CH channels; everyone reads them
  // back from shared memory. Contains a barrier: every thread of the block must call it.
  template <int CH, class Coef, class Make>
  __device__ __forceinline__ static void channel_constants(long long C, Coef (&out)[CH], Make&& make) {
    __shared__ Coef shared[kBlockThreads];  // blockDim.x <= 32 and CH <= 8 (16-byte vectors)
    long long c0;
    const bool owns = thread_channel<CH>(C, c0);
    if (threadIdx.y == 0 && owns)
      for (int k = 0; k < CH; ++k) shared[threadIdx.x * CH + k] = make(c0 + k);
    __syncthreads();
    if (owns)
      for (int k = 0; k < CH; ++k) out[k] = shared[threadIdx.x * CH + k];
  }

  // Per channel over threadIdx.y: a shared-memory tree (blockDim.y is a power of two), then
  // row 0 stores. The tree order depends only on thread indices, so it is deterministic.
  template <int CH, class R, class Store>
  __device__ __forceinline__ static void reduce_block(const R (&acc)[CH], long long C, Store&& store) {
    __shared__ R buf[kBlockThreads * CH];
    const int x = threadIdx.x, y = threadIdx.y, bx = blockDim.x;
    for (int k = 0; k < CH; ++k) buf[(y * bx + x) * CH + k] = acc[k];
    __syncthreads();
    for (int half = blockDim.y / 2; half > 0; half /= 2) {
      if (y < half)
        for (int k = 0; k < CH; ++k)
          buf[(y * bx + x) * CH + k] =
              R::combine(buf[(y * bx + x) * CH + k], buf[((y + half) * bx + x) * CH + k]);
      __syncthreads();
    }
    long long c0;
    if (y == 0 && thread_channel<CH>(C, c0))
      for (int k = 0; k < CH; ++k) store(k, c0 + k, buf[x * CH + k]);
  }
};

}  // namespace iabn

// Per-channel finalize of the batch statistics, shared by iabn_stats_finalize (its own
// launch) and iabn_forward (each block forms its channels' constants from the block partials
// itself, so a training forward is two launches). Where both may run (few rows) they merge in
// one order with one function: the same bits.
#pragma once
#include "common.cuh"
#include "reduce.cuh"

namespace iabn {
enum FinalizeMode { kMergeOnly = 0, kTrain = 1, kEval = 2 };

// Rows (block partials or replicas) merged serially by one thread; more rows than this are
// merged by the standalone finalize kernels with kFinalizeSplits threads per channel. The
// host fuses the merge into iabn_forward / iabn_backward_elementwise (every block merging for
// itself) only when a thread's serial work there stays within kSerialRows merges
// (iabn_core/plan.py SERIAL_MERGE_ROWS): at small C the block partials number ~1000, and
// every block re-merging all of them made the fused kernels latency-bound and quadratic in
// the partials (the first H200 run: ~8 ms for a 32x64x56x56 channels-last layer).
constexpr long long kSerialRows = 64;
constexpr int kFinalizeChannels = 8;  // block of the standalone finalize kernels: 8 x 32
constexpr int kFinalizeSplits = 32;

template <class Acc> struct ChannelStats { Acc n, mean, var; };

// Channel c's merged row r of partials (R, 3, C) as a Welford state.
template <class Acc>
__device__ __forceinline__ Welford<Acc> partial_row(const Acc* partials, long long C, long long r, long long c) {
  const Acc* row = partials + r * 3 * C;
  const Acc n = load(row + c);
  return Welford<Acc>{n, load(row + C + c), load(row + 2 * C + c) * n};
}

// Rows 0..R-1 folded in index order by one thread.
template <class R, class RowOf>
__device__ __forceinline__ R merge_serial(long long rows, RowOf&& row_of) {
  R v = R::identity();
  for (long long r = 0; r < rows; ++r) v = R::combine(v, row_of(r));
  return v;
}

// The standalone finalize kernels' merge (blocks of kFinalizeChannels x kFinalizeSplits
// threads, one channel per threadIdx.x): up to kSerialRows rows serially by threadIdx.y == 0,
// the same bits as the fused kernels' merge_serial; more rows split over threadIdx.y (rows
// y, y + 32, ...) and then folded by a shared-memory tree. Either order is fixed by indices
// alone. The result is meant for threadIdx.y == 0. Contains a barrier: every thread calls it.
template <class R, class RowOf>
__device__ __forceinline__ R merge_rows(long long rows, bool active, RowOf&& row_of) {
  if (rows <= kSerialRows)  // uniform over the grid
    return active && threadIdx.y == 0 ? merge_serial<R>(rows, row_of) : R::identity();
  __shared__ R buf[kFinalizeSplits][kFinalizeChannels];
  const int x = threadIdx.x, y = threadIdx.y;
  R v = R::identity();
  if (active)
    for (long long r = y; r < rows; r += kFinalizeSplits) v = R::combine(v, row_of(r));
  buf[y][x] = v;
  __syncthreads();
  for (int half = kFinalizeSplits / 2; half > 0; half /= 2) {
    if (y < half) buf[y][x] = R::combine(buf[y][x], buf[y + half][x]);
    __syncthreads();
  }
  return buf[0][x];
}

// (count, mean, biased var) of merged Welford state, or of the running statistics (eval).
template <class Acc, class P>
__device__ __forceinline__ ChannelStats<Acc> finish_stats(Welford<Acc> w, long long c, const P* eval_mean,
                                                          const P* eval_var, Acc eval_count, int mode) {
  Acc var;
  if (mode == kEval) {
    w.n = eval_count;
    w.mean = to_acc<Acc>(load(eval_mean + c));
    var = to_acc<Acc>(load(eval_var + c));
  } else {
    var = w.n > Acc(0) ? w.m2 / w.n : Acc(0);
    // One rule for non-finite batches: a NaN or Inf anywhere in a channel (or statistics past the
    // accumulator's range) makes its mean and variance NaN. Welford alone gives Inf or NaN
    // depending on where the value sat and how the batch was split over blocks.
    if (!(isfinite(w.mean) && isfinite(var))) w.mean = var = acc_nan(var);
  }
  return ChannelStats<Acc>{w.n, w.mean, var};
}

// Channel c's statistics as the fused forward forms them: rows merged serially (train, merge)
// or the running statistics (eval).
template <class Acc, class P>
__device__ __forceinline__ ChannelStats<Acc> channel_stats(const Acc* partials, long long R, long long C,
                                                           long long c, const P* eval_mean,
                                                           const P* eval_var, Acc eval_count, int mode) {
  Welford<Acc> w = Welford<Acc>::identity();
  if (mode != kEval)
    w = merge_serial<Welford<Acc>>(R, [&](long long r) { return partial_row(partials, C, r, c); });
  return finish_stats<Acc>(w, c, eval_mean, eval_var, eval_count, mode);
}

// Stores channel c's rows of `out` (count, mean, var, and in train/eval modes the inverse std
// 1/sqrt(var + eps), returned) and, in training, its running-statistics update.
template <class Acc, class P>
__device__ __forceinline__ Acc store_channel_stats(const ChannelStats<Acc>& s, Acc* out, long long C,
                                                   long long c, P* running_mean, P* running_var,
                                                   Acc momentum, Acc eps, int mode) {
  store(out + c, s.n);
  store(out + C + c, s.mean);
  store(out + 2 * C + c, s.var);
  if (mode == kMergeOnly) return Acc(0);
  const Acc invstd = acc_rsqrt(s.var + eps);
  store(out + 3 * C + c, invstd);
  if (mode == kTrain && running_mean != nullptr) {
    // Running variance tracks the unbiased estimate; the host guarantees count > 1.
    const Acc unbiased = s.var * s.n / (s.n - Acc(1));
    const Acc keep = Acc(1) - momentum;
    store(running_mean + c, Cast<P>::from(keep * to_acc<Acc>(load(running_mean + c)) + momentum * s.mean));
    store(running_var + c, Cast<P>::from(keep * to_acc<Acc>(load(running_var + c)) + momentum * unbiased));
  }
  return invstd;
}

}  // namespace iabn

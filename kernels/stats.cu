// Batch statistics: per-(block, channel) Welford partials, then an ordered merge per channel.
//
//   iabn_batch_stats    x -> partials (G, 3, C): count, mean, biased var of each block's share
//   iabn_stats_finalize partials (R, 3, C) -> merged (3, C), or stats (4, C) with inverse std
//                       and the running-statistics update; eval mode reads the running stats.
// The same finalize merges the G block partials of one device and, for synchronized BN, the
// R replicas' (count, mean, var) rows, so both merges follow one formula and one order.
#include "common.cuh"
#include "layout.cuh"
#include "reduce.cuh"

namespace iabn {
enum FinalizeMode { kMergeOnly = 0, kTrain = 1, kEval = 2 };
}

template <class T, class Layout, int VEC>
__global__ void __launch_bounds__(iabn::kBlockThreads)
iabn_batch_stats(const T* __restrict__ x, iabn::acc_t<T>* __restrict__ partials, long long N,
                 long long C, long long S, long long seg) {
  using namespace iabn;
  typedef acc_t<T> Acc;
  constexpr int CH = Layout::template channels_per_thread<VEC>();
  Welford<Acc> acc[CH];
  for (int k = 0; k < CH; ++k) acc[k] = Welford<Acc>::identity();

  // A division per value would make this kernel compute-bound for 16-bit inputs on fast
  // memory, so values are folded with one division per vector: a vector of one channel is
  // merged as a group (Chan), and a vector across CH channels shares one 1/n.
  Layout::template for_each_vector<VEC>(N, C, S, seg, [&](long long off) {
    const Vec<T, VEC> v = load_vec<VEC>(x + off);
    Acc a[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) a[k] = to_acc<Acc>(v.v[k]);
    if constexpr (CH == 1) {
      acc[0] = Welford<Acc>::combine(acc[0], Welford<Acc>::of_group(a));
    } else {
      const Acc n = acc[0].n + Acc(1);
      const Acc inv_n = Acc(1) / n;
#pragma unroll
      for (int k = 0; k < VEC; ++k) acc[k].push_counted(a[k], n, inv_n);
    }
  });

  Acc* out = partials + (long long)blockIdx.y * 3 * C;
  Layout::reduce_block(acc, C, [&](int, long long c, const Welford<Acc>& w) {
    store(out + c, w.n);
    store(out + C + c, w.mean);
    store(out + 2 * C + c, w.n > Acc(0) ? w.m2 / w.n : Acc(0));
  });
}

// One thread per channel. R is small (blocks per channel, or replicas), so a serial merge in
// index order costs little and makes the result independent of how the rows were produced.
// Eval mode reads the running statistics through eval_mean/eval_var (const: they may be
// read-only memory) and training updates running_mean/running_var; the other pair is null.
template <class Acc, class P>
__global__ void __launch_bounds__(iabn::kBlockThreads)
iabn_stats_finalize(const Acc* __restrict__ partials, long long R, long long C, Acc* __restrict__ out,
                    const P* __restrict__ eval_mean, const P* __restrict__ eval_var,
                    P* __restrict__ running_mean, P* __restrict__ running_var, Acc momentum, Acc eps,
                    Acc eval_count, int mode) {
  using namespace iabn;
  const long long c = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;

  Welford<Acc> w = Welford<Acc>::identity();
  Acc var;
  if (mode == kEval) {
    w.n = eval_count;
    w.mean = to_acc<Acc>(load(eval_mean + c));
    var = to_acc<Acc>(load(eval_var + c));
  } else {
    for (long long r = 0; r < R; ++r) {
      const Acc* row = partials + r * 3 * C;
      const Acc n = load(row + c);
      w = Welford<Acc>::combine(w, Welford<Acc>{n, load(row + C + c), load(row + 2 * C + c) * n});
    }
    var = w.n > Acc(0) ? w.m2 / w.n : Acc(0);
    // One rule for non-finite batches: a NaN or Inf anywhere in a channel (or statistics past the
    // accumulator's range) makes its mean and variance NaN. Welford alone gives Inf or NaN
    // depending on where the value sat and how the batch was split over blocks.
    if (!(isfinite(w.mean) && isfinite(var))) w.mean = var = acc_nan(var);
  }

  store(out + c, w.n);
  store(out + C + c, w.mean);
  store(out + 2 * C + c, var);
  if (mode == kMergeOnly) return;
  store(out + 3 * C + c, acc_rsqrt(var + eps));

  if (mode == kTrain && running_mean != nullptr) {
    // Running variance tracks the unbiased estimate; the host guarantees count > 1.
    const Acc unbiased = var * w.n / (w.n - Acc(1));
    const Acc keep = Acc(1) - momentum;
    store(running_mean + c, Cast<P>::from(keep * to_acc<Acc>(load(running_mean + c)) + momentum * w.mean));
    store(running_var + c, Cast<P>::from(keep * to_acc<Acc>(load(running_var + c)) + momentum * unbiased));
  }
}

// Per-channel finalize of the batch statistics, shared by iabn_stats_finalize (one thread per
// channel, its own launch) and iabn_forward (each block forms its channels' constants from the
// block partials itself, so a training forward is two launches). One function, one order of
// operations: both give the same bits.
#pragma once
#include "common.cuh"
#include "reduce.cuh"

namespace iabn {
enum FinalizeMode { kMergeOnly = 0, kTrain = 1, kEval = 2 };

template <class Acc> struct ChannelStats { Acc n, mean, var; };

// Channel c's (count, mean, biased var): rows r = 0..R-1 of partials (R, 3, C) merged in index
// order (train, merge), or the running statistics read through eval_mean/eval_var (eval). R is
// small (blocks per channel, or replicas), so a serial merge costs little and makes the result
// independent of how the rows were produced.
template <class Acc, class P>
__device__ __forceinline__ ChannelStats<Acc> channel_stats(const Acc* partials, long long R, long long C,
                                                           long long c, const P* eval_mean,
                                                           const P* eval_var, Acc eval_count, int mode) {
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
  return ChannelStats<Acc>{w.n, w.mean, var};
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

// Per-channel accumulators and their deterministic warp-level reductions.
//
// Determinism: every reduction below combines values in an order fixed by thread and block
// indices only (shuffle trees, shared-memory trees, serial merges over blocks), never with
// floating-point atomics, so two runs on the same device give bitwise identical results.
#pragma once
#include "common.cuh"

namespace iabn {

// Running (count, mean, M2) in the style of Welford (1962); merged with the parallel formula of
// Chan, Golub & LeVeque (1979). Avoids the cancellation of sum(x^2) - sum(x)^2, which loses all
// digits in float when |mean| >> std.
template <class Acc> struct Welford {
  Acc n, mean, m2;

  __device__ __forceinline__ static Welford identity() { return Welford{Acc(0), Acc(0), Acc(0)}; }

  // Adds one value when the caller already knows the new count n and 1/n: channels-last threads
  // feed CH accumulators that always hold the same count, so one reciprocal serves them all.
  __device__ __forceinline__ void push_counted(Acc x, Acc new_n, Acc inv_n) {
    n = new_n;
    const Acc d = x - mean;
    mean += d * inv_n;
    m2 += d * (x - mean);
  }

  // Statistics of a small group of values (a loaded vector), exact two-pass: no division.
  template <int K> __device__ __forceinline__ static Welford of_group(const Acc (&v)[K]) {
    Acc s = Acc(0);
    for (int k = 0; k < K; ++k) s += v[k];
    const Acc m = s * (Acc(1) / Acc(K));
    Acc q = Acc(0);
    for (int k = 0; k < K; ++k) q += (v[k] - m) * (v[k] - m);
    return Welford{Acc(K), m, q};
  }

  // Chan's merge; an empty side leaves the other unchanged (no 0/0).
  __device__ __forceinline__ static Welford combine(const Welford& a, const Welford& b) {
    const Acc n = a.n + b.n;
    if (b.n == Acc(0)) return a;
    if (a.n == Acc(0)) return b;
    const Acc d = b.mean - a.mean;
    const Acc fb = b.n / n;
    return Welford{n, a.mean + d * fb, a.m2 + b.m2 + d * d * a.n * fb};
  }

  __device__ __forceinline__ Welford shfl_down(int delta) const {
    return Welford{__shfl_down_sync(0xffffffffu, n, delta), __shfl_down_sync(0xffffffffu, mean, delta),
                   __shfl_down_sync(0xffffffffu, m2, delta)};
  }
};

// Plain sums of (dy, dy * xhat) for the backward reduction.
template <class Acc> struct SumPair {
  Acc dy, dy_xhat;

  __device__ __forceinline__ static SumPair identity() { return SumPair{Acc(0), Acc(0)}; }

  __device__ __forceinline__ static SumPair combine(const SumPair& a, const SumPair& b) {
    return SumPair{a.dy + b.dy, a.dy_xhat + b.dy_xhat};
  }

  __device__ __forceinline__ SumPair shfl_down(int delta) const {
    return SumPair{__shfl_down_sync(0xffffffffu, dy, delta),
                   __shfl_down_sync(0xffffffffu, dy_xhat, delta)};
  }
};

// Tree over the 32 lanes with shfl_down: at each step lane i folds in lane i + delta, so lane 0
// ends with all 32 values (lanes whose partner is out of range get garbage that nobody reads).
// All 32 lanes must be present: blocks are always a multiple of 32 threads.
template <class R> __device__ __forceinline__ R warp_reduce(R v) {
  for (int delta = kWarp / 2; delta > 0; delta >>= 1) v = R::combine(v, v.shfl_down(delta));
  return v;
}

}  // namespace iabn

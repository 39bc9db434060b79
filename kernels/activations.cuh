// Invertible activations as compile-time policies: forward, inverse and derivative side by side.
//
// Backward never sees the activation's input y, only its output z, so each policy expresses
// y = inverse(z) and dz/dy = derivative(z) as functions of z. Both are exact inverses for
// y >= 0 <=> z >= 0, which holds for every policy here (they are monotone with act(0) = 0).
#pragma once
#include "common.cuh"

namespace iabn {

struct Identity {
  template <class A> __device__ __forceinline__ static A forward(A y, A) { return y; }
  template <class A> __device__ __forceinline__ static A inverse(A z, A) { return z; }
  template <class A> __device__ __forceinline__ static A derivative(A, A) { return A(1); }
};

// z = y for y >= 0, slope * y otherwise; slope > 0 keeps it invertible.
struct LeakyRelu {
  template <class A> __device__ __forceinline__ static A forward(A y, A slope) {
    return y >= A(0) ? y : y * slope;
  }
  template <class A> __device__ __forceinline__ static A inverse(A z, A slope) {
    return z >= A(0) ? z : z * (A(1) / slope);  // 1/slope is loop-invariant: hoisted
  }
  template <class A> __device__ __forceinline__ static A derivative(A z, A slope) {
    return z >= A(0) ? A(1) : slope;
  }
};

// z / alpha is clamped to -1 + 2^-24 before log1p, so the inverse of any finite z stays finite
// (y >= log(2^-24) ~ -16.6). Rounding can push a stored z to or below -alpha (e.g. for y << 0 in
// fp16); the official package's inverse returned NaN/-Inf there (its issue #70). One floor for
// every accumulator type (exact in float) keeps float and double kernels and the reference equal.
template <class A> __device__ __forceinline__ A elu_floor() { return A(-1) + A(5.9604644775390625e-08); }

// z = y for y >= 0, alpha * (exp(y) - 1) otherwise; dz/dy = alpha * exp(y) = z + alpha.
struct Elu {
  template <class A> __device__ __forceinline__ static A forward(A y, A alpha) {
    return y >= A(0) ? y : alpha * acc_expm1(y);
  }
  template <class A> __device__ __forceinline__ static A inverse(A z, A alpha) {
    return z >= A(0) ? z : acc_log1p(acc_max(z * (A(1) / alpha), elu_floor<A>()));
  }
  template <class A> __device__ __forceinline__ static A derivative(A z, A alpha) {
    // Clamped at 0: a z rounded below -alpha must not flip the gradient's sign.
    return z >= A(0) ? A(1) : acc_max(z + alpha, A(0));
  }
};

}  // namespace iabn

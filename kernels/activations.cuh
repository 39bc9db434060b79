// Invertible activations as compile-time policies: forward, inverse and derivative side by side.
//
// Backward never sees the activation's input y, only its output z, so each policy expresses
// y = inverse(z) and dz/dy = derivative(z) as functions of z. Backward must take the branch
// forward took, so both sides branch on `positive_side`, i.e. on the sign bit, and every policy
// keeps the sign bit of y in z (z = y, slope * y, or alpha * expm1(y)).
#pragma once
#include "common.cuh"

namespace iabn {

// The branch of every activation: v >= 0 with the sign bit clear. -0 is on the negative side:
// forward produces it from y < 0 whenever slope * y or alpha * expm1(y) underflows (fp16 outputs,
// tiny slopes, flush-to-zero on the GPU), and `z >= 0` would then invert it with the wrong
// branch. A NaN is on the negative side whatever its sign bit, which IEEE arithmetic leaves
// unspecified (x86 and GPUs produce NaNs of different signs), so CPU and GPU take one branch.
template <class A> __device__ __forceinline__ bool positive_side(A v) {
  return v >= A(0) && !signbit(v);
}

struct Identity {
  template <class A> __device__ __forceinline__ static A forward(A y, A) { return y; }
  template <class A> __device__ __forceinline__ static A inverse(A z, A) { return z; }
  template <class A> __device__ __forceinline__ static A derivative(A, A) { return A(1); }
};

// z = y for y >= 0, slope * y otherwise; slope > 0 keeps it invertible.
struct LeakyRelu {
  template <class A> __device__ __forceinline__ static A forward(A y, A slope) {
    return positive_side(y) ? y : y * slope;
  }
  template <class A> __device__ __forceinline__ static A inverse(A z, A slope) {
    return positive_side(z) ? z : z * (A(1) / slope);  // 1/slope is loop-invariant: hoisted
  }
  template <class A> __device__ __forceinline__ static A derivative(A z, A slope) {
    return positive_side(z) ? A(1) : slope;
  }
};

// z / alpha is clamped to -1 + 2^-24 before log1p, so the inverse of any finite z stays finite
// (y >= log(2^-24) ~ -16.6). Rounding can push a stored z to or below -alpha (e.g. for y << 0 in
// fp16); the official package's inverse returned NaN/-Inf there (its issue #70). One floor for
// every accumulator type (exact in float) keeps float and double kernels and the reference equal.
template <class A> __device__ __forceinline__ A elu_floor() { return A(-1) + A(5.9604644775390625e-08); }

// max(v, lo) that keeps a NaN v (fmax would drop it and turn a NaN output into a finite input
// and gradient): NaN in, NaN out, as in the NumPy backend and the reference.
template <class A> __device__ __forceinline__ A at_least(A v, A lo) { return v < lo ? lo : v; }

// z = y for y >= 0, alpha * (exp(y) - 1) otherwise; dz/dy = alpha * exp(y) = z + alpha.
struct Elu {
  template <class A> __device__ __forceinline__ static A forward(A y, A alpha) {
    return positive_side(y) ? y : alpha * acc_expm1(y);
  }
  template <class A> __device__ __forceinline__ static A inverse(A z, A alpha) {
    return positive_side(z) ? z : acc_log1p(at_least(z * (A(1) / alpha), elu_floor<A>()));
  }
  template <class A> __device__ __forceinline__ static A derivative(A z, A alpha) {
    // Clamped at 0: a z rounded below -alpha must not flip the gradient's sign.
    return positive_side(z) ? A(1) : at_least(z + alpha, A(0));
  }
};

}  // namespace iabn

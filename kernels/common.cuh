// Shared building blocks of every iabn kernel: type roles, conversions, vector memory access.
//
// Type roles used in every template (as in PyTorch's normalization kernels):
//   T   - input/output element type (float, double, __half, __nv_bfloat16)
//   P   - parameter and running-statistics type (float, or T; double with double)
//   Acc - accumulator type, acc_t<T>: float for 16/32-bit inputs, double for double
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>

// Global-memory traffic hooks. Every load/store of global memory in the kernels goes through
// the helpers below, which report their byte counts here. On the GPU these compile to nothing;
// the CPU emulator defines them to count bytes per launch so tests can assert traffic budgets.
#ifndef IABN_COUNT_LOAD
#define IABN_COUNT_LOAD(nbytes) ((void)0)
#endif
#ifndef IABN_COUNT_STORE
#define IABN_COUNT_STORE(nbytes) ((void)0)
#endif
// Alignment check of vector accesses: free on the GPU (where a misaligned one faults anyway),
// an error naming the kernel line in the emulator (where it would silently work).
#ifndef IABN_CHECK_ALIGNED
#define IABN_CHECK_ALIGNED(ptr, nbytes) ((void)0)
#endif

namespace iabn {

// Every elementwise/reduction kernel runs 256-thread blocks; launch plans rely on it.
constexpr int kBlockThreads = 256;
constexpr int kWarp = 32;

template <class T> struct AccOf { typedef float type; };
template <> struct AccOf<double> { typedef double type; };
template <class T> using acc_t = typename AccOf<T>::type;

// ---- conversions to and from the accumulator --------------------------------------------
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ double to_float(double v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class Acc, class T> __device__ __forceinline__ Acc to_acc(T v) {
  return static_cast<Acc>(to_float(v));
}

template <class T> struct Cast {
  template <class A> __device__ __forceinline__ static T from(A v) { return static_cast<T>(v); }
};
template <> struct Cast<__half> {
  template <class A> __device__ __forceinline__ static __half from(A v) {
    return __float2half_rn(static_cast<float>(v));
  }
};
template <> struct Cast<__nv_bfloat16> {
  template <class A> __device__ __forceinline__ static __nv_bfloat16 from(A v) {
    return __float2bfloat16_rn(static_cast<float>(v));
  }
};

// ---- accumulator math (overloads so templated code picks float or double intrinsics) -----
__device__ __forceinline__ float acc_rsqrt(float v) { return rsqrtf(v); }
__device__ __forceinline__ double acc_rsqrt(double v) { return rsqrt(v); }
__device__ __forceinline__ float acc_abs(float v) { return fabsf(v); }
__device__ __forceinline__ double acc_abs(double v) { return fabs(v); }
__device__ __forceinline__ float acc_expm1(float v) { return expm1f(v); }
__device__ __forceinline__ double acc_expm1(double v) { return expm1(v); }
__device__ __forceinline__ float acc_log1p(float v) { return log1pf(v); }
__device__ __forceinline__ double acc_log1p(double v) { return log1p(v); }
// A quiet NaN with the sign bit clear (the one NumPy's np.nan is), of the argument's type.
__device__ __forceinline__ float acc_nan(float) { return __int_as_float(0x7fc00000); }
__device__ __forceinline__ double acc_nan(double) { return __longlong_as_double(0x7ff8000000000000LL); }

// d|w|/dw as the official package takes it: -1 where w < 0, else +1 (w = 0 and -0 included).
// Not sign(w): with sign(0) = 0 a weight at exactly 0 would get no gradient and never train,
// and zero-initialised norms (timm's zero_init_last) are common. NaN gives +1 (NaN * sum).
template <class Acc> __device__ __forceinline__ Acc abs_slope(Acc v) {
  return v < Acc(0) ? Acc(-1) : Acc(1);
}

// ---- global memory access ------------------------------------------------------------------
// VEC consecutive elements moved as one 16-byte (or narrower) transaction. The host only
// picks VEC > 1 when every vector start is aligned to sizeof(Vec).
template <class T, int VEC> struct alignas(sizeof(T) * VEC) Vec { T v[VEC]; };

template <int VEC, class T> __device__ __forceinline__ Vec<T, VEC> load_vec(const T* p) {
  IABN_CHECK_ALIGNED(p, sizeof(Vec<T, VEC>));
  IABN_COUNT_LOAD(sizeof(T) * VEC);
  return *reinterpret_cast<const Vec<T, VEC>*>(p);
}

template <int VEC, class T> __device__ __forceinline__ void store_vec(T* p, const Vec<T, VEC>& v) {
  IABN_CHECK_ALIGNED(p, sizeof(Vec<T, VEC>));
  IABN_COUNT_STORE(sizeof(T) * VEC);
  *reinterpret_cast<Vec<T, VEC>*>(p) = v;
}

template <class T> __device__ __forceinline__ T load(const T* p) {
  IABN_COUNT_LOAD(sizeof(T));
  return *p;
}

template <class T> __device__ __forceinline__ void store(T* p, T v) {
  IABN_COUNT_STORE(sizeof(T));
  *p = v;
}

// Optional parameter arrays (weight, bias) may be null pointers.
template <class Acc, class P> __device__ __forceinline__ Acc load_or(const P* p, long long i, Acc fallback) {
  return p ? to_acc<Acc>(load(p + i)) : fallback;
}

}  // namespace iabn

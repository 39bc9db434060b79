// emu_math.h -- CUDA device math / bit intrinsics that have no standard C++
// spelling.  Included by emu_cuda.h only.  <math.h> already supplies sqrtf,
// expf, expm1f, logf, log1pf, fabsf, fmaxf, fminf, copysignf, fmaf, their
// double versions and the isnan/isinf/isfinite/signbit overloads (the kernels
// branch activations on signbit, so -0 behaves as on the GPU).
#pragma once

// glibc declares (but does not export) __expf/__logf/__powf, so they cannot
// be redefined as functions; macros defined after <math.h> sidestep that.
#define __expf(x) expf(x)
#define __logf(x) logf(x)
#define __powf(a, b) powf(a, b)
static inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
static inline double rsqrt(double x) { return 1.0 / sqrt(x); }
static inline float __fdividef(float a, float b) { return a / b; }
static inline float __frcp_rn(float x) { return 1.0f / x; }
static inline float __fsqrt_rn(float x) { return sqrtf(x); }
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
static inline float __saturatef(float x) { return x != x ? 0.0f : fminf(fmaxf(x, 0.0f), 1.0f); }

// CUDA provides global min/max overloads for integers (and floats); the
// mixed signed/unsigned ones return unsigned, as in CUDA's headers.
#define IABN_EMU_MINMAX(T)                                         \
  static inline T min(T a, T b) { return a < b ? a : b; }          \
  static inline T max(T a, T b) { return a > b ? a : b; }
IABN_EMU_MINMAX(int)
IABN_EMU_MINMAX(unsigned int)
IABN_EMU_MINMAX(long)
IABN_EMU_MINMAX(unsigned long)
IABN_EMU_MINMAX(long long)
IABN_EMU_MINMAX(unsigned long long)
#undef IABN_EMU_MINMAX
static inline float min(float a, float b) { return fminf(a, b); }
static inline float max(float a, float b) { return fmaxf(a, b); }
static inline double min(double a, double b) { return fmin(a, b); }
static inline double max(double a, double b) { return fmax(a, b); }
static inline unsigned int min(int a, unsigned int b) { return min((unsigned int)a, b); }
static inline unsigned int min(unsigned int a, int b) { return min(a, (unsigned int)b); }
static inline unsigned int max(int a, unsigned int b) { return max((unsigned int)a, b); }
static inline unsigned int max(unsigned int a, int b) { return max(a, (unsigned int)b); }
static inline unsigned long long min(long long a, unsigned long long b) { return min((unsigned long long)a, b); }
static inline unsigned long long min(unsigned long long a, long long b) { return min(a, (unsigned long long)b); }
static inline unsigned long long max(long long a, unsigned long long b) { return max((unsigned long long)a, b); }
static inline unsigned long long max(unsigned long long a, long long b) { return max(a, (unsigned long long)b); }

static inline int __float_as_int(float f) { int i; memcpy(&i, &f, 4); return i; }
static inline unsigned int __float_as_uint(float f) { unsigned int i; memcpy(&i, &f, 4); return i; }
static inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
static inline float __uint_as_float(unsigned int i) { float f; memcpy(&f, &i, 4); return f; }
static inline long long __double_as_longlong(double d) { long long i; memcpy(&i, &d, 8); return i; }
static inline double __longlong_as_double(long long i) { double d; memcpy(&d, &i, 8); return d; }
static inline int __popc(unsigned int x) { return __builtin_popcount(x); }
static inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
static inline int __ffs(int x) { return __builtin_ffs(x); }
static inline int __clz(int x) { return x ? __builtin_clz((unsigned)x) : 32; }
template <class T> static inline T __ldg(const T* p) { return *p; }

// Atomics: all threads of a launch run on one OS thread and only switch at
// barriers/collectives, so a plain read-modify-write is atomic here.
#define IABN_EMU_ATOMIC(T)                                                     \
  static inline T atomicAdd(T* p, T v) { T o = *p; *p = o + v; return o; }     \
  static inline T atomicExch(T* p, T v) { T o = *p; *p = v; return o; }
IABN_EMU_ATOMIC(int)
IABN_EMU_ATOMIC(unsigned int)
IABN_EMU_ATOMIC(unsigned long long)
IABN_EMU_ATOMIC(float)
IABN_EMU_ATOMIC(double)
#undef IABN_EMU_ATOMIC
#define IABN_EMU_ATOMIC_INT(T)                                                          \
  static inline T atomicSub(T* p, T v) { T o = *p; *p = o - v; return o; }              \
  static inline T atomicMax(T* p, T v) { T o = *p; *p = o > v ? o : v; return o; }      \
  static inline T atomicMin(T* p, T v) { T o = *p; *p = o < v ? o : v; return o; }      \
  static inline T atomicCAS(T* p, T c, T v) { T o = *p; if (o == c) *p = v; return o; } \
  static inline T atomicOr(T* p, T v) { T o = *p; *p = o | v; return o; }               \
  static inline T atomicAnd(T* p, T v) { T o = *p; *p = o & v; return o; }
IABN_EMU_ATOMIC_INT(int)
IABN_EMU_ATOMIC_INT(unsigned int)
IABN_EMU_ATOMIC_INT(unsigned long long)
#undef IABN_EMU_ATOMIC_INT

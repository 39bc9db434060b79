// cuda_fp16.h stub for the iabn CPU emulator: __half as a 16-bit storage type
// plus the float conversions, bit-exact with CUDA (round-to-nearest-even,
// subnormals, Inf; NaN converts to the canonical NaN as CUDA's cvt does).
#pragma once
#include <stdint.h>
#include <string.h>

struct __align__(2) __half {
  unsigned short __x;
};

static inline __host__ __device__ float __half2float(__half h) {
  uint32_t sign = (uint32_t)(h.__x & 0x8000u) << 16;
  uint32_t exp = (h.__x >> 10) & 0x1fu, man = h.__x & 0x3ffu, bits;
  if (exp == 0x1f) {
    bits = man ? 0x7fffffffu : (sign | 0x7f800000u);  // CUDA: NaN -> canonical
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {
    // Subnormal half: normalise; value = man * 2^-24.
    int e = -1;
    do { man <<= 1; ++e; } while (!(man & 0x400u));
    bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ffu) << 13);
  }
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

static inline __host__ __device__ __half __float2half_rn(float f) {
  uint32_t x;
  memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
  __half h;
  if (ax > 0x7f800000u) { h.__x = 0x7fffu; return h; }        // NaN
  if (ax >= 0x477ff000u) { h.__x = (unsigned short)(sign | 0x7c00u); return h; }  // rounds to Inf
  uint32_t e = ax >> 23;
  if (e >= 113) {
    // Normal half: drop 13 mantissa bits with round-to-nearest-even; a carry
    // out of the mantissa correctly bumps the exponent.
    uint32_t v = ((e - 112) << 10) | ((ax >> 13) & 0x3ffu);
    uint32_t rem = ax & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (v & 1u))) ++v;
    h.__x = (unsigned short)(sign | v);
    return h;
  }
  if (e < 102) { h.__x = (unsigned short)sign; return h; }  // < 2^-25: rounds to 0
  // Subnormal half: value/2^-24 with the implicit bit, shifted right by s.
  uint32_t m = (ax & 0x7fffffu) | 0x800000u;
  uint32_t s = 126 - e;  // 14..24
  uint32_t v = m >> s, rem = m & ((1u << s) - 1), halfway = 1u << (s - 1);
  if (rem > halfway || (rem == halfway && (v & 1u))) ++v;
  h.__x = (unsigned short)(sign | v);
  return h;
}

static inline __host__ __device__ __half __float2half(float f) { return __float2half_rn(f); }

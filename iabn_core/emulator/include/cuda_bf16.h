// cuda_bf16.h stub for the iabn CPU emulator: __nv_bfloat16 as a 16-bit
// storage type plus the float conversions, bit-exact with CUDA.
#pragma once
#include <stdint.h>
#include <string.h>

struct __align__(2) __nv_bfloat16 {
  unsigned short __x;
};

static inline __host__ __device__ float __bfloat162float(__nv_bfloat16 h) {
  uint32_t bits = (uint32_t)h.__x << 16;  // exact, NaN payload kept
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

static inline __host__ __device__ __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t x;
  memcpy(&x, &f, 4);
  __nv_bfloat16 h;
  if ((x & 0x7fffffffu) > 0x7f800000u) { h.__x = 0x7fffu; return h; }  // canonical NaN
  uint32_t v = x >> 16, rem = x & 0xffffu;
  if (rem > 0x8000u || (rem == 0x8000u && (v & 1u))) ++v;  // RNE; overflow -> Inf
  h.__x = (unsigned short)v;
  return h;
}

static inline __host__ __device__ __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }

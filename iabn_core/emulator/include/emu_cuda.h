// emu_cuda.h -- force-included (-include) before every kernel translation unit
// compiled by iabn_core.emulator.  It maps the CUDA dialect used by the iabn
// kernels onto plain C++ and supplies the runtime (fibers + scheduler) that
// executes one CUDA thread block at a time on the CPU.
//
// Everything lives in this one header on purpose: each emulated module is a
// single translation unit, so the runtime is compiled (with the same flags,
// including -fsanitize=address) together with the kernels it runs.
#pragma once

// All standard headers are included *before* the CUDA keyword macros below,
// because libstdc++ itself spells attributes like __noinline__.
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <type_traits>
#include <utility>

#ifdef __SANITIZE_ADDRESS__
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define IABN_EMU_ASAN 1
#endif

#if !defined(__x86_64__) || defined(IABN_EMU_FORCE_UCONTEXT)
#include <ucontext.h>
#define IABN_EMU_UCONTEXT 1
#endif

#define IABN_EMULATOR 1
#define IABN_EMU_EXPORT extern "C" __attribute__((visibility("default")))

// ---------------------------------------------------------------- keywords --
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __constant__  // plain (host-initialised) global in the emulator
// The Python front end rewrites `__shared__ T x[N];` into a static plus a
// registration (so the runtime can re-poison it before every block) and
// `extern __shared__ T x[];` into an alias of the dynamic buffer.  This
// fallback only matters for declarations it could not see (e.g. in macros).
#define __shared__ static

// ------------------------------------------------------- builtin variables --
struct uint3 { unsigned int x, y, z; };
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int a = 1, unsigned int b = 1, unsigned int c = 1) : x(a), y(b), z(c) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};
struct __align__(8) float2 { float x, y; };
struct __align__(16) float4 { float x, y, z, w; };
struct __align__(8) int2 { int x, y; };
struct __align__(16) int4 { int x, y, z, w; };
static inline float2 make_float2(float x, float y) { return {x, y}; }
static inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
static inline int2 make_int2(int x, int y) { return {x, y}; }
static inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }

namespace iabn_emu {

enum State { RUNNABLE, AT_BARRIER, AT_WARP, DONE, TRAPPED };
enum Op { OP_SYNCTHREADS, OP_SYNCTHREADS_COUNT, OP_SYNCTHREADS_AND, OP_SYNCTHREADS_OR, OP_SYNCWARP, OP_SHFL_IDX, OP_SHFL_UP, OP_SHFL_DOWN, OP_SHFL_XOR,
          OP_BALLOT, OP_ANY, OP_ALL, OP_TRAP };

struct Thread {
  void* sp;                 // saved stack pointer while suspended
  char* stack;              // usable stack [stack, stack + stack_size)
  size_t stack_size;
  uint3 tid;
  unsigned lin;             // linear id: x + y*bx + z*bx*by
  int state;
  int op;                   // what it waits at (valid unless RUNNABLE/DONE)
  const char* file;
  int line;
  unsigned mask;            // collective member mask
  unsigned long long val;   // collective input value (raw bits)
  int b, width;             // shuffle lane/delta and width
  unsigned long long result;
  void* fake_stack;         // ASan fiber bookkeeping
#ifdef IABN_EMU_UCONTEXT
  ucontext_t uc;
#endif
};

// One OS thread runs a launch; the Python side serialises launches per module,
// so plain globals (one copy per loaded .so thanks to -fvisibility=hidden) do.
static Thread* g_threads = nullptr;
static unsigned g_nthreads = 0, g_cap = 0;
static Thread* g_cur = nullptr;
static void* g_sched_sp = nullptr;
static bool g_stacks_dirty = false;   // fibers were abandoned mid-flight
static uint3 g_block_idx, g_block_dim, g_grid_dim;
static unsigned long long g_loaded = 0, g_stored = 0;
static int g_reverse = 0;
static char g_err[16384];
#ifdef IABN_EMU_ASAN
static const size_t kStackSize = 512 * 1024;
static const void* g_main_bottom = nullptr;
static size_t g_main_size = 0;
#else
static const size_t kStackSize = 64 * 1024;
#endif
#ifdef IABN_EMU_UCONTEXT
static ucontext_t g_sched_uc;
#endif

static const size_t kMaxDynSmem = 227 * 1024;
}  // namespace iabn_emu

// The dynamic shared buffer.  `extern __shared__ T name[]` declarations are
// rewritten to `extern T name[] __asm__("iabn_emu_dyn_smem")`, so every such
// declaration (any name, any scope) aliases this one array, as in CUDA.
extern "C" __attribute__((aligned(256), visibility("hidden")))
unsigned char iabn_emu_dyn_smem[iabn_emu::kMaxDynSmem];
unsigned char iabn_emu_dyn_smem[iabn_emu::kMaxDynSmem];

#define threadIdx (::iabn_emu::g_cur->tid)
#define blockIdx (::iabn_emu::g_block_idx)
#define blockDim (::iabn_emu::g_block_dim)
#define gridDim (::iabn_emu::g_grid_dim)
#define warpSize 32

// Global-memory traffic counters (the kernel headers call these from their
// load/store helpers; they default to nothing outside the emulator).
// A misaligned vector access works on a CPU but faults on a GPU: report it as a trap at the
// kernel's file:line (the kernels check every vector access through this hook).
#define IABN_CHECK_ALIGNED(p, n) \
  ((reinterpret_cast<unsigned long long>(p) % (unsigned long long)(n)) ? __trap() : (void)0)
#define IABN_COUNT_LOAD(n) ((void)(::iabn_emu::g_loaded += (unsigned long long)(n)))
#define IABN_COUNT_STORE(n) ((void)(::iabn_emu::g_stored += (unsigned long long)(n)))

#include "cuda_fp16.h"
#include "cuda_bf16.h"
#include "emu_runtime.h"
#include "emu_launch.h"
#include "emu_math.h"

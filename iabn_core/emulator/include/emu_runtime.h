// emu_runtime.h -- shared-memory poisoning, error reports and the CUDA
// barrier / warp-collective intrinsics of the CPU emulator.
// Included by emu_cuda.h only (which defines Thread and the globals).
#pragma once
#include "emu_fiber.h"

namespace iabn_emu {

// ------------------------------------------------- static shared memory ---
// Every `__shared__` static registers itself on first execution; the runtime
// refills all registered regions with 0xFF before every block so a read of
// shared memory the block never wrote yields NaN / garbage, as it may on a GPU.
struct Region { void* p; size_t n; };
static Region g_regions[4096];
static unsigned g_nregions = 0;

static bool register_shared(void* p, size_t n) {
  for (unsigned i = 0; i < g_nregions; ++i)
    if (g_regions[i].p == p) return true;
  if (g_nregions < sizeof(g_regions) / sizeof(g_regions[0])) g_regions[g_nregions++] = {p, n};
  memset(p, 0xFF, n);  // first use happens inside a block: poison now
  return true;
}

static void poison_shared(size_t dyn_bytes) {
  for (unsigned i = 0; i < g_nregions; ++i) memset(g_regions[i].p, 0xFF, g_regions[i].n);
  memset(iabn_emu_dyn_smem, 0xFF, dyn_bytes);
}

// ------------------------------------------------------------- errors ---
static size_t g_errlen = 0;
__attribute__((format(printf, 1, 2))) static void err_append(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  if (g_errlen < sizeof(g_err) - 1) {
    int n = vsnprintf(g_err + g_errlen, sizeof(g_err) - g_errlen, fmt, ap);
    if (n > 0) g_errlen += (size_t)n;
    if (g_errlen > sizeof(g_err) - 1) g_errlen = sizeof(g_err) - 1;
  }
  va_end(ap);
}

static const char* op_name(int op) {
  switch (op) {
    case OP_SYNCTHREADS: return "__syncthreads()";
    case OP_SYNCTHREADS_COUNT: return "__syncthreads_count()";
    case OP_SYNCTHREADS_AND: return "__syncthreads_and()";
    case OP_SYNCTHREADS_OR: return "__syncthreads_or()";
    case OP_SYNCWARP: return "__syncwarp()";
    case OP_SHFL_IDX: return "__shfl_sync()";
    case OP_SHFL_UP: return "__shfl_up_sync()";
    case OP_SHFL_DOWN: return "__shfl_down_sync()";
    case OP_SHFL_XOR: return "__shfl_xor_sync()";
    case OP_BALLOT: return "__ballot_sync()";
    case OP_ANY: return "__any_sync()";
    case OP_ALL: return "__all_sync()";
    case OP_TRAP: return "__trap()";
  }
  return "?";
}

// Append the linear ids of threads matching pred as compact ranges.
template <class Pred>
static unsigned err_thread_list(Pred pred) {
  unsigned count = 0, shown = 0;
  for (unsigned i = 0; i < g_nthreads; ++i) {
    if (!pred(g_threads[i])) continue;
    unsigned j = i;
    while (j + 1 < g_nthreads && pred(g_threads[j + 1])) ++j;
    count += j - i + 1;
    if (shown++ < 24) {
      if (j == i) err_append("%s%u", shown > 1 ? "," : "", i);
      else err_append("%s%u-%u", shown > 1 ? "," : "", i, j);
    } else if (shown == 25) {
      err_append(",...");
    }
    i = j;
  }
  if (!count) err_append("none");
  return count;
}

static bool same_site(const Thread& a, const Thread& b) {
  return a.op == b.op && a.line == b.line && a.mask == b.mask &&
         (a.file == b.file || strcmp(a.file, b.file) == 0);
}

// Describe every group of suspended threads (by site) for a deadlock report.
static void err_describe_block() {
  err_append(" in block (%u,%u,%u) of grid (%u,%u,%u), block dim (%u,%u,%u)"
             " [thread ids are linear: x + y*blockDim.x + z*blockDim.x*blockDim.y]:\n",
             g_block_idx.x, g_block_idx.y, g_block_idx.z, g_grid_dim.x, g_grid_dim.y, g_grid_dim.z,
             g_block_dim.x, g_block_dim.y, g_block_dim.z);
  static bool seen[1024];
  memset(seen, 0, sizeof(seen));
  for (unsigned i = 0; i < g_nthreads; ++i) {
    const Thread& t = g_threads[i];
    if (seen[i] || (t.state != AT_BARRIER && t.state != AT_WARP && t.state != TRAPPED)) continue;
    err_append("  at %s:%d %s", t.file, t.line, op_name(t.op));
    if (t.state == AT_WARP) err_append(" mask=0x%08x", t.mask);
    err_append(": threads ");
    unsigned n = err_thread_list([&](const Thread& u) { return u.state == t.state && same_site(u, t); });
    err_append(" (%u)\n", n);
    for (unsigned k = i; k < g_nthreads; ++k)
      if (g_threads[k].state == t.state && same_site(g_threads[k], t)) seen[k] = true;
  }
  err_append("  exited: threads ");
  unsigned n = err_thread_list([](const Thread& u) { return u.state == DONE; });
  err_append(" (%u)\n", n);
}

// ------------------------------------------------------ warp collectives ---
// Shuffle source lane exactly as PTX shfl.sync computes it (CUDA passes
// c = ((32-width)<<8) | (up ? 0 : 0x1f)); out-of-segment -> own lane.
static unsigned shfl_src(int op, unsigned lane, int b, int width) {
  unsigned segmask = (unsigned)(32 - width) & 31u;
  unsigned cval = op == OP_SHFL_UP ? 0u : 31u;
  unsigned bval = (unsigned)b & 31u;
  int maxLane = (int)((lane & segmask) | (cval & ~segmask));
  int minLane = (int)(lane & segmask);
  int j;
  bool ok;
  switch (op) {
    case OP_SHFL_UP: j = (int)lane - (int)bval; ok = j >= maxLane; break;
    case OP_SHFL_DOWN: j = (int)lane + (int)bval; ok = j <= maxLane; break;
    case OP_SHFL_XOR: j = (int)(lane ^ bval); ok = j <= maxLane; break;
    default: j = minLane | (int)(bval & ~segmask); ok = j <= maxLane; break;
  }
  return ok ? (unsigned)j : lane;
}

// Try to complete collectives whose whole mask has arrived.  Returns the
// number of threads released, or -1 after writing an error.
static int resolve_warps() {
  int released = 0;
  for (unsigned base = 0; base < g_nthreads; base += 32) {
    unsigned nlanes = g_nthreads - base < 32 ? g_nthreads - base : 32;
    for (unsigned l = 0; l < nlanes; ++l) {
      Thread& t = g_threads[base + l];
      if (t.state != AT_WARP) continue;
      unsigned m = t.mask;
      const char* why = nullptr;
      unsigned bad = 0;
      bool complete = true;
      if (!(m >> l & 1u)) { why = "the mask does not include the calling lane"; bad = l; }
      for (unsigned k = 0; k < 32 && !why; ++k) {
        if (!(m >> k & 1u)) continue;
        if (k >= nlanes) { why = "the mask names a lane that does not exist in this block"; bad = k; break; }
        Thread& u = g_threads[base + k];
        if (u.state == DONE) { why = "the mask names a lane that has exited"; bad = k; break; }
        if (u.state != AT_WARP || !same_site(u, t)) complete = false;
      }
      if (why) {
        g_errlen = 0;
        err_append("invalid warp collective %s at %s:%d (mask=0x%08x, warp %u, lane %u): %s (lane %u)",
                   op_name(t.op), t.file, t.line, m, base / 32, l, why, bad);
        err_describe_block();
        return -1;
      }
      if (!complete) continue;
      bool shfl = t.op == OP_SHFL_IDX || t.op == OP_SHFL_UP || t.op == OP_SHFL_DOWN || t.op == OP_SHFL_XOR;
      for (unsigned k = 0; k < nlanes && shfl; ++k) {
        int w = g_threads[base + k].width;
        if ((m >> k & 1u) && (w < 1 || w > 32 || (w & (w - 1)))) {
          g_errlen = 0;
          err_append("%s at %s:%d: width %d (lane %u) is not a power of two in [1, 32]",
                     op_name(t.op), t.file, t.line, w, k);
          return -1;
        }
      }
      unsigned ballot = 0;
      for (unsigned k = 0; k < nlanes; ++k)
        if ((m >> k & 1u) && g_threads[base + k].val) ballot |= 1u << k;
      for (unsigned k = 0; k < nlanes; ++k) {
        if (!(m >> k & 1u)) continue;
        Thread& u = g_threads[base + k];
        switch (u.op) {
          case OP_BALLOT: u.result = ballot; break;
          case OP_ANY: u.result = ballot != 0; break;
          case OP_ALL: u.result = ballot == m; break;
          case OP_SYNCWARP: u.result = 0; break;
          default: {
            unsigned src = shfl_src(u.op, k, u.b, u.width);
            // Reading a lane outside the mask is undefined in CUDA: poison.
            u.result = (m >> src & 1u) ? g_threads[base + src].val : ~0ull;
          }
        }
        u.state = RUNNABLE;
        ++released;
      }
    }
  }
  return released;
}

// Suspend the current thread at a collective / barrier until released.
static unsigned long long wait_here(int state, int op, const char* file, int line, unsigned mask,
                                    unsigned long long val, int b, int width) {
  Thread* t = g_cur;
  asm volatile("" ::: "memory");
  t->state = state;
  t->op = op;
  t->file = file;
  t->line = line;
  t->mask = mask;
  t->val = val;
  t->b = b;
  t->width = width;
  fiber_yield(t, state == TRAPPED);
  asm volatile("" ::: "memory");
  return t->result;
}

template <class T>
static unsigned long long to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of unsupported type");
  unsigned long long r = 0;
  memcpy(&r, &v, sizeof(T));
  return r;
}
template <class T>
static T from_bits(unsigned long long r) {
  T v;
  memcpy(&v, &r, sizeof(T));
  return v;
}

// Intrinsics are member functions of a call-site tag so that the macros below
// can capture __FILE__/__LINE__ while keeping CUDA's default arguments.
struct Site {
  const char* file;
  int line;
  void syncthreads() const { wait_here(AT_BARRIER, OP_SYNCTHREADS, file, line, 0, 0, 0, 0); }
  int syncthreads_count(int p) const { return (int)wait_here(AT_BARRIER, OP_SYNCTHREADS_COUNT, file, line, 0, p != 0, 0, 0); }
  int syncthreads_and(int p) const { return (int)wait_here(AT_BARRIER, OP_SYNCTHREADS_AND, file, line, 0, p != 0, 0, 0); }
  int syncthreads_or(int p) const { return (int)wait_here(AT_BARRIER, OP_SYNCTHREADS_OR, file, line, 0, p != 0, 0, 0); }
  void syncwarp(unsigned mask = 0xffffffffu) const {
    wait_here(AT_WARP, OP_SYNCWARP, file, line, mask, 0, 0, 0);
  }
  template <class T> T shfl(int op, unsigned mask, T v, int b, int width) const {
    return from_bits<T>(wait_here(AT_WARP, op, file, line, mask, to_bits(v), b, width));
  }
  template <class T> T shfl_sync(unsigned m, T v, int lane, int w = 32) const { return shfl(OP_SHFL_IDX, m, v, lane, w); }
  template <class T> T shfl_up_sync(unsigned m, T v, unsigned d, int w = 32) const { return shfl(OP_SHFL_UP, m, v, (int)d, w); }
  template <class T> T shfl_down_sync(unsigned m, T v, unsigned d, int w = 32) const { return shfl(OP_SHFL_DOWN, m, v, (int)d, w); }
  template <class T> T shfl_xor_sync(unsigned m, T v, int lm, int w = 32) const { return shfl(OP_SHFL_XOR, m, v, lm, w); }
  unsigned ballot_sync(unsigned m, int p) const { return (unsigned)wait_here(AT_WARP, OP_BALLOT, file, line, m, p != 0, 0, 0); }
  int any_sync(unsigned m, int p) const { return (int)wait_here(AT_WARP, OP_ANY, file, line, m, p != 0, 0, 0); }
  int all_sync(unsigned m, int p) const { return (int)wait_here(AT_WARP, OP_ALL, file, line, m, p != 0, 0, 0); }
  [[noreturn]] void trap() const {
    wait_here(TRAPPED, OP_TRAP, file, line, 0, 0, 0, 0);
    __builtin_unreachable();
  }
};

}  // namespace iabn_emu

// ------------------------------------------------ intrinsic entry points ---
#define IABN_EMU_SITE (::iabn_emu::Site{__FILE__, __LINE__})
#define __syncthreads IABN_EMU_SITE.syncthreads
#define __syncthreads_count IABN_EMU_SITE.syncthreads_count
#define __syncthreads_and IABN_EMU_SITE.syncthreads_and
#define __syncthreads_or IABN_EMU_SITE.syncthreads_or
#define __syncwarp IABN_EMU_SITE.syncwarp
#define __shfl_sync IABN_EMU_SITE.shfl_sync
#define __shfl_up_sync IABN_EMU_SITE.shfl_up_sync
#define __shfl_down_sync IABN_EMU_SITE.shfl_down_sync
#define __shfl_xor_sync IABN_EMU_SITE.shfl_xor_sync
#define __ballot_sync IABN_EMU_SITE.ballot_sync
#define __any_sync IABN_EMU_SITE.any_sync
#define __all_sync IABN_EMU_SITE.all_sync
#define __trap IABN_EMU_SITE.trap

// Registration emitted by the front end after each rewritten `__shared__`.
#define IABN_EMU_SHARED(name)                                                      \
  static const bool iabn_emu_shreg_##name __attribute__((unused)) =                \
      ::iabn_emu::register_shared((void*)&(name), sizeof(name))

static inline unsigned __activemask() {
  unsigned base = ::iabn_emu::g_cur->lin & ~31u, m = 0;
  for (unsigned k = 0; k < 32 && base + k < ::iabn_emu::g_nthreads; ++k)
    if (::iabn_emu::g_threads[base + k].state != ::iabn_emu::DONE) m |= 1u << k;
  return m;
}
static inline void __threadfence() { asm volatile("" ::: "memory"); }
static inline void __threadfence_block() { asm volatile("" ::: "memory"); }

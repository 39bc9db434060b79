// emu_launch.h -- block scheduler, kernel launch, parameter-type reporting
// and the exported C entry points.  Included by emu_cuda.h only.
#pragma once

namespace iabn_emu {

// ------------------------------------------------------------ scheduler ---
static void (*g_thunk)(void (*)(), void**) = nullptr;
static void (*g_fn)() = nullptr;
static void** g_args = nullptr;

static void fiber_main(Thread* t) {
  fiber_entered(t);
  g_thunk(g_fn, g_args);
  t->state = DONE;
  fiber_yield(t, true);
  __builtin_unreachable();
}

static bool ensure_threads(unsigned n) {
  if (n <= g_cap) return true;
  Thread* nt = (Thread*)realloc(g_threads, sizeof(Thread) * n);
  if (!nt) return false;
  g_threads = nt;
  for (unsigned i = g_cap; i < n; ++i) {
    memset(&g_threads[i], 0, sizeof(Thread));
    if (!stack_alloc(&g_threads[i])) return false;
    g_cap = i + 1;
  }
  return true;
}

// Run one block to completion.  0 on success, -1 with g_err set.
static int run_block() {
  unsigned n = g_nthreads;
#ifdef IABN_EMU_ASAN
  // Frames of fibers abandoned by an aborted launch left poisoned shadow on
  // their stacks (any of them, not only this block's first n): clear it.
  if (g_stacks_dirty)
    for (unsigned i = 0; i < g_cap; ++i) ASAN_UNPOISON_MEMORY_REGION(g_threads[i].stack, g_threads[i].stack_size);
#endif
  for (unsigned i = 0; i < n; ++i) {
    Thread& t = g_threads[i];
    t.lin = i;
    t.tid.x = i % g_block_dim.x;
    t.tid.y = (i / g_block_dim.x) % g_block_dim.y;
    t.tid.z = i / (g_block_dim.x * g_block_dim.y);
    t.state = RUNNABLE;
    t.file = "";
    t.line = 0;
    fiber_init(&t);
  }
  g_stacks_dirty = false;
  for (;;) {
    // One scheduling round: every runnable thread runs until it blocks.
    for (unsigned k = 0; k < n; ++k) {
      Thread& t = g_threads[g_reverse ? n - 1 - k : k];
      if (t.state != RUNNABLE) continue;
      fiber_resume(&t);
      if (t.state == TRAPPED) {
        g_stacks_dirty = true;
        g_errlen = 0;
        err_append("__trap() called at %s:%d by thread %u (%u,%u,%u)", t.file, t.line, t.lin,
                   t.tid.x, t.tid.y, t.tid.z);
        err_describe_block();
        return -1;
      }
    }
    int rel = resolve_warps();
    if (rel < 0) { g_stacks_dirty = true; return -1; }
    if (rel > 0) continue;
    unsigned live = 0, at_bar = 0;
    const Thread* first = nullptr;
    bool same = true;
    for (unsigned i = 0; i < n; ++i) {
      const Thread& t = g_threads[i];
      if (t.state == DONE) continue;
      ++live;
      if (t.state == AT_BARRIER) {
        ++at_bar;
        if (!first) first = &t;
        else if (!same_site(*first, t)) same = false;
      }
    }
    if (live == 0) return 0;
    if (live == n && at_bar == n && same) {
      unsigned long long cnt = 0;
      for (unsigned i = 0; i < n; ++i) cnt += g_threads[i].val != 0;
      unsigned long long res = first->op == OP_SYNCTHREADS_AND ? cnt == n
                             : first->op == OP_SYNCTHREADS_OR ? cnt != 0 : cnt;
      for (unsigned i = 0; i < n; ++i) {
        g_threads[i].result = res;
        g_threads[i].state = RUNNABLE;
      }
      continue;
    }
    g_stacks_dirty = true;
    g_errlen = 0;
    err_append("deadlock: %u of %u threads are waiting at a barrier or warp collective that the "
               "other threads cannot reach (they exited or wait at a different call site)", live, n);
    err_describe_block();
    return -1;
  }
}

template <class... P, size_t... I>
static void call_kernel(void (*fn)(), void** args, std::index_sequence<I...>) {
  reinterpret_cast<void (*)(P...)>(fn)(*static_cast<std::remove_cv_t<P>*>(args[I])...);
}
template <class... P>
static void thunk(void (*fn)(), void** args) {
  call_kernel<P...>(fn, args, std::index_sequence_for<P...>{});
}

template <class... P>
static int launch(void (*kernel)(P...), const unsigned* grid, const unsigned* block,
                  unsigned long long smem, void** args) {
  g_errlen = 0;
  g_err[0] = 0;
  g_loaded = g_stored = 0;
  unsigned long long n = (unsigned long long)block[0] * block[1] * block[2];
  if (n == 0 || n > 1024) {
    err_append("block of %llu threads: must be between 1 and 1024", n);
    return -1;
  }
  if (smem > kMaxDynSmem) {
    err_append("shared_mem=%llu bytes exceeds the 227 KiB (%zu bytes) limit", smem, kMaxDynSmem);
    return -1;
  }
  if (!ensure_threads((unsigned)n)) {
    err_append("out of memory allocating fiber stacks");
    return -1;
  }
#ifdef IABN_EMU_ASAN
  // Make overruns of the dynamic buffer past shared_mem visible to ASan.
  ASAN_UNPOISON_MEMORY_REGION(iabn_emu_dyn_smem, smem);
  ASAN_POISON_MEMORY_REGION(iabn_emu_dyn_smem + smem, kMaxDynSmem - smem);
#endif
  g_nthreads = (unsigned)n;
  g_block_dim = {block[0], block[1], block[2]};
  g_grid_dim = {grid[0], grid[1], grid[2]};
  g_thunk = &thunk<P...>;
  g_fn = reinterpret_cast<void (*)()>(kernel);
  g_args = args;
  int rc = 0;
  for (unsigned z = 0; z < grid[2] && rc == 0; ++z)
    for (unsigned y = 0; y < grid[1] && rc == 0; ++y)
      for (unsigned x = 0; x < grid[0] && rc == 0; ++x) {
        g_block_idx = {x, y, z};
        poison_shared(smem);
        rc = run_block();
      }
  fflush(stdout);  // kernel printf output appears before Python continues
  return rc;
}

// ------------------------------------------------------------ signature ---
template <class T> struct TypeStr {
  static void put(char* b) {
    const char* s = nullptr;
    if (std::is_same<T, float>::value) s = "float";
    else if (std::is_same<T, double>::value) s = "double";
    else if (std::is_same<T, int>::value) s = "int";
    else if (std::is_same<T, unsigned int>::value) s = "unsigned int";
    else if (std::is_same<T, long long>::value) s = "long long";
    else if (std::is_same<T, unsigned long long>::value) s = "unsigned long long";
    else if (std::is_same<T, long>::value) s = "long";
    else if (std::is_same<T, unsigned long>::value) s = "unsigned long";
    else if (std::is_same<T, short>::value) s = "short";
    else if (std::is_same<T, unsigned short>::value) s = "unsigned short";
    else if (std::is_same<T, char>::value) s = "char";
    else if (std::is_same<T, signed char>::value) s = "signed char";
    else if (std::is_same<T, unsigned char>::value) s = "unsigned char";
    else if (std::is_same<T, bool>::value) s = "bool";
    else if (std::is_same<T, __half>::value) s = "__half";
    else if (std::is_same<T, __nv_bfloat16>::value) s = "__nv_bfloat16";
    else if (std::is_same<T, void>::value) s = "void";
    if (s) strcat(b, s);
    else sprintf(b + strlen(b), "<unsupported type of %zu bytes>", sizeof_or_zero());
  }
  static size_t sizeof_or_zero() {
    if constexpr (std::is_void<T>::value || std::is_function<T>::value) return 0;
    else return sizeof(T);
  }
};
template <class T> struct TypeStr<const T> {
  static void put(char* b) { strcat(b, "const "); TypeStr<T>::put(b); }
};
template <class T> struct TypeStr<volatile T> {
  static void put(char* b) { strcat(b, "volatile "); TypeStr<T>::put(b); }
};
template <class T> struct TypeStr<const volatile T> {
  static void put(char* b) { strcat(b, "const volatile "); TypeStr<T>::put(b); }
};
template <class T> struct TypeStr<T*> {
  static void put(char* b) { TypeStr<T>::put(b); strcat(b, "*"); }
};

// Parameter types joined by ';'. The buffer is one per parameter list, not per kernel
// (kernels with the same parameter types share it), and it is rebuilt on every call, while
// ctypes calls this with the GIL released: threads that look kernels up together (in-process
// ranks) would read it half-cleared. thread_local gives each caller its own; a function
// static built once would need guards, and this library is built -fno-threadsafe-statics.
template <class... P>
static const char* signature(void (*)(P...)) {
  static thread_local char buf[64 * (sizeof...(P) + 1)];
  buf[0] = 0;
  int i = 0;
  ((strcat(buf, i++ ? ";" : ""), TypeStr<P>::put(buf)), ...);
  (void)i;
  return buf;
}

}  // namespace iabn_emu

IABN_EMU_EXPORT const char* iabn_emu_error() { return iabn_emu::g_err; }
IABN_EMU_EXPORT void iabn_emu_traffic(unsigned long long* out) {
  out[0] = iabn_emu::g_loaded;
  out[1] = iabn_emu::g_stored;
}
IABN_EMU_EXPORT void iabn_emu_set_reverse(int r) { iabn_emu::g_reverse = r; }
IABN_EMU_EXPORT int iabn_emu_is_asan() {
#ifdef IABN_EMU_ASAN
  return 1;
#else
  return 0;
#endif
}

// emu_fiber.h -- user-space context switch used to run CUDA threads as fibers.
// Included by emu_runtime.h only.
//
// On x86_64 a hand-written switch saves just the callee-saved registers and
// the stack pointer (everything else is dead across a call per the SysV ABI),
// which is ~20x cheaper than swapcontext (that one does a sigprocmask
// syscall per switch).  Other architectures fall back to ucontext.
#pragma once

namespace iabn_emu {
static void fiber_main(Thread* t);
}

#ifndef IABN_EMU_UCONTEXT
// void iabn_emu_switch(void** save_sp, void* new_sp)
//   pushes rbp rbx r12-r15, stores rsp to *save_sp, loads new_sp, pops, ret.
// iabn_emu_trampoline: first "return address" of a fresh fiber; r12 holds the
//   Thread*, r13 the entry function.  Entered with rsp 16-byte aligned, so the
//   call below gives the callee the ABI-mandated alignment.
// The symbols are local to this .so (hidden), one copy per emulated module.
extern "C" void iabn_emu_switch(void** save_sp, void* new_sp) __attribute__((visibility("hidden")));
extern "C" void iabn_emu_trampoline() __attribute__((visibility("hidden")));
asm(R"(
    .text
    .p2align 4
    .globl iabn_emu_switch
    .hidden iabn_emu_switch
    .type iabn_emu_switch,@function
iabn_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size iabn_emu_switch, .-iabn_emu_switch

    .p2align 4
    .globl iabn_emu_trampoline
    .hidden iabn_emu_trampoline
    .type iabn_emu_trampoline,@function
iabn_emu_trampoline:
    movq %r12, %rdi
    callq *%r13
    ud2
    .size iabn_emu_trampoline, .-iabn_emu_trampoline
)");
#endif

namespace iabn_emu {

// Prepare t to start at fiber_main(t) the next time it is switched to.
static void fiber_init(Thread* t) {
#ifdef IABN_EMU_UCONTEXT
  getcontext(&t->uc);
  t->uc.uc_stack.ss_sp = t->stack;
  t->uc.uc_stack.ss_size = t->stack_size;
  t->uc.uc_link = nullptr;
  uintptr_t p = (uintptr_t)t;
  makecontext(&t->uc, (void (*)())+[](unsigned hi, unsigned lo) {
    fiber_main((Thread*)(((uintptr_t)hi << 32) | lo));
  }, 2, (unsigned)(p >> 32), (unsigned)p);
#else
  // Stack image popped by iabn_emu_switch: r15 r14 r13 r12 rbx rbp ret.
  uintptr_t top = ((uintptr_t)(t->stack + t->stack_size)) & ~(uintptr_t)15;
  void** sp = (void**)(top - 72);  // sp % 16 == 8, so rsp % 16 == 0 after ret
  sp[0] = nullptr;                 // r15
  sp[1] = nullptr;                 // r14
  sp[2] = (void*)&fiber_main;      // r13: entry
  sp[3] = (void*)t;                // r12: argument
  sp[4] = nullptr;                 // rbx
  sp[5] = nullptr;                 // rbp
  sp[6] = (void*)&iabn_emu_trampoline;
  t->sp = sp;
#endif
}

// Scheduler -> fiber t; returns when t blocks, finishes or traps.
static void fiber_resume(Thread* t) {
  g_cur = t;
#ifdef IABN_EMU_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, t->stack, t->stack_size);
#endif
#ifdef IABN_EMU_UCONTEXT
  swapcontext(&g_sched_uc, &t->uc);
#else
  iabn_emu_switch(&g_sched_sp, t->sp);
#endif
#ifdef IABN_EMU_ASAN
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
  g_cur = nullptr;
}

// Fiber -> scheduler.  `final` means the fiber will never be resumed (it
// returned or trapped), so ASan may drop its fake stack.
static void fiber_yield(Thread* t, bool final) {
#ifdef IABN_EMU_ASAN
  __sanitizer_start_switch_fiber(final ? nullptr : &t->fake_stack, g_main_bottom, g_main_size);
#else
  (void)final;
#endif
#ifdef IABN_EMU_UCONTEXT
  swapcontext(&t->uc, &g_sched_uc);
#else
  iabn_emu_switch(&t->sp, g_sched_sp);
#endif
#ifdef IABN_EMU_ASAN
  __sanitizer_finish_switch_fiber(t->fake_stack, &g_main_bottom, &g_main_size);
#endif
}

// Called on a fiber's first entry: complete the switch ASan was told about
// and learn the scheduler's stack bounds for switching back.
static inline void fiber_entered(Thread* t) {
#ifdef IABN_EMU_ASAN
  t->fake_stack = nullptr;
  __sanitizer_finish_switch_fiber(nullptr, &g_main_bottom, &g_main_size);
#else
  (void)t;
#endif
}

// Stacks come from mmap with a PROT_NONE guard page below, so a runaway
// kernel recursion faults instead of silently corrupting a neighbour.
static bool stack_alloc(Thread* t) {
  size_t guard = 4096;
  char* p = (char*)mmap(nullptr, kStackSize + guard, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == (char*)MAP_FAILED) return false;
  mprotect(p, guard, PROT_NONE);
  t->stack = p + guard;
  t->stack_size = kStackSize;
  return true;
}

}  // namespace iabn_emu

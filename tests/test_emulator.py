"""Tests for iabn_core.emulator (CPU execution of the CUDA kernel sources)."""
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from iabn_core.emulator import EmulatorError, asan_loaded, build_module, options
from iabn_core.emulator import build as emu_build
from iabn_core.emulator import runtime as emu_runtime

REPO = Path(__file__).resolve().parents[1]
HEADER = "#include <cuda_fp16.h>\n#include <cuda_bf16.h>\n"


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    # A fresh cache per session so the tests really exercise the compiler.
    old = os.environ.get("IABN_CACHE_DIR")
    os.environ["IABN_CACHE_DIR"] = str(tmp_path_factory.mktemp("iabn-cache"))
    yield
    if old is None:
        os.environ.pop("IABN_CACHE_DIR", None)
    else:
        os.environ["IABN_CACHE_DIR"] = old


def f32(x):
    return np.float32(x)


def i64(x):
    return np.int64(x)


# ----------------------------------------------------------- reductions ---
REDUCE_SRC = HEADER + r'''
#line 1 "kernels/test_reduce.cuh"
namespace iabn {
struct Sum {
  template <class T> static __device__ __forceinline__ T op(T a, T b) { return a + b; }
  template <class T> static __device__ __forceinline__ T identity() { return T(0); }
};
struct Max {
  template <class T> static __device__ __forceinline__ T op(T a, T b) { return fmax(a, b); }
  template <class T> static __device__ __forceinline__ T identity() { return -INFINITY; }
};
}
template <class Op, class T>
__device__ __forceinline__ T warp_reduce(T v) {
  for (int o = warpSize / 2; o > 0; o >>= 1) v = Op::op(v, __shfl_down_sync(0xffffffffu, v, o));
  return v;
}
// Block reduction through a templated device function that owns a static
// __shared__ array (per instantiation, as in CUDA).
template <class Op, class T, int BS>
__device__ T block_reduce(T v) {
  __shared__ T partial[BS / 32];
  v = warp_reduce<Op>(v);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x < 32) {
    v = threadIdx.x < BS / 32 ? partial[threadIdx.x] : Op::template identity<T>();
    v = warp_reduce<Op>(v);
  }
  return v;
}
template <class T, class Op, int BS>
__global__ void __launch_bounds__(BS, 2) reduce_kernel(const T* __restrict__ x, T* __restrict__ out,
                                                      long long n) {
  T v = Op::template identity<T>();
  for (long long i = blockIdx.x * (long long)BS + threadIdx.x; i < n; i += (long long)BS * gridDim.x) {
    v = Op::op(v, x[i]);
    IABN_COUNT_LOAD(sizeof(T));
  }
  v = block_reduce<Op, T, BS>(v);
  if (threadIdx.x == 0) { out[blockIdx.x] = v; IABN_COUNT_STORE(sizeof(T)); }
}
'''
REDUCE_NAMES = ["reduce_kernel<float, iabn::Sum, 256>", "reduce_kernel<double, iabn::Max, 128>",
                "reduce_kernel<double, iabn::Sum, 64>"]


@pytest.fixture(scope="module")
def reduce_mod():
    return build_module(REDUCE_SRC, REDUCE_NAMES)


@pytest.mark.parametrize("reverse", [False, True])
def test_block_reduction_matches_numpy(reduce_mod, reverse):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(10007)
    k = reduce_mod.get_function(REDUCE_NAMES[0])
    assert k.signature == ("const float*", "float*", "long long")
    out = np.zeros(5, np.float32)
    with options(reverse=reverse):
        k((5,), (256,), (x.astype(np.float32), out, i64(x.size)))
    expected = x.astype(np.float32).sum()
    np.testing.assert_allclose(out.sum(), expected, rtol=1e-4)
    km = reduce_mod.get_function(REDUCE_NAMES[1])
    outm = np.zeros(3, np.float64)
    km(3, 128, (x, outm, i64(x.size)))
    assert outm.max() == x.max()


def test_signature_query_is_thread_safe(reduce_mod):
    """Each kernel's parameter list, asked for from many threads at once, comes back whole.
    ctypes drops the GIL during the call, and in-process ranks (tests/test_distributed.py)
    look the same kernels up together; kernels 1 and 2 share one parameter list."""
    import ctypes
    import threading

    want = b"const double*;double*;long long"
    queries = []
    for i in (1, 2):
        fn = getattr(reduce_mod._lib, f"iabn_emu_signature_{i}")
        fn.restype = ctypes.c_char_p
        queries.append(fn)
    bad, start = [], threading.Barrier(8)

    def ask(t):
        start.wait()
        q = queries[t % 2]
        for _ in range(3000):
            got = q()
            if got != want:
                bad.append(got)

    threads = [threading.Thread(target=ask, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert bad == [], f"{len(bad)} garbled answers, e.g. {bad[:3]}"


def test_traffic_counts(reduce_mod):
    k = reduce_mod.get_function(REDUCE_NAMES[2])
    x = np.arange(1000, dtype=np.float64)
    out = np.zeros(4, np.float64)
    k((4,), (64,), (x, out, i64(1000)))
    assert k.last_traffic == (1000 * 8, 4 * 8)
    k((1,), (64,), (x, out, i64(10)))
    assert k.last_traffic == (10 * 8, 8)  # counters reset per launch


# -------------------------------------------------- exact warp shuffles ---
SHFL_SRC = HEADER + r'''
#line 1 "kernels/test_shfl.cuh"
template <class T>
__global__ void shfl_kernel(const T* in, T* out, int op, int arg, int width) {
  unsigned t = threadIdx.x;
  T v = in[t], r;
  if (op == 0) r = __shfl_sync(0xffffffffu, v, arg, width);
  else if (op == 1) r = __shfl_up_sync(0xffffffffu, v, (unsigned)arg, width);
  else if (op == 2) r = __shfl_down_sync(0xffffffffu, v, (unsigned)arg, width);
  else r = __shfl_xor_sync(0xffffffffu, v, arg, width);
  out[t] = r;
}
__global__ void vote_kernel(const int* pred, unsigned* ballot, int* any, int* all) {
  unsigned t = threadIdx.x;
  ballot[t] = __ballot_sync(0xffffffffu, pred[t]);
  any[t] = __any_sync(0xffffffffu, pred[t]);
  all[t] = __all_sync(0xffffffffu, pred[t]);
  __syncwarp();
}
__global__ void atomic_kernel(float* f, int* i, unsigned long long* u, double* d, int* mx) {
  atomicAdd(f, 1.5f); atomicAdd(i, 2); atomicAdd(u, 3ull); atomicAdd(d, 0.25);
  atomicMax(mx, (int)threadIdx.x); atomicMin(mx + 1, -(int)threadIdx.x);
  if (threadIdx.x == 0) printf("emulator printf %d\n", 42);
  int c = __syncthreads_count(threadIdx.x % 5 == 0);
  int a = __syncthreads_and(threadIdx.x < 100), o = __syncthreads_or(threadIdx.x == 49);
  if (threadIdx.x == 0 && blockIdx.x == 0 && blockIdx.y == 0) { mx[2] = c; mx[3] = a + 2 * o; }
}
'''
SHFL_TYPES = {"float": np.float32, "double": np.float64, "int": np.int32, "unsigned int": np.uint32,
              "long long": np.int64, "unsigned long long": np.uint64}
SHFL_NAMES = [f"shfl_kernel<{t}>" for t in SHFL_TYPES] + ["vote_kernel", "atomic_kernel"]


def shfl_reference(v, op, arg, width):
    """CUDA programming guide semantics, written independently of the PTX
    formulation used by the emulator."""
    out = np.empty_like(v)
    for lane in range(64):
        warp_base = lane // 32 * 32
        wl = lane % 32
        seg = wl // width * width
        if op == 0:
            src = seg + arg % width
        elif op == 1:
            src = wl - arg if wl - seg >= arg else wl
        elif op == 2:
            src = wl + arg if wl - seg + arg < width else wl
        else:
            src = wl ^ arg
            src = src if src < seg + width else wl  # later groups: own value
        out[lane] = v[warp_base + src]
    return out


@pytest.fixture(scope="module")
def shfl_mod():
    return build_module(SHFL_SRC, SHFL_NAMES)


@pytest.mark.parametrize("ctype", list(SHFL_TYPES))
def test_shuffle_semantics_exact(shfl_mod, ctype):
    dt = SHFL_TYPES[ctype]
    k = shfl_mod.get_function(f"shfl_kernel<{ctype}>")
    v = (np.arange(64) * 3 + 7).astype(dt)
    out = np.zeros(64, dt)
    for width in (32, 16, 8, 4, 2, 1):
        for op in range(4):
            for arg in ([0, 1, 3, 5, 17, 31] if op else [0, 1, 5, 17, 31, 40, -1]):
                if op == 3 and arg >= 32:
                    continue
                k(1, 64, (v, out, np.int32(op), np.int32(arg), np.int32(width)))
                np.testing.assert_array_equal(out, shfl_reference(v, op, arg, width),
                                              err_msg=f"op={op} arg={arg} width={width}")


def test_vote_and_atomics(shfl_mod, capfd):
    pred = np.zeros(64, np.int32)
    pred[[3, 40]] = 1
    pred[32:] = 1
    pred[33] = 0
    ballot, anyv, allv = np.zeros(64, np.uint32), np.zeros(64, np.int32), np.zeros(64, np.int32)
    shfl_mod.get_function("vote_kernel")(1, 64, (pred, ballot, anyv, allv))
    assert (ballot[:32] == 1 << 3).all() and (ballot[32:] == 0xFFFFFFFD).all()
    assert (anyv == 1).all() and (allv == 0).all()
    f, i, u = np.zeros(1, np.float32), np.zeros(1, np.int32), np.zeros(1, np.uint64)
    d, mx = np.zeros(1, np.float64), np.zeros(4, np.int32)
    shfl_mod.get_function("atomic_kernel")((2, 2), 50, (f, i, u, d, mx))
    assert (f[0], i[0], u[0], d[0]) == (300.0, 400, 600, 50.0)
    assert list(mx) == [49, -49, 10, 3]
    assert "emulator printf 42" in capfd.readouterr().out


def test_ucontext_fallback(monkeypatch):
    # The portable swapcontext path (used off x86_64) must behave identically.
    monkeypatch.setenv("IABN_EMULATOR_UCONTEXT", "1")
    mod = build_module(REDUCE_SRC, REDUCE_NAMES[:1])
    x = np.arange(3000, dtype=np.float32)
    for reverse in (False, True):
        out = np.zeros(3, np.float32)
        with options(reverse=reverse):
            mod.get_function(REDUCE_NAMES[0])(3, 256, (x, out, i64(x.size)))
        assert out.sum() == x.sum()


# ------------------------------------ dynamic shared memory, 3-D indices ---
MISC_SRC = HEADER + r'''
#line 1 "kernels/test_misc.cuh"
extern __shared__ __align__(16) unsigned char smem[];
__global__ void dyn_reverse(const float* in, float* out) {
  extern __shared__ __align__(16) unsigned char smem[];
  float* buf = reinterpret_cast<float*>(smem);
  unsigned t = threadIdx.x, n = blockDim.x;
  buf[t] = in[blockIdx.x * n + t];
  __syncthreads();
  out[blockIdx.x * n + t] = buf[n - 1 - t];
}
// Different kernel, same buffer name, read as another type: must alias.
__global__ void dyn_peek(double* out) {
  extern __shared__ double smem_d[];
  if (threadIdx.x == 0) smem_d[1] = 2.5;
  __syncthreads();
  out[threadIdx.x] = reinterpret_cast<double*>(smem)[1];
}
__global__ void unwritten_shared(float* out) {
  __shared__ float never_written[64];
  __shared__ float written[64];
  written[threadIdx.x] = 1.0f;
  __syncthreads();
  out[threadIdx.x] = never_written[threadIdx.x] + written[63 - threadIdx.x];
  __syncthreads();
  never_written[threadIdx.x] = 7.0f;  // must not leak into the next block
}
__global__ void ids3d(unsigned* out) {
  unsigned bx = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  unsigned nt = blockDim.x * blockDim.y * blockDim.z;
  unsigned t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  unsigned* o = out + 8 * (bx * nt + t);
  o[0] = threadIdx.x; o[1] = threadIdx.y; o[2] = threadIdx.z;
  o[3] = blockIdx.x; o[4] = blockIdx.y; o[5] = blockIdx.z;
  // lane id of a 3-D block: warps are 32 consecutive linear ids.
  unsigned mask = t / 32 * 32 + 32 <= nt ? 0xffffffffu : (1u << nt % 32) - 1;  // partial last warp
  o[6] = __shfl_sync(mask, t, 0);
  o[7] = gridDim.x * 10000 + gridDim.y * 100 + gridDim.z + blockDim.z * 1000000;
}
__global__ void racy_sum(const int* in, int* out) {
  __shared__ int buf[64];
  buf[threadIdx.x] = in[threadIdx.x];
  // BUG (deliberate): missing __syncthreads() before reading other threads' data
  if (threadIdx.x == 0) {
    int s = 0;
    for (int i = 0; i < 64; ++i) s += buf[i];
    out[0] = s;
  }
}
__global__ void typed_args(float* a, const double* b, int c, unsigned long long d, __half* h,
                           const __nv_bfloat16* bf, unsigned char* u8) {
  if (a) a[0] = (float)b[0] + c + (float)d + __half2float(h[0]) + __bfloat162float(bf[0]) + u8[0];
}
'''
MISC_NAMES = ["dyn_reverse", "dyn_peek", "unwritten_shared", "ids3d", "racy_sum", "typed_args"]


@pytest.fixture(scope="module")
def misc_mod():
    return build_module(MISC_SRC, MISC_NAMES)


def test_dynamic_shared_memory(misc_mod):
    x = np.arange(3 * 96, dtype=np.float32)
    out = np.zeros_like(x)
    misc_mod.get_function("dyn_reverse")(3, 96, (x, out), shared_mem=96 * 4)
    np.testing.assert_array_equal(out, x.reshape(3, 96)[:, ::-1].ravel())
    d = np.zeros(32, np.float64)
    misc_mod.get_function("dyn_peek")(1, 32, (d,), shared_mem=16)
    assert (d == 2.5).all()


def test_unwritten_shared_is_poisoned_per_block(misc_mod):
    out = np.zeros(64, np.float32)
    k = misc_mod.get_function("unwritten_shared")
    for _ in range(2):  # second launch/block must be re-poisoned too
        k(2, 64, (out,))
        assert np.isnan(out).all()


def test_3d_grid_and_block(misc_mod):
    grid, block = (3, 2, 2), (4, 3, 5)
    nb, nt = 12, 60
    out = np.zeros((nb, nt, 8), np.uint32)
    misc_mod.get_function("ids3d")(grid, block, (out,))
    t = np.arange(nt)
    b = np.arange(nb)
    np.testing.assert_array_equal(out[:, :, 0], np.broadcast_to(t % 4, (nb, nt)))
    np.testing.assert_array_equal(out[:, :, 1], np.broadcast_to(t // 4 % 3, (nb, nt)))
    np.testing.assert_array_equal(out[:, :, 2], np.broadcast_to(t // 12, (nb, nt)))
    np.testing.assert_array_equal(out[:, :, 3], np.broadcast_to((b % 3)[:, None], (nb, nt)))
    np.testing.assert_array_equal(out[:, :, 4], np.broadcast_to((b // 3 % 2)[:, None], (nb, nt)))
    np.testing.assert_array_equal(out[:, :, 5], np.broadcast_to((b // 6)[:, None], (nb, nt)))
    np.testing.assert_array_equal(out[0, :, 6], t // 32 * 32)
    assert (out[:, :, 7] == 5030202).all()


def test_missing_syncthreads_is_exposed_by_thread_order(misc_mod):
    k = misc_mod.get_function("racy_sum")
    x = np.arange(64, dtype=np.int32)
    results = []
    for reverse in (False, True):
        out = np.zeros(1, np.int32)
        with options(reverse=reverse):
            k(1, 64, (x, out))
        results.append(int(out[0]))
    assert int(x.sum()) in results and results[0] != results[1]


def test_argument_checking(misc_mod):
    k = misc_mod.get_function("typed_args")
    assert k.signature == ("float*", "const double*", "int", "unsigned long long", "__half*",
                           "const __nv_bfloat16*", "unsigned char*")
    a, b = np.zeros(1, np.float32), np.full(1, 2.0)
    h = np.full(1, 0.5, np.float16)
    bf = np.full(1, 0.25, ml_dtypes.bfloat16)
    u8 = np.full(1, 3, np.uint8)
    good = [a, b, np.int32(1), np.uint64(4), h, bf, u8]
    k(1, 1, good)
    assert a[0] == 2 + 1 + 4 + 0.5 + 0.25 + 3
    k(1, 1, [None] + good[1:])  # null pointer is fine
    ro = b.copy()
    ro.flags.writeable = False
    k(1, 1, good[:1] + [ro] + good[2:])  # const pointer accepts read-only
    cases = [
        (2, 1, TypeError, "expects a numpy scalar of dtype int32, got int"),
        (2, np.int64(1), TypeError, "int32, got int64"),
        (3, np.int64(4), TypeError, "parameter 3 (unsigned long long)"),
        (0, np.zeros(1, np.float64), TypeError, "parameter 0 (float*) expects an array of dtype float32"),
        (4, np.zeros(1, np.uint16), TypeError, "dtype float16, got uint16"),
        (5, np.zeros(1, np.float16), TypeError, "dtype bfloat16, got float16"),
        (0, 1.0, TypeError, "expects a numpy array or None"),
        (1, np.float64(1), TypeError, "parameter 1"),
    ]
    for idx, bad, exc, msg in cases:
        args = list(good)
        args[idx] = bad
        with pytest.raises(exc, match=msg.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*")):
            k(1, 1, args)
    rw = np.zeros(1, np.float32)
    rw.flags.writeable = False
    with pytest.raises(ValueError, match="parameter 0.*read-only"):
        k(1, 1, [rw] + good[1:])
    with pytest.raises(TypeError, match="expected 7 arguments"):
        k(1, 1, good[:-1])


def test_launch_limits(misc_mod):
    k = misc_mod.get_function("dyn_peek")
    d = np.zeros(1100, np.float64)
    with pytest.raises(EmulatorError, match="at most 1024"):
        k(1, (32, 33), (d,))
    with pytest.raises(ValueError, match="227 KiB"):
        k(1, 32, (d,), shared_mem=227 * 1024 + 1)
    k(1, 32, (d,), shared_mem=227 * 1024)
    with pytest.raises(EmulatorError, match="not one of"):
        misc_mod.get_function("nope")


# ------------------------------------------------ hangs become errors ---
HANG_SRC = HEADER + r'''
#line 1 "kernels/test_hang.cuh"
__global__ void early_return(float* out) {
  if (threadIdx.x == 5) return;
  out[threadIdx.x] = 1.0f;
  __syncthreads();
  out[threadIdx.x] += 1.0f;
}
__global__ void divergent_barriers(float* out) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncthreads();
  }
}
__global__ void shfl_bad_site(int* out) {
  int v = threadIdx.x;
  if (threadIdx.x & 1) v = __shfl_xor_sync(0xffffffffu, v, 1);
  else v = __shfl_xor_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}
__global__ void shfl_bad_mask(int* out) {
  // 48-thread block: the second warp has 16 lanes, the full mask is invalid.
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, (int)threadIdx.x, 1);
}
__global__ void shfl_exited_lane(int* out) {
  if (threadIdx.x == 7) return;
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, (int)threadIdx.x, 1);
}
__global__ void shfl_mismatched_masks(int* out) {
  unsigned m = threadIdx.x == 0 ? 0xffffffffu : 0x0000ffffu;
  out[threadIdx.x] = __shfl_sync(m, (int)threadIdx.x, 0);
}
__global__ void traps(int* out) {
  if (blockIdx.x == 1 && threadIdx.x == 3) __trap();
  __syncthreads();
  out[0] = 1;
}
'''


@pytest.fixture(scope="module")
def hang_mod():
    return build_module(HANG_SRC, ["early_return", "divergent_barriers", "shfl_bad_site",
                                   "shfl_bad_mask", "shfl_exited_lane", "shfl_mismatched_masks",
                                   "traps"])


def test_early_return_before_barrier_is_an_error(hang_mod):
    out = np.zeros(64, np.float32)
    t0 = time.time()
    with pytest.raises(EmulatorError) as ei:
        hang_mod.get_function("early_return")(1, 64, (out,))
    assert time.time() - t0 < 5
    msg = str(ei.value)
    assert "deadlock" in msg and "kernels/test_hang.cuh:4 __syncthreads()" in msg
    assert "threads 0-4,6-63 (63)" in msg and "exited: threads 5 (1)" in msg
    # The module stays usable after an aborted launch.
    out2 = np.zeros(1, np.int32)
    hang_mod.get_function("traps")(1, 8, (out2,))
    assert out2[0] == 1


def test_divergent_barrier_sites(hang_mod):
    with pytest.raises(EmulatorError) as ei:
        hang_mod.get_function("divergent_barriers")(1, 32, (np.zeros(32, np.float32),))
    msg = str(ei.value)
    assert "test_hang.cuh:9 __syncthreads(): threads 0-15" in msg
    assert "test_hang.cuh:11 __syncthreads(): threads 16-31" in msg


@pytest.mark.parametrize("name,block,expect", [
    ("shfl_bad_site", 32, ["test_hang.cuh:16 __shfl_xor_sync() mask=0xffffffff: threads 1,3,5",
                                 "test_hang.cuh:17"]),
    ("shfl_bad_mask", 48, ["does not exist", "test_hang.cuh:22"]),
    ("shfl_exited_lane", 32, ["has exited (lane 7)", "test_hang.cuh:26"]),
    ("shfl_mismatched_masks", 32, ["test_hang.cuh:30", "mask=0xffffffff"]),
])
def test_bad_warp_collectives(hang_mod, name, block, expect):
    with pytest.raises(EmulatorError) as ei:
        hang_mod.get_function(name)(1, block, (np.zeros(64, np.int32),))
    for e in expect:
        assert e in str(ei.value)


def test_bad_shuffle_width(shfl_mod):
    v = np.zeros(64, np.int32)
    with pytest.raises(EmulatorError, match="width 12 .* not a power of two"):
        shfl_mod.get_function("shfl_kernel<int>")(1, 64, (v, v.copy(), np.int32(0), np.int32(1),
                                                         np.int32(12)))


def test_trap(hang_mod):
    with pytest.raises(EmulatorError, match=r"__trap\(\) called at kernels/test_hang.cuh:33 by "
                                            r"thread 3 .*block \(1,0,0\)"):
        hang_mod.get_function("traps")(3, 8, (np.zeros(1, np.int32),))


# ------------------------------------------------ half / bf16 exactness ---
CONV_SRC = HEADER + r'''
#line 1 "kernels/test_conv.cuh"
template <class H> __device__ float to_f(H h);
template <> __device__ float to_f<__half>(__half h) { return __half2float(h); }
template <> __device__ float to_f<__nv_bfloat16>(__nv_bfloat16 h) { return __bfloat162float(h); }
template <class H> __device__ H from_f(float f, int variant);
template <> __device__ __half from_f<__half>(float f, int v) { return v ? __float2half_rn(f) : __float2half(f); }
template <> __device__ __nv_bfloat16 from_f<__nv_bfloat16>(float f, int v) {
  return v ? __float2bfloat16_rn(f) : __float2bfloat16(f);
}
template <class H>
__global__ void to_float(const H* in, float* out, long long n) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)blockDim.x * gridDim.x)
    out[i] = to_f<H>(in[i]);
}
template <class H>
__global__ void from_float(const float* in, H* out, long long n, int variant) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)blockDim.x * gridDim.x)
    out[i] = from_f<H>(in[i], variant);
}
'''


@pytest.mark.parametrize("ctype,npdt", [("__half", np.float16), ("__nv_bfloat16", ml_dtypes.bfloat16)])
def test_half_conversions_bit_exact(ctype, npdt):
    mod = build_module(CONV_SRC, [f"to_float<{ctype}>", f"from_float<{ctype}>"])
    # every 16-bit pattern -> float
    bits16 = np.arange(65536, dtype=np.uint16)
    h = bits16.view(npdt)
    out = np.zeros(65536, np.float32)
    mod.get_function(f"to_float<{ctype}>")(64, 256, (h, out, i64(65536)))
    ref = h.astype(np.float32)
    nan = np.isnan(ref)
    np.testing.assert_array_equal(out.view(np.uint32)[~nan], ref.view(np.uint32)[~nan])
    assert np.isnan(out[nan]).all()
    # floats -> 16 bit: exact midpoints between neighbours (ties), +-1 ulp around
    # them, every 16-bit value itself, and random bit patterns.
    fin = ref[np.isfinite(ref)].astype(np.float64)
    fin = np.unique(fin)
    mids = ((fin[:-1] + fin[1:]) / 2).astype(np.float32)
    rng = np.random.default_rng(1)
    xs = np.concatenate([
        mids, np.nextafter(mids, np.float32(np.inf)), np.nextafter(mids, np.float32(-np.inf)),
        fin.astype(np.float32), rng.integers(0, 2**32, 2_000_000, dtype=np.uint64).astype(np.uint32).view(np.float32),
        np.array([np.inf, -np.inf, np.nan, 65520.0, 65519.99, 3e38, -3e38, 1e-8, 2.0**-25, 2.0**-24], np.float32)])
    with np.errstate(all="ignore"):
        expect = xs.astype(npdt).view(np.uint16)
    for variant in (0, 1):
        got = np.zeros(xs.size, npdt)
        mod.get_function(f"from_float<{ctype}>")(64, 256, (xs, got, i64(xs.size), np.int32(variant)))
        gb = got.view(np.uint16)
        isn = np.isnan(xs)
        np.testing.assert_array_equal(gb[~isn], expect[~isn])
        assert (gb[isn] == 0x7FFF).all()  # CUDA's canonical NaN


# ------------------------------------------------------ build & cache ---
def test_compile_error_names_original_file_and_line():
    src = HEADER + '#line 7 "kernels/broken.cuh"\n__global__ void k(float* x) {\n  x[0] = undefined_thing;\n}\n'
    with pytest.raises(EmulatorError, match=r"kernels/broken.cuh:8.*undefined_thing"):
        build_module(src, ["k"])


def test_cache_hit_does_not_recompile():
    src = HEADER + "__global__ void cache_probe(int* x) { x[threadIdx.x] = %d; }\n" % os.getpid()
    build_module(src, ["cache_probe"])
    n = emu_build.compile_count
    emu_runtime.clear_loaded_modules()  # force the on-disk path
    t0 = time.time()
    mod = build_module(src, ["cache_probe"])
    assert time.time() - t0 < 0.5 and emu_build.compile_count == n
    x = np.zeros(4, np.int32)
    mod.get_function("cache_probe")(1, 4, (x,))
    assert (x == os.getpid()).all()
    assert len(list(emu_build.cache_dir().glob("*.so"))) >= 1
    assert not list(emu_build.cache_dir().glob("build-*"))  # temp dirs cleaned


def test_parallel_processes_share_the_cache(tmp_path):
    code = textwrap.dedent("""
        import numpy as np
        from iabn_core.emulator import build_module
        m = build_module('__global__ void par(int* x) { x[threadIdx.x] = 5; }', ['par'])
        x = np.zeros(3, np.int32); m.get_function('par')(1, 3, (x,)); print(x.sum())
    """)
    env = dict(os.environ, IABN_CACHE_DIR=str(tmp_path),
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=60)[0] for p in procs]
    assert [o.strip() for o in outs] == ["15"] * 3, outs
    assert len(list((tmp_path / "emulator").glob("*.so"))) == 1
    assert not list((tmp_path / "emulator").glob("build-*"))


# ------------------------------------------------------------- ASan ---
def test_asan_requires_preload():
    if asan_loaded():
        pytest.skip("libasan is preloaded in this process")
    with pytest.raises(EmulatorError, match=r"LD_PRELOAD=\$\(g\+\+ -print-file-name=libasan.so\)"):
        build_module(REDUCE_SRC, REDUCE_NAMES[:1], asan=True)


@pytest.mark.skipif(not asan_loaded(), reason="needs libasan preloaded: ASAN_OPTIONS=detect_leaks=0 "
                    "LD_PRELOAD=$(g++ -print-file-name=libasan.so) python -m pytest ...")
def test_asan_build_runs_clean():
    mod = build_module(REDUCE_SRC + HANG_SRC.replace(HEADER, ""), REDUCE_NAMES[:1] + ["early_return", "traps"],
                       asan=True)
    x = np.ones(5000, np.float32)
    out = np.zeros(2, np.float32)
    k = mod.get_function(REDUCE_NAMES[0])
    for reverse in (False, True):
        with options(reverse=reverse):
            k(2, 256, (x, out, i64(x.size)))
    with pytest.raises(EmulatorError):  # aborted launch abandons fiber stacks ...
        mod.get_function("early_return")(1, 64, (np.zeros(64, np.float32),))
    mod.get_function("traps")(1, 8, (np.zeros(1, np.int32),))  # reuses only 8 of them
    k(2, 256, (x, out, i64(x.size)))  # ... which must not cause false reports
    assert out.sum() == 5000


ASAN_SCRIPT = r'''
import numpy as np
from iabn_core.emulator import build_module
src = """
#include <cuda_fp16.h>
#line 1 "kernels/oob.cuh"
__global__ void oob(const float* x, float* out, long long n) {
  __syncthreads();
  out[threadIdx.x] = x[n - 1 + threadIdx.x];
}
"""
mod = build_module(src, ["oob"], asan=True)
k = mod.get_function("oob")
x = np.ones(1000, np.float32)
out = np.zeros(2, np.float32)
k(1, 1, (x, out, np.int64(x.size)))
print("IN-BOUNDS-OK", flush=True)
k(1, 2, (x, out, np.int64(x.size)))
print("NOT-REPORTED", flush=True)
'''


def test_asan_reports_out_of_bounds_global_read(tmp_path):
    libasan = subprocess.run(["g++", "-print-file-name=libasan.so"], capture_output=True,
                             text=True).stdout.strip()
    if not os.path.isabs(libasan) or not os.path.exists(libasan):
        pytest.skip("libasan not available")
    env = dict(os.environ, LD_PRELOAD=libasan, ASAN_OPTIONS="detect_leaks=0",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    script = tmp_path / "oob.py"
    script.write_text(textwrap.dedent(ASAN_SCRIPT))
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                          timeout=120)
    out = proc.stdout + proc.stderr
    assert "IN-BOUNDS-OK" in out, out[-3000:]
    assert "NOT-REPORTED" not in out and proc.returncode != 0
    assert "heap-buffer-overflow" in out and "READ of size 4" in out
    assert "kernels/oob.cuh:3" in out, out[-3000:]

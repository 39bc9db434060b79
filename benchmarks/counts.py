"""Machine-independent counts: global bytes per element per stage, kernel launches per step,
NVRTC compile time.

Traffic comes from the CPU emulator, which runs the exact CUDA sources and counts every global
load and store a kernel makes (EmulatorRuntime.traffic), so the figures are what the GPU
kernels request from memory, before any cache, on any machine.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time

import numpy as np

from iabn_core import backends, instantiations as inst, ops, plan, validate
from iabn_core.dtypes import PAIRS, numpy_dtype
from iabn_core.layout import view3

from .cases import ACTIVATION, EPS, MOMENTUM, SLOPE, Settings


def _inputs(shape, pair, layout, seed=0):
    rng = np.random.default_rng(seed)
    xdt, pdt = numpy_dtype(pair.x), numpy_dtype(pair.param)
    c = shape[1]

    def arr():
        a = rng.normal(size=shape).astype(xdt)
        if layout == "nsc":  # channels-last memory, logical (N, C, H, W)
            a = np.moveaxis(np.ascontiguousarray(np.moveaxis(a, 1, -1)), -1, 1)
        return a

    x, dz = arr(), arr()
    w = rng.uniform(0.5, 1.5, size=c).astype(pdt)
    b = rng.normal(size=c).astype(pdt)
    return x, dz, w, b, np.zeros(c, pdt), np.ones(c, pdt)


class _Meter:
    """Reads the emulator backend's launch and traffic counters around a block."""

    def __init__(self):
        self.be = backends.get("emulator")
        self.rows: list[tuple[str, int, int, int]] = []

    @contextlib.contextmanager
    def stage(self, name):
        rt = self.be.rt
        l0, s0, n0 = rt.traffic[0], rt.traffic[1], self.be.launches
        yield
        self.rows.append((name, rt.traffic[0] - l0, rt.traffic[1] - s0, self.be.launches - n0))


def traffic_rows(settings: Settings, pairs=PAIRS) -> list[dict]:
    """Bytes loaded/stored per element for each kernel and each composite stage, per dtype
    pair and layout. 'tensor_*' is the count rounded down to whole passes over the tensor;
    the remainder is the O(C) per-channel traffic (constants, partials), which shrinks
    per element as the tensor grows."""
    be = backends.get("emulator")
    shape = settings.traffic_shape()
    rows = []
    for pair in pairs:
        for layout in ("ncs", "nsc"):
            m = _Meter()
            x, dz, w, b, rm, rv = _inputs(shape, pair, layout)
            prob, lay = validate.problem(x, w, b, rm, rv, training=True, momentum=MOMENTUM,
                                         eps=EPS, activation=ACTIVATION, activation_param=SLOPE)
            assert lay == layout, (lay, layout)
            x3, dz3 = view3(x, lay), view3(dz, lay)
            # blocks per elementwise launch: each writes one partials row per channel, which is
            # where the O(C) traffic beside the tensor comes from
            blocks = plan.elementwise(prob, plan.choose_vec(prob, [x.ctypes.data]),
                                      be.rt.sm_count).g
            # kernel by kernel, in the order ops.forward/ops.backward launch them
            with m.stage("batch_stats"):
                partials = be.batch_stats(prob, x3)
            with m.stage("stats_finalize"):
                stats = be.finalize(prob, partials, rm, rv, MOMENTUM, True)
            with m.stage("forward"):
                be.forward(prob, x3, stats, w, b)
            with m.stage("backward_reduce"):
                part = be.backward_reduce(prob, x3, dz3, stats, w, b)
            with m.stage("backward_finalize"):
                sums, _, _ = be.backward_finalize(prob, part, w, b)
            with m.stage("backward_elementwise"):
                be.backward_elementwise(prob, x3, dz3, stats, sums, w, b, True)
            # the composite stages through the public buffer API
            x, dz, w, b, rm, rv = _inputs(shape, pair, layout, seed=1)
            holder = {}
            with m.stage("forward (train)"):
                holder["ctx"] = ops.forward(x, w, b, rm, rv, training=True, momentum=MOMENTUM,
                                            eps=EPS, activation=ACTIVATION,
                                            activation_param=SLOPE, backend="emulator")
            with m.stage("backward (train)"):
                ops.backward(holder["ctx"], x, dz)
            with m.stage("forward (eval)"):
                ops.forward(x, w, b, rm, rv, training=False, eps=EPS, activation=ACTIVATION,
                            activation_param=SLOPE, backend="emulator")
            # the residual form z = act(BN(x) + r): r is read once more in forward and once in
            # each backward pass, and dr is written by the elementwise pass
            x, dz, w, b, rm, rv = _inputs(shape, pair, layout, seed=2)
            r = _inputs(shape, pair, layout, seed=3)[0]
            with m.stage("forward (train, residual)"):
                holder["ctx"] = ops.forward(x, w, b, rm, rv, training=True, momentum=MOMENTUM,
                                            eps=EPS, activation=ACTIVATION,
                                            activation_param=SLOPE, backend="emulator",
                                            residual=r)
            with m.stage("backward (train, residual)"):
                ops.backward(holder["ctx"], x, dz, residual=r)
            itemsize = np.dtype(numpy_dtype(pair.x)).itemsize
            numel = x.size
            for name, ld, st, launches in m.rows:
                rows.append(dict(
                    pair=pair.key, layout=layout, stage=name, shape="x".join(map(str, shape)),
                    itemsize=itemsize, blocks=blocks, launches=launches, loaded_bytes=ld, stored_bytes=st,
                    load_per_elem=ld / numel, store_per_elem=st / numel,
                    tensor_loads=ld // (numel * itemsize), tensor_stores=st // (numel * itemsize),
                    per_channel_bytes=(ld % (numel * itemsize)) + (st % (numel * itemsize))))
    return rows


@contextlib.contextmanager
def _env(name, value):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def launch_rows(settings: Settings) -> list[dict]:
    """Kernel launches per step, through the buffer API and through iabn.torch (CPU tensors
    routed to the emulator with IABN_BACKEND, so the very kernels are counted)."""
    be = backends.get("emulator")
    shape = settings.traffic_shape()
    rows = []
    x, dz, w, b, rm, rv = _inputs(shape, PAIRS[0], "ncs")

    def count(fn):
        n0 = be.launches
        fn()
        return be.launches - n0

    holder = {}
    fwd = count(lambda: holder.setdefault("ctx", ops.forward(x, w, b, rm, rv, backend="emulator")))
    bwd = count(lambda: ops.backward(holder["ctx"], x, dz))
    ev = count(lambda: ops.forward(x, w, b, rm, rv, training=False, backend="emulator"))
    rows += [dict(path="iabn_core.ops", step="forward (train)", launches=fwd),
             dict(path="iabn_core.ops", step="backward (train)", launches=bwd),
             dict(path="iabn_core.ops", step="training step (forward + backward)",
                  launches=fwd + bwd),
             dict(path="iabn_core.ops", step="forward (eval)", launches=ev)]
    try:
        import torch
        from iabn.torch import InPlaceABN
    except ImportError as exc:  # keep the core counts when the adapter is unavailable
        rows.append(dict(path="iabn.torch.InPlaceABN", step="training step",
                         launches=f"not measured: {exc}"))
        return rows
    mod = InPlaceABN(shape[1], activation=ACTIVATION, activation_param=SLOPE)
    t = torch.from_numpy(np.array(x)).requires_grad_()
    with _env("IABN_BACKEND", "emulator"):
        step = count(lambda: mod(t.clone()).backward(torch.ones(shape)))
        mod.eval()
        with torch.no_grad():
            ev = count(lambda: mod(t.detach().clone()))
    rows += [dict(path="iabn.torch.InPlaceABN", step="training step (forward + backward)",
                  launches=step),
             dict(path="iabn.torch.InPlaceABN", step="forward (eval)", launches=ev)]
    return rows


# ------------------------------------------------------------------------------------------
# NVRTC compile time
# ------------------------------------------------------------------------------------------
def compile_rows(settings: Settings) -> list[dict]:
    """Cold NVRTC compile time per module: iabn_core.nvrtc.compile_module drives NVRTC with no
    GPU and no cache, so every call is a full cold compile of that module for one arch."""
    from iabn_core.nvrtc import compile_module

    wanted = settings.compile_pairs()
    rows = []
    for spec in inst.all_modules():
        if wanted is not None and spec.pair.key not in wanted:
            continue
        t0 = time.perf_counter()
        compile_module(spec, settings.compile_arch)
        rows.append(dict(kind="cold (NVRTC, device-free)", module=spec.filename,
                         pair=spec.pair.key, arch=settings.compile_arch,
                         kernels=len(spec.names), seconds=time.perf_counter() - t0))
    return rows


_GPU_PROBE = r"""
import sys, time
from iabn_core import instantiations as inst
from iabn_core.backends.cuda import CudaRuntime
rt = CudaRuntime()
wanted = sys.argv[1].split(",") if sys.argv[1] else None
for spec in inst.all_modules():
    if wanted and spec.pair.key not in wanted:
        continue
    t0 = time.perf_counter()
    rt.function(spec, spec.names[0])  # compiles (or loads) the whole module
    print(spec.filename, spec.pair.key, time.perf_counter() - t0, flush=True)
"""


def gpu_compile_rows(settings: Settings, cache_dir: str) -> list[dict]:
    """Cold and warm module load through CuPy on the GPU: two fresh processes sharing an
    empty CUPY_CACHE_DIR; the first compiles with NVRTC and fills the cache, the second is
    the warm path every later process takes (disk cache hit + cubin load)."""
    wanted = settings.compile_pairs()
    env = dict(os.environ, CUPY_CACHE_DIR=cache_dir)
    rows = []
    for kind in ("cold (CuPy, empty disk cache)", "warm (CuPy disk cache hit)"):
        out = subprocess.run([sys.executable, "-c", _GPU_PROBE, ",".join(wanted or ())],
                             env=env, capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            module, pair, secs = line.split()
            rows.append(dict(kind=kind, module=module, pair=pair, arch="device",
                             kernels=len(inst.module_for(module, _pair(pair)).names),
                             seconds=float(secs)))
    return rows


def _pair(key):
    return next(p for p in PAIRS if p.key == key)

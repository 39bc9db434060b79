"""Host overhead per layer: microseconds of Python/C++ host work per call of one BN+LeakyReLU
layer, iabn's InPlaceABN module vs torch eager (nn.BatchNorm2d + in-place leaky_relu).

The input is tiny, so the compute is negligible and what is timed is the per-call path:
  path "cpu":  CPU tensors; iabn runs its NumPy backend.
  path "null": CPU tensors with IABN_BACKEND=null, so iabn takes the CUDA path's host code
               (module -> autograd.Function -> core -> KernelBackend: validation, plans,
               workspaces, marshalling, one call per launch) with no-op launches
               (iabn_core/backends/null.py). Compare it with torch's "cpu" rows: what the
               host must do per layer before a GPU sees any work.
  path "cuda" / "cuda-events" (GPU machines only): real CUDA tensors, host wall clock per
               call (no synchronisation inside the loop) and CUDA-event time per call.
Stages: "forward" (training forward with autograd recording), "backward" (autograd.grad over
the layer's graph, built untimed) and "step" (clone -> forward -> backward, all timed).
Timings run single-threaded (torch.set_num_threads(1)) and report the median per call of the
thread's CPU time (time.thread_time_ns): the host work itself, which is what a GPU waits on,
without the time the thread spends descheduled on a shared machine. The implementations take
turns call by call, so drifting load hits them alike.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from .cases import ACTIVATION, EPS, MOMENTUM, SLOPE, Settings

STAGES = ("forward", "backward", "step")
SHAPE = (2, 8, 4, 4)  # tiny on purpose: the compute must not hide the host work
# Targets of issue 11, per training step vs torch eager on the same machine.
TARGETS = {"null": 3.0, "cpu": 5.0}


class TorchBNAct(nn.Module):
    """The standard pair as a module: BatchNorm2d, then leaky_relu in place on its output."""

    def __init__(self, c):
        super().__init__()
        self.bn = nn.BatchNorm2d(c, eps=EPS, momentum=MOMENTUM)

    def forward(self, x):
        return F.leaky_relu(self.bn(x), SLOPE, inplace=True)


def _modules(c, device):
    from iabn.torch import InPlaceABN

    return {"torch": TorchBNAct(c).to(device),
            "iabn": InPlaceABN(c, eps=EPS, momentum=MOMENTUM, activation=ACTIVATION,
                               activation_param=SLOPE).to(device)}


@contextlib.contextmanager
def _backend_env(value):
    old = os.environ.get("IABN_BACKEND")
    if value is None:
        os.environ.pop("IABN_BACKEND", None)
    else:
        os.environ["IABN_BACKEND"] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("IABN_BACKEND", None)
        else:
            os.environ["IABN_BACKEND"] = old


@contextlib.contextmanager
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def closures(mod, x, dy, stage):
    """(setup, run) of one stage; setup's work (the clone that gives each call a fresh
    non-leaf input, the graph backward walks) is not timed, except in "step"."""
    x_leaf = x.detach().clone().requires_grad_()
    wrt = (x_leaf,) + tuple(mod.parameters())
    if stage == "forward":
        return x_leaf.clone, mod
    if stage == "backward":
        return (lambda: mod(x_leaf.clone()),
                lambda y: torch.autograd.grad(y, wrt, dy))
    if stage == "step":
        return (lambda: None,
                lambda _: torch.autograd.grad(mod(x_leaf.clone()), wrt, dy))
    raise ValueError(stage)


def host_us(cases: dict, warmup: int, iters: int, sync=None) -> dict:
    """Median host CPU microseconds (this thread's) of run(setup()) per named (setup, run)
    pair. The pairs take turns call by call, so a machine whose load drifts (other processes
    sharing the cores, caches) slows them alike and their ratios stay fair."""
    for setup, run in cases.values():
        for _ in range(warmup):
            run(setup())
    times = {name: [] for name in cases}
    clock = time.thread_time_ns
    for _ in range(iters):
        for name, (setup, run) in cases.items():
            state = setup()
            t0 = clock()
            run(state)
            times[name].append((clock() - t0) * 1e-3)
            del state
    if sync is not None:
        sync()
    return {name: statistics.median(t) for name, t in times.items()}


def _launch_counter(path):
    """() -> kernel launches so far by the backend iabn.torch uses on this path, or None."""
    if path == "null":
        from iabn.torch_ops import _null_backend

        be = _null_backend()
        return lambda: be.launches
    if path == "cuda":
        from iabn.torch_ops import _backend_for

        be = _backend_for(torch.empty(0, device="cuda"))
        return lambda: be.launches
    return None


def _iterations(settings: Settings) -> tuple[int, int]:
    return (20, 200) if settings.tiny else (200, 3000)


def _measure(runs, settings, rows, event_timer=None):
    """runs: (impl, path, device, IABN_BACKEND value) per row group; all groups of one stage
    are timed together, taking turns (host_us)."""
    warmup, iters = _iterations(settings)
    g = torch.Generator().manual_seed(settings.seed)
    x0 = torch.randn(SHAPE, generator=g)
    dy0 = torch.randn(SHAPE, generator=g)
    for stage in STAGES:
        cases, launches = {}, {}
        for impl, path, device, backend in runs:
            mod = _modules(SHAPE[1], device)[impl]
            setup, run = closures(mod, x0.to(device), dy0.to(device), stage)
            setup = _with_backend(backend, setup)
            cases[(impl, path)] = (setup, run)
            counter = _launch_counter(path) if impl == "iabn" else None
            if counter is not None:  # one extra call, counted (machine-independent)
                state = setup()
                n0 = counter()
                run(state)
                launches[(impl, path)] = counter() - n0
            if event_timer is not None and device == "cuda":
                us = 1e3 * event_timer(setup, run, warmup, iters)
                rows.append(dict(impl=impl, path="cuda-events", stage=stage, us_per_call=us,
                                 launches=launches.get((impl, path))))
        sync = torch.cuda.synchronize if any(r[2] == "cuda" for r in runs) else None
        for (impl, path), us in host_us(cases, warmup, iters, sync).items():
            rows.append(dict(impl=impl, path=path, stage=stage, us_per_call=us,
                             launches=launches.get((impl, path))))


def _with_backend(value, setup):
    """setup that first sets IABN_BACKEND to `value` (None: unset) for the call that follows;
    part of the untimed setup, so no row pays for it."""
    def wrapped():
        if value is None:
            os.environ.pop("IABN_BACKEND", None)
        else:
            os.environ["IABN_BACKEND"] = value
        return setup()
    return wrapped


def overhead_rows(settings: Settings, gpu: bool = False) -> list[dict]:
    """Rows impl, path, stage, us_per_call, launches (launches: iabn on kernel paths only)."""
    rows: list[dict] = []
    runs = [("torch", "cpu", "cpu", None), ("iabn", "cpu", "cpu", None),
            ("iabn", "null", "cpu", "null")]
    with _one_thread(), _backend_env(None):  # restores the caller's IABN_BACKEND
        _measure(runs, settings, rows)
        if gpu:
            from .speed import CudaTimer

            _measure([("torch", "cuda", "cuda", None), ("iabn", "cuda", "cuda", None)],
                     settings, rows, event_timer=CudaTimer("cuda"))
    return rows


def _lookup(rows, impl, path, stage):
    for r in rows:
        if (r["impl"], r["path"], r["stage"]) == (impl, path, stage):
            return r
    return None


def ratios(rows) -> list[dict]:
    """iabn / torch per (path, stage); the null path is judged against torch's CPU rows."""
    out = []
    for path in ("cpu", "null", "cuda", "cuda-events"):
        base_path = "cpu" if path == "null" else path
        for stage in STAGES:
            r, t = _lookup(rows, "iabn", path, stage), _lookup(rows, "torch", base_path, stage)
            if r is None or t is None:
                continue
            out.append(dict(path=path, stage=stage, torch_us=t["us_per_call"],
                            iabn_us=r["us_per_call"], ratio=r["us_per_call"] / t["us_per_call"],
                            launches=r["launches"]))
    return out


def summary_section(rows) -> list[str]:
    from .report import _table

    table = [[r["path"], r["stage"], f"{r['torch_us']:.1f}", f"{r['iabn_us']:.1f}",
              f"{r['ratio']:.2f}x", "" if r["launches"] is None else r["launches"]]
             for r in ratios(rows)]
    md = ["Median host CPU microseconds per call (thread CPU time) of one BN+LeakyReLU layer on a "
          f"{'x'.join(map(str, SHAPE))} float32 input (one thread). `null` = the CUDA path's "
          "host code with no-op launches (IABN_BACKEND=null), compared with torch's CPU "
          "eager layer; torch column of `null` rows = torch on CPU tensors.", ""]
    md += _table(["path", "stage", "torch eager (us)", "iabn (us)", "iabn / torch",
                  "launches"], table)
    md += ["Targets (issue 11, reported, not asserted): " + "; ".join(
        f"{path} step <= {want:.0f}x: " + _verdict(path, want, rows)
        for path, want in TARGETS.items()), ""]
    return md


def _verdict(path, want, rows) -> str:
    r = next((r for r in ratios(rows) if r["path"] == path and r["stage"] == "step"), None)
    if r is None:
        return "not measured"
    return f"{r['ratio']:.2f}x ({'met' if r['ratio'] <= want else 'missed'})"

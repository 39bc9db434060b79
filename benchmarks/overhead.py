"""Host overhead per layer: microseconds of Python/C++ host work per call of one BN+LeakyReLU
layer, iabn's InPlaceABN module vs torch eager (nn.BatchNorm2d + in-place leaky_relu).

The input is tiny, so the compute is negligible and what is timed is the per-call path:
  path "cpu":  CPU tensors; iabn runs its NumPy backend.
  path "null": CPU tensors with IABN_BACKEND=null, so iabn takes the CUDA path's host code
               (module -> autograd.Function -> core -> KernelBackend: validation, plans,
               workspaces, marshalling, one call per launch) with no-op launches
               (iabn_core/backends/null.py). Compare it with torch's "cpu:null" rows (torch
               on CPU tensors, timed in the same pairing): what the
               host must do per layer before a GPU sees any work.
  path "cuda" / "cuda-events" (GPU machines only): real CUDA tensors, host wall clock per
               call (no synchronisation inside the loop) and CUDA-event time per call.
Stages: "forward" (training forward with autograd recording), "backward" (autograd.grad over
the layer's graph, built untimed) and "step" (clone -> forward -> backward, all timed).
Variants (null path, each against torch's CPU layer in the same form): "plain", "residual"
(iabn's fused residual vs BN -> add -> LeakyReLU), "channels_last", "eval", "float16" and
"bfloat16" (16-bit input, float32 parameters: the autocast case).
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
VARIANTS = ("plain", "residual", "channels_last", "eval", "float16", "bfloat16")
SHAPE = (2, 8, 4, 4)  # tiny on purpose: the compute must not hide the host work
# Targets of issue 19 vs torch eager on the same machine: the null path's training step (every
# variant) and forward (plain); the NumPy backend's step must not regress past 4x.
TARGETS = {"null": 1.0, "cpu": 4.0}
FORWARD_TARGET = 0.8
FRAME_BUDGET = 30


class TorchBNAct(nn.Module):
    """The standard pair as a module: BatchNorm2d, then leaky_relu in place on its output
    (with a residual: BatchNorm2d -> add -> leaky_relu, the post-activation residual block)."""

    def __init__(self, c):
        super().__init__()
        self.bn = nn.BatchNorm2d(c, eps=EPS, momentum=MOMENTUM)

    def forward(self, x, residual=None):
        y = self.bn(x)
        if residual is not None:
            y = y + residual
        return F.leaky_relu(y, SLOPE, inplace=True)


def _modules(c, device):
    from iabn.torch import InPlaceABN

    return {"torch": TorchBNAct(c).to(device),
            "iabn": InPlaceABN(c, eps=EPS, momentum=MOMENTUM, activation=ACTIVATION,
                               activation_param=SLOPE).to(device)}


def _variant_input(x, variant):
    if variant == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if variant in ("float16", "bfloat16"):
        return x.to(getattr(torch, variant))
    return x


def _set_backend(value) -> None:
    """IABN_BACKEND set to `value`, or unset for None."""
    if value is None:
        os.environ.pop("IABN_BACKEND", None)
    else:
        os.environ["IABN_BACKEND"] = value


@contextlib.contextmanager
def _backend_env(value):
    old = os.environ.get("IABN_BACKEND")
    _set_backend(value)
    try:
        yield
    finally:
        _set_backend(old)


@contextlib.contextmanager
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def closures(mod, x, dy, stage, residual=None):
    """(setup, run) of one stage; setup's work (the clone that gives each call a fresh
    non-leaf input, the graph backward walks) is not timed, except in "step"."""
    x_leaf = x.detach().clone().requires_grad_()
    wrt = (x_leaf,) + tuple(p for p in mod.parameters())
    args = () if residual is None else (residual,)
    if residual is not None:
        wrt = wrt + (residual,)
    if stage == "forward":
        return x_leaf.clone, lambda xx: mod(xx, *args)
    if stage == "backward":
        return (lambda: mod(x_leaf.clone(), *args),
                lambda y: torch.autograd.grad(y, wrt, dy))
    if stage == "step":
        return (lambda: None,
                lambda _: torch.autograd.grad(mod(x_leaf.clone(), *args), wrt, dy))
    raise ValueError(stage)


def python_calls(fn, *args) -> int:
    """Python frames entered ('call' events of sys.setprofile) while fn(*args) runs, fn's
    own included."""
    import sys

    n = [0]

    def prof(frame, event, arg):
        if event == "call":
            n[0] += 1

    sys.setprofile(prof)
    try:
        fn(*args)
    finally:
        sys.setprofile(None)
    return n[0]


def frames_per_step(step, x, dy, residual=None) -> int:
    """Python frames (python_calls) of one training step beyond the same step without the
    layer (clone, and the add when there is a residual). `step` is the "step" stage's run
    closure (closures(..., "step", residual)), taken as it is timed."""
    x_leaf = x.detach().clone().requires_grad_()
    # The floor takes (and ignores) step's argument too: both are called alike, and each
    # lambda's own frame is counted on both sides of the difference.
    if residual is None:
        floor = lambda _: torch.autograd.grad(x_leaf.clone(), (x_leaf,), dy)  # noqa: E731
    else:
        floor = lambda _: torch.autograd.grad(x_leaf.clone() + residual,  # noqa: E731
                                              (x_leaf, residual), dy)
    counts = []
    for fn in (step, floor):
        for _ in range(3):  # the signature's first call takes the general path
            fn(None)
        counts.append(python_calls(fn, None))
    return counts[0] - counts[1]


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


def _measure(runs, settings, rows, event_timer=None, variant="plain"):
    """runs: (impl, path, device, IABN_BACKEND value) per row group; all groups of one stage
    are timed together, taking turns (host_us)."""
    warmup, iters = _iterations(settings)
    g = torch.Generator().manual_seed(settings.seed)
    x0 = torch.randn(SHAPE, generator=g)
    dy0 = torch.randn(SHAPE, generator=g)
    r0 = torch.randn(SHAPE, generator=g) if variant == "residual" else None
    for stage in STAGES:
        cases, launches, frames = {}, {}, {}
        for impl, path, device, backend in runs:
            mod = _modules(SHAPE[1], device)[impl]
            if variant == "eval":
                mod.eval()
            x, dy = _variant_input(x0.to(device), variant), _variant_input(dy0.to(device), variant)
            r = None if r0 is None else r0.to(device).requires_grad_()
            setup, run = closures(mod, x, dy, stage, r)
            setup = _with_backend(backend, setup)
            cases[(impl, path)] = (setup, run)
            counter = _launch_counter(path) if impl == "iabn" else None
            if counter is not None:  # one extra call, counted (machine-independent)
                state = setup()
                n0 = counter()
                run(state)
                launches[(impl, path)] = counter() - n0
            if stage == "step":
                setup()  # sets IABN_BACKEND for the count
                frames[(impl, path)] = frames_per_step(run, x, dy, r)
            if event_timer is not None and device == "cuda":
                us = 1e3 * event_timer(setup, run, warmup, iters)
                rows.append(dict(impl=impl, path="cuda-events", variant=variant, stage=stage,
                                 us_per_call=us, launches=launches.get((impl, path)),
                                 frames=frames.get((impl, path))))
        sync = torch.cuda.synchronize if any(r[2] == "cuda" for r in runs) else None
        for (impl, path), us in host_us(cases, warmup, iters, sync).items():
            rows.append(dict(impl=impl, path=path, variant=variant, stage=stage,
                             us_per_call=us, launches=launches.get((impl, path)),
                             frames=frames.get((impl, path))))


def _with_backend(value, setup):
    """setup that first sets IABN_BACKEND to `value` (None: unset) for the call that follows;
    part of the untimed setup, so no row pays for it."""
    def wrapped():
        _set_backend(value)
        return setup()
    return wrapped


def overhead_rows(settings: Settings, gpu: bool = False) -> list[dict]:
    """Rows impl, path, variant, stage, us_per_call, launches (iabn on kernel paths), frames
    (step rows: Python frames beyond the no-layer floor)."""
    rows: list[dict] = []
    with _one_thread(), _backend_env(None):  # restores the caller's IABN_BACKEND
        # Pairs only: a third implementation taking turns (the NumPy path's heavy Python)
        # would disturb the caches of the two being compared. torch beside null is path
        # "cpu:null" (torch on CPU tensors, timed in the null pairing).
        _measure([("torch", "cpu", "cpu", None), ("iabn", "cpu", "cpu", None)], settings, rows)
        for variant in VARIANTS:
            _measure([("torch", "cpu:null", "cpu", None), ("iabn", "null", "cpu", "null")],
                     settings, rows, variant=variant)
        if gpu:
            from .speed import CudaTimer

            for variant in VARIANTS:
                _measure([("torch", "cuda", "cuda", None), ("iabn", "cuda", "cuda", None)],
                         settings, rows, event_timer=CudaTimer("cuda"), variant=variant)
    return rows


def _lookup(rows, impl, path, stage, variant="plain"):
    for r in rows:
        if (r["impl"], r["path"], r["stage"], r.get("variant", "plain")) == (
                impl, path, stage, variant):
            return r
    return None


def ratios(rows) -> list[dict]:
    """iabn / torch per (path, variant, stage); null rows are judged against torch's CPU rows."""
    out = []
    for path in ("cpu", "null", "cuda", "cuda-events"):
        base_path = "cpu:null" if path == "null" else path
        for variant in VARIANTS:
            for stage in STAGES:
                r = _lookup(rows, "iabn", path, stage, variant)
                t = _lookup(rows, "torch", base_path, stage, variant)
                if r is None or t is None:
                    continue
                out.append(dict(path=path, variant=variant, stage=stage,
                                torch_us=t["us_per_call"], iabn_us=r["us_per_call"],
                                ratio=r["us_per_call"] / t["us_per_call"],
                                launches=r["launches"], frames=r.get("frames"),
                                torch_frames=t.get("frames")))
    return out


def summary_section(rows) -> list[str]:
    from .report import _table

    def blank(v):
        return "" if v is None else v

    rs = ratios(rows)  # one pass over the rows for the table and every verdict below
    table = [[r["path"], r["variant"], r["stage"], f"{r['torch_us']:.1f}", f"{r['iabn_us']:.1f}",
              f"{r['ratio']:.2f}x", blank(r["launches"]),
              "" if r["frames"] is None else f"{r['frames']} / {r['torch_frames']}"]
             for r in rs]
    md = ["Median host CPU microseconds per call (thread CPU time) of one BN+LeakyReLU layer on a "
          f"{'x'.join(map(str, SHAPE))} input (one thread). `null` = the CUDA path's "
          "host code with no-op launches (IABN_BACKEND=null), compared with torch's CPU "
          "eager layer in the same form; torch column of `null` rows = torch on CPU tensors. "
          "frames = Python frames per training step beyond the no-layer floor (iabn / torch).",
          ""]
    md += _table(["path", "variant", "stage", "torch eager (us)", "iabn (us)", "iabn / torch",
                  "launches", "frames"], table)
    md += ["Targets (issue 19, reported, not asserted): " + "; ".join(
        [f"{path} step <= {want:.1f}x: " + _verdict(path, "step", want, rs)
         for path, want in TARGETS.items()]
        + [f"null forward <= {FORWARD_TARGET}x: "
           + _verdict("null", "forward", FORWARD_TARGET, rs),
           f"null step, slowest variant <= {TARGETS['null']:.1f}x: "
           + _worst_variant(rs, TARGETS["null"]),
           f"frames per step <= {FRAME_BUDGET}: " + _frames_verdict(rs)]), ""]
    return md


# The verdict helpers take ratios(rows), not the rows.
def _verdict(path, stage, want, rs) -> str:
    r = next((r for r in rs if r["path"] == path and r["stage"] == stage
              and r["variant"] == "plain"), None)
    if r is None:
        return "not measured"
    return f"{r['ratio']:.2f}x ({'met' if r['ratio'] <= want else 'missed'})"


def _worst_variant(rs, want) -> str:
    steps = [r for r in rs if r["path"] == "null" and r["stage"] == "step"]
    if not steps:
        return "not measured"
    worst = max(steps, key=lambda r: r["ratio"])
    return (f"{worst['ratio']:.2f}x, {worst['variant']} "
            f"({'met' if worst['ratio'] <= want else 'missed'})")


def _frames_verdict(rs) -> str:
    fs = [r["frames"] for r in rs if r["path"] == "null" and r["stage"] == "step"
          and r["frames"] is not None]
    if not fs:
        return "not measured"
    return f"at most {max(fs)} ({'met' if max(fs) <= FRAME_BUDGET else 'missed'})"

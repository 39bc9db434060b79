"""Speed of one BN+LeakyReLU layer: iabn vs eager PyTorch, torch.compile and checkpointing.

Every implementation is checked against a float64 reference before it is timed (a wrong kernel
is never timed), then warmed up and timed per iteration between CUDA events; all baselines run
in the same process on the same inputs, so the ratios compare like with like. Each iteration's
setup (cloning the input, building the graph to backpropagate through) runs outside the timed
window. The timed window includes whatever the host makes the GPU wait for (Python, launch
latency): on small shapes that overhead is part of what a training step pays.
"""
from __future__ import annotations

import math
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .cases import ACTIVATION, EPS, MOMENTUM, SLOPE, BNCase, Settings, bn_inputs

IMPLS = ("iabn", "eager", "compiled", "checkpoint")
BASELINES = IMPLS[1:]
MODES = ("forward", "backward", "full")
# Largest error allowed relative to max |reference| of each output, by input dtype.
TOL = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 6e-2}


def eager_bn_act(x, w, b, rm, rv):
    """The standard pair: batch_norm then an in-place leaky_relu (no extra buffer)."""
    y = F.batch_norm(x, rm, rv, w, b, True, MOMENTUM, EPS)
    return F.leaky_relu(y, SLOPE, inplace=True)


def iabn_bn_act(x, w, b, rm, rv):
    from iabn.torch import inplace_abn

    return inplace_abn(x, w, b, rm, rv, True, MOMENTUM, EPS, ACTIVATION, SLOPE)


def checkpointed_bn_act(x, w, b, rm, rv):
    """The paper's checkpointing baseline: only x is stored; BN+act is recomputed in backward.
    (The recomputation updates the running statistics a second time; timing is unaffected.)"""
    return checkpoint(eager_bn_act, x, w, b, rm, rv, use_reentrant=False)


def allow_recompiles() -> None:
    """Every shape (or model instance) is a new static graph; the default recompile limit (8)
    would silently fall back to eager after the eighth and a "compiled" figure would lie."""
    cfg = torch._dynamo.config
    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, 4096)


def implementations(with_compile: bool) -> dict:
    impls = {"iabn": iabn_bn_act, "eager": eager_bn_act, "checkpoint": checkpointed_bn_act}
    if with_compile:
        allow_recompiles()
        impls["compiled"] = torch.compile(eager_bn_act, dynamic=False)
    return impls


# ------------------------------------------------------------------------------------------
# correctness first
# ------------------------------------------------------------------------------------------
def _run_once(fn, x, dy, w, b):
    """(y, dx, dw, db) of fn on fresh copies; x enters as a non-leaf so iabn may overwrite it."""
    x_leaf = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    b = b.detach().clone().requires_grad_()
    rm = torch.zeros_like(w, requires_grad=False)
    rv = torch.ones_like(w, requires_grad=False)
    y = fn(x_leaf.clone(), w, b, rm, rv)
    dx, dw, db = torch.autograd.grad(y, (x_leaf, w, b), dy)
    return [t.detach() for t in (y, dx, dw, db)]


def _errors(got, ref) -> tuple[float, str]:
    """(largest error, per-output note) of (y, dx, dw, db) against the reference, each error
    relative to max |reference| of that output: one definition for every implementation
    and for the cuDNN-free diagnostic, so their notes read alike."""
    each = [float((g.double() - r).abs().max() / r.abs().max().clamp_min(1e-30))
            for g, r in zip(got, ref)]
    return max(each), " ".join(f"{o} {e:.2e}" for o, e in zip(("y", "dx", "dw", "db"), each))


# check()'s extra entry when eager fails: eager rerun with cuDNN disabled. Its note is always
# reported, pass or fail (case_rows): it is evidence, not a baseline.
DIAGNOSTIC = "eager_nocudnn"


def check(impls: dict, case: BNCase, inp: dict, details: dict | None = None) -> dict:
    """Max relative error of y, dx, dweight, dbias per implementation vs a float64 eager
    reference. iabn's scale is gamma = |w| + eps with w > 0, so the others get w + eps.

    The shared inputs are compared with a snapshot after every implementation and restored
    if it changed them, so one implementation writing into an input cannot fail the others
    (the first H200 run showed eager failing on some shapes after iabn had run). `details`,
    when given, receives per implementation the error of each output and any input changed."""
    w_eff = inp["w"] + EPS
    ref = _run_once(eager_bn_act, inp["x"].double(), inp["dy"].double(), w_eff.double(),
                    inp["b"].double())
    snapshot = {k: v.clone() for k, v in inp.items()}
    errs = {}
    for name, fn in impls.items():
        note = ""
        try:
            got = _run_once(fn, inp["x"], inp["dy"], inp["w"] if name == "iabn" else w_eff,
                            inp["b"])
            errs[name], note = _errors(got, ref)
        except Exception as exc:  # a baseline that cannot run this case is reported, not fatal
            errs[name] = f"error: {type(exc).__name__}: {exc}".splitlines()[0][:200]
        changed = [k for k, v in inp.items() if not torch.equal(v, snapshot[k])]
        for k in changed:
            inp[k].copy_(snapshot[k])
        if changed:
            note += f"; changed inputs: {','.join(changed)}"
        if details is not None:
            details[name] = note
    if "eager" in errs and not passed(errs["eager"], case.dtype):
        # Evidence for the next reader: torch eager disagreeing with the float64 reference
        # (which runs torch's native kernels: cuDNN has no float64 BN). The same eager
        # function with cuDNN disabled says whether cuDNN's kernel is the one that differs.
        with torch.backends.cudnn.flags(enabled=False):
            got = _run_once(eager_bn_act, inp["x"], inp["dy"], w_eff, inp["b"])
        errs[DIAGNOSTIC], note = _errors(got, ref)
        if details is not None:
            details[DIAGNOSTIC] = "diagnostic, eager with cuDNN disabled: " + note
    return errs


def passed(err, dtype: str) -> bool:
    return isinstance(err, float) and math.isfinite(err) and err <= TOL[dtype]


# ------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------
class CudaTimer:
    """Median milliseconds of run(setup()) between CUDA events recorded on the current stream;
    one synchronisation at the end, none inside the loop."""

    def __init__(self, device):
        self.device = device

    def __call__(self, setup, run, warmup: int, iters: int) -> float:
        for _ in range(warmup):
            run(setup())
        torch.cuda.synchronize(self.device)
        pairs = []
        for _ in range(iters):
            state = setup()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            run(state)
            end.record()
            pairs.append((start, end))
            del state
        torch.cuda.synchronize(self.device)
        return statistics.median(s.elapsed_time(e) for s, e in pairs)


class WallTimer:
    """Host wall-clock median, for exercising this module on a CPU (tests); never reported."""

    def __call__(self, setup, run, warmup: int, iters: int) -> float:
        for _ in range(warmup):
            run(setup())
        times = []
        for _ in range(iters):
            state = setup()
            t0 = time.perf_counter()
            run(state)
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


def closures(fn, inp: dict, mode: str):
    """(setup, run) for one mode. The graph to backpropagate through (backward mode) and the
    clone that gives every iteration a fresh non-leaf input are built in setup, untimed;
    gradients are taken w.r.t. x, weight and bias as in training."""
    x_leaf = inp["x"].detach().clone().requires_grad_()
    w = inp["w"].detach().clone().requires_grad_()
    b = inp["b"].detach().clone().requires_grad_()
    rm, rv = inp["rm"].clone(), inp["rv"].clone()
    dy, params = inp["dy"], (x_leaf, w, b)
    if mode == "forward":
        return x_leaf.clone, lambda xin: fn(xin, w, b, rm, rv)
    if mode == "backward":
        return (lambda: fn(x_leaf.clone(), w, b, rm, rv),
                lambda y: torch.autograd.grad(y, params, dy))
    if mode == "full":
        return x_leaf.clone, lambda xin: torch.autograd.grad(fn(xin, w, b, rm, rv), params, dy)
    raise ValueError(mode)


def copy_bandwidth(device, timer, nbytes: int = 1 << 30, warmup=3, iters=20) -> float:
    """Device-to-device copy bandwidth in GB/s (read + write counted), the practical ceiling
    for a memory-bound kernel, measured in the same process as the kernels it judges. The
    buffers must be well beyond the L2 cache (50 MiB on an H100) or it measures the cache."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = timer(lambda: None, lambda _: dst.copy_(src), warmup, iters)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def case_rows(case: BNCase, impls: dict, device, timer, settings: Settings, passes: dict,
              copy_gbps: float | None) -> list[dict]:
    """One row per mode: check results, median ms per implementation, ratios and iabn's
    achieved bandwidth. `passes[mode]` = whole-tensor reads + writes iabn makes in that mode."""
    warmup, iters = settings.timing()
    base = _base(case)
    try:
        inp = bn_inputs(case, device, settings.seed)
        details = {}
        errs = check(impls, case, inp, details)
    except torch.cuda.OutOfMemoryError as exc:
        return [dict(base, mode=m, status=f"skipped: out of memory ({exc})"[:200]) for m in MODES]
    ok = {name: passed(err, case.dtype) for name, err in errs.items()}
    # per-output errors of whatever failed, or changed an input, so a failure says where,
    # and the diagnostic's whenever it ran
    detail = " | ".join(f"{name}: {details[name]}" for name in errs
                        if not ok[name] or "changed" in details.get(name, "")
                        or name == DIAGNOSTIC)
    rows = []
    for mode in MODES:
        row = dict(base, mode=mode, check_detail=detail)
        for name in IMPLS:
            row[f"{name}_check_err"] = errs.get(name, "not run")
        if not ok.get("iabn"):
            row["status"] = f"iabn failed the correctness check: not timed ({detail})"
            rows.append(row)
            continue
        for name, fn in impls.items():
            if not ok[name]:
                row[f"{name}_ms"] = None  # a failing baseline is not a baseline
                continue
            try:
                row[f"{name}_ms"] = timer(*closures(fn, inp, mode), warmup, iters)
            except Exception as exc:  # OOM or a baseline failing on this shape: that cell only
                row[f"{name}_ms"] = None
                row[f"{name}_error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        t = row.get("iabn_ms")
        for name in BASELINES:
            tb = row.get(f"{name}_ms")
            row[f"speedup_vs_{name}"] = tb / t if (t and tb) else None
        itemsize = torch.empty((), dtype=inp["x"].dtype).element_size()
        if t and passes.get(mode) and copy_gbps:
            gbps = passes[mode] * case.numel * itemsize / (t * 1e-3) / 1e9
            row.update(iabn_gbps=gbps, copy_gbps=copy_gbps, bw_fraction=gbps / copy_gbps)
        row["status"] = "ok"
        rows.append(row)
    return rows


def prioritized(cases: list[BNCase]) -> list[BNCase]:
    """Round robin over the case groups (family, batch, dtype, layout), so that the first k
    cases a time budget allows cover every group rather than the first group only."""
    groups: dict = {}
    for case in cases:
        groups.setdefault((case.family, case.n, case.dtype, case.layout), []).append(case)
    out, queues = [], list(groups.values())
    while any(queues):
        out += [q.pop(0) for q in queues if q]
    return out


def speed_rows(settings: Settings, device, passes: dict, timer=None, cases=None,
               progress=print) -> tuple[list[dict], float]:
    """All speed rows and the copy bandwidth (GB/s) they are judged against, without the
    torch.compile baseline (add_compiled adds it afterwards: compiling is the slow part).

    Under a deadline (settings.time_left) cases run in prioritized order and a case that
    would not finish in time is reported as not run; rows come back in the cases' order."""
    timer = timer or CudaTimer(device)
    impls = implementations(False)
    copy_gbps = copy_bandwidth(device, timer, nbytes=(1 << 28) if settings.tiny else (1 << 30))
    cases = settings.speed_cases() if cases is None else cases
    by_case, cost = {}, 0.0
    for i, case in enumerate(prioritized(cases)):
        if settings.time_left() < cost:
            by_case[case] = [dict(_base(case), mode=m, status="not run: time budget")
                             for m in MODES]
            continue
        progress(f"  speed {i + 1}/{len(cases)} {case.label}")
        t0 = time.monotonic()
        by_case[case] = case_rows(case, impls, device, timer, settings, passes, copy_gbps)
        cost = max(cost, time.monotonic() - t0)
        if device != "cpu":
            torch.cuda.empty_cache()
    return [r for case in cases for r in by_case[case]], copy_gbps


COMPILE_GUESS_S = 20.0  # first torch.compile of one shape (3 modes), before any is measured


def add_compiled(rows: list[dict], settings: Settings, device, timer=None,
                 progress=print) -> int:
    """Adds the torch.compile baseline to rows measured by speed_rows, case by case in
    prioritized order until the deadline; returns how many cases got it. A case left out
    says so in compiled_error."""
    timer = timer or CudaTimer(device)
    fn = implementations(True)["compiled"]
    warmup, iters = settings.timing()
    cases = list(dict.fromkeys(_case(r) for r in rows if r.get("status") == "ok"))
    done, cost = 0, COMPILE_GUESS_S
    for case in prioritized(cases):
        mine = [r for r in rows if r["label"] == case.label and r.get("status") == "ok"]
        if settings.time_left() < cost:
            for r in mine:
                r["compiled_error"] = "not run: time budget"
            continue
        progress(f"  speed (torch.compile) {done + 1}/{len(cases)} {case.label}")
        t0 = time.monotonic()
        inp = bn_inputs(case, device, settings.seed)
        err = check({"compiled": fn}, case, inp)["compiled"]
        for r in mine:
            r["compiled_check_err"] = err
            r["compiled_ms"] = None
            if passed(err, case.dtype):
                try:
                    r["compiled_ms"] = timer(*closures(fn, inp, r["mode"]), warmup, iters)
                except Exception as exc:  # that cell only
                    r["compiled_error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
            t, tb = r.get("iabn_ms"), r["compiled_ms"]
            r["speedup_vs_compiled"] = tb / t if (t and tb) else None
        done += 1
        cost = time.monotonic() - t0 if done == 1 else max(cost, time.monotonic() - t0)
        if device != "cpu":
            torch.cuda.empty_cache()
    return done


def _base(case: BNCase) -> dict:
    return dict(label=case.label, family=case.family, n=case.n, c=case.c, h=case.h, w=case.w,
                dtype=case.dtype, layout=case.layout)


def _case(row: dict) -> BNCase:
    return BNCase(row["family"], row["n"], row["c"], row["h"], row["w"], row["dtype"],
                  row["layout"])


def geomean(values) -> float | None:
    vals = [v for v in values if v]
    return math.exp(sum(map(math.log, vals)) / len(vals)) if vals else None

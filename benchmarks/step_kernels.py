"""Kernel profile of one whole training step: the diagnostic behind the float32 ResNet-50
step with the fused residual (issue 20, 4a), the top device kernels of one step, iabn against
iabn_fused, from the same trainer benchmarks.step times.
"""
from __future__ import annotations

import gc
import gzip
import shutil
import tempfile
from pathlib import Path

import torch

from . import report, step as _step
from .cases import Settings

PROFILE_KINDS = ("iabn", "iabn_fused")
PROFILE_PRECISION = "float32"


def kernel_profile(settings: Settings, device, out: Path, steps: int = 3,
                   progress=print) -> list[dict]:
    """Device time per kernel name over `steps` eager float32 ResNet-50 training steps, for
    iabn and iabn_fused, after two warm-up steps (kernel loads, allocator). Kernel names
    carry the template arguments (dtype, vector width, layout), memcpy/memset rows the
    copies: what the two kinds spend differently is what the rows differ in. Each kind's
    trace (grids, blocks, the ops behind each kernel) goes to step_kernels_<kind>.json.gz.
    On a CPU the same pass times CPU ops by self time instead (no kernels to see)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.device(device).type == "cuda"
    setup = next(s for s in settings.step_setups() if s.net == "resnet50")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    rows = []
    for kind in [k for k in PROFILE_KINDS if k in _step.kinds()]:
        base = dict(kind=kind, precision=PROFILE_PRECISION, batch=setup.batches[0],
                    timing="CUDA kernels (device time)" if cuda else "CPU ops (self time)")
        if settings.time_left() < _step.GUESS_S[False]:
            rows.append(dict(base, name="-", status="not run: time budget"))
            continue
        progress(f"  kernel profile {setup.net} {PROFILE_PRECISION} {kind}")
        step, _model = _step._trainer(setup, PROFILE_PRECISION, kind, "eager", device)
        for _ in range(2):
            step()
        if cuda:
            torch.cuda.synchronize(device)
        with profile(activities=activities, record_shapes=True) as prof:
            for _ in range(steps):
                step()
            if cuda:
                torch.cuda.synchronize(device)
        totals: dict = {}
        for e in prof.events():
            if e.device_type != (DeviceType.CUDA if cuda else DeviceType.CPU):
                continue
            us = e.time_range.elapsed_us() if cuda else e.self_cpu_time_total
            calls, total = totals.get(e.name, (0, 0.0))
            totals[e.name] = (calls + 1, total + us)
        step_us = sum(t for _, t in totals.values()) / steps
        for name, (calls, total) in sorted(totals.items(), key=lambda kv: -kv[1][1]):
            rows.append(dict(base, name=name, status="ok", calls_per_step=calls / steps,
                             us_per_step=total / steps, share=total / steps / step_us))
        _save_trace(prof, out / f"step_kernels_{kind}.json.gz")
        del step, _model, prof
        gc.collect()
    return rows


def _save_trace(prof, path: Path) -> None:
    """The Chrome trace, gzipped (a few MB of JSON per step otherwise)."""
    with tempfile.TemporaryDirectory() as d:
        raw = Path(d) / "trace.json"
        prof.export_chrome_trace(str(raw))
        with open(raw, "rb") as src, gzip.open(path, "wb") as dst:
            shutil.copyfileobj(src, dst)


def kernel_report(rows: list[dict], device: str, top: int = 25) -> list[str]:
    """Text: each kind's top `top` names by time per step, then the names whose time per
    step differs most between iabn and iabn_fused."""
    ok = [r for r in rows if r["status"] == "ok"]
    lines = [f"Kernel profile of one eager training step ({device}): ResNet-50, batch "
             f"{rows[0]['batch'] if rows else '?'}, {PROFILE_PRECISION}, NCHW; "
             f"{ok[0]['timing'] if ok else 'nothing measured'}; per step, averaged over the "
             "profiled steps.", ""]
    lines += [f"{r['kind']}: {r['status']}" for r in rows if r["status"] != "ok"]
    by = {k: {r["name"]: r for r in ok if r["kind"] == k} for k in PROFILE_KINDS}
    for kind, names in by.items():
        if not names:
            continue
        total = sum(r["us_per_step"] for r in names.values())
        lines += ["", f"== {kind}: {total / 1e3:.2f} ms per step in {len(names)} names",
                  f"{'us/step':>10} {'calls':>6} {'share':>6}  name"]
        for r in list(names.values())[:top]:
            lines.append(f"{r['us_per_step']:10.1f} {r['calls_per_step']:6.1f} "
                         f"{r['share']:6.1%}  {r['name'][:160]}")
    a, b = by[PROFILE_KINDS[0]], by[PROFILE_KINDS[1]]
    if a and b:
        diff = sorted(set(a) | set(b), key=lambda n: -abs(
            b.get(n, {}).get("us_per_step", 0) - a.get(n, {}).get("us_per_step", 0)))
        lines += ["", f"== largest differences ({PROFILE_KINDS[1]} - {PROFILE_KINDS[0]}, "
                  "us per step)", f"{'diff':>10} {PROFILE_KINDS[0]:>10} "
                  f"{PROFILE_KINDS[1]:>10}  name"]
        for n in diff[:top]:
            x, y = (d.get(n, {}).get("us_per_step", 0.0) for d in (a, b))
            lines.append(f"{y - x:+10.1f} {x:10.1f} {y:10.1f}  {n[:160]}")
    return lines + [""]


def write_kernels(out: Path, rows: list[dict], device: str) -> list[str]:
    """step_kernels.csv and step_kernels.txt; the summary's lines."""
    report.write_csv(out / "step_kernels.csv", rows)
    text = kernel_report(rows, device)
    (out / "step_kernels.txt").write_text("\n".join(text))
    # the summary keeps the totals and the top of the differences; the text has the rest
    cut = next((i for i, line in enumerate(text) if line.startswith("== largest")), len(text))
    totals = [line for line in text[:cut] if line.startswith("==")]
    return (["## Kernel profile: float32 ResNet-50 step, iabn vs iabn fused", "",
             "Each kind's top names: `step_kernels.txt` (all names: `step_kernels.csv`, "
             "traces: `step_kernels_<kind>.json.gz`).", "", "```"]
            + text[:2] + totals + text[cut:cut + 12] + ["```", ""])

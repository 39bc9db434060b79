"""python -m benchmarks [--cpu-only] [--tiny] [--out DIR] [--parts ...] [--time-budget S]

Runs every part it can on this machine and writes CSV, PNG and summary.md into
benchmarks/results/<device>/ (or --out), rewritten after every part. GPU parts run only when
torch sees a CUDA device and --cpu-only is not given; otherwise the summary says they did not
run, and why. The torch.compile baselines of `speed` and `step` run after all other parts,
unless --parts places them (`speed_compiled`, `step_compiled`): parts run in --parts order.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from .cases import Settings, comma_list, device_slug
from .summary import write_outputs

PARTS = ("counts", "compile", "saved", "speed", "memory", "step", "overhead", "precision",
         "speed_compiled", "step_compiled", "step_kernels")
GPU_PARTS = ("speed", "memory", "step", "step_kernels")
# A part named here runs that part's torch.compile pass at its place in --parts (reported
# as "<part> (torch.compile)"); a pass not placed so runs after every other part.
COMPILED_PARTS = {"speed_compiled": "speed", "step_compiled": "step"}
# --time-budget: each part's share of the time still left when it starts (the torch.compile
# passes run last), and the least time worth starting it with.
TIME_SHARE = {"speed": 3, "memory": 3, "step": 3, "compile": 1, "speed (torch.compile)": 2,
              "step (torch.compile)": 5, "step_kernels": 1}
TIME_FLOOR_S = {"speed": 15, "memory": 15, "step": 15, "compile": 45, "step_kernels": 15}
# iabn.torch's backward copies the incoming gradient into a fresh buffer in z's layout before
# the kernels overwrite it with dx (adapters/torch_ops.py): one more read and write per element.
ADAPTER_GRAD_COPY_PASSES = 2


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[2])
    p.add_argument("--cpu-only", action="store_true", help="run only the parts that need no GPU")
    p.add_argument("--tiny", action="store_true", help="shrink every size (CI)")
    p.add_argument("--out", help="output folder (default benchmarks/results/<device>)")
    p.add_argument("--parts", default=",".join(PARTS), type=comma_list(PARTS, "parts"),
                   help=f"comma-separated subset of {','.join(PARTS)} (default: all)")
    p.add_argument("--no-compile", action="store_true",
                   help="leave the torch.compile baseline out of the speed part")
    p.add_argument("--memory-budget-gib", type=float, default=16.0,
                   help="budget for the largest-batch search (default 16)")
    p.add_argument("--time-budget", type=float, metavar="S",
                   help="seconds for all parts: each gets a share and leaves out what would "
                        "not fit (fewer shapes, networks, compiled cases), saying so")
    return p.parse_args(argv)


def environment(gpu: bool) -> dict:
    env = dict(python=platform.python_version(), torch=torch.__version__,
               platform=platform.platform(), date=datetime.date.today().isoformat())
    try:
        import cupy
        from cupy.cuda import nvrtc

        env["cupy"] = cupy.__version__
        env["nvrtc"] = ".".join(map(str, nvrtc.getVersion()))
    except Exception as exc:  # CuPy is optional for the CPU parts
        env["cupy"] = f"unavailable ({type(exc).__name__})"
    import numpy

    env["numpy"] = numpy.__version__
    env["device"] = torch.cuda.get_device_name() if gpu else "CPU (" + (
        platform.processor() or platform.machine()) + ")"
    try:
        env["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
            capture_output=True, text=True, check=True).stdout.strip()
    except Exception:
        env["git_commit"] = "unknown"
    return env


def passes_from_traffic(rows: list[dict]) -> dict:
    """Whole-tensor reads + writes per mode, from the emulator's float32 counts."""
    def passes(stage):
        r = next(r for r in rows if r["pair"] == "float32_float32" and r["layout"] == "ncs"
                 and r["stage"] == stage)
        return r["tensor_loads"] + r["tensor_stores"]

    fwd = passes("forward (train)")
    bwd = passes("backward (train)") + ADAPTER_GRAD_COPY_PASSES
    return dict(forward=fwd, backward=bwd, full=fwd + bwd)


def speed_passes(run) -> dict:
    """Whole-tensor passes per mode, from the counts part or, without it, from the emulator
    on the float32 pair at tiny size (pass counts do not depend on the shape). If the
    emulator cannot run here (it builds the kernels with g++), speed is still timed, only
    without the fraction of copy bandwidth."""
    from . import counts
    from iabn_core.dtypes import PAIRS

    try:
        traffic = (run.data.get("counts") or (counts.traffic_rows(
            Settings(tiny=True), pairs=PAIRS[:1]), None))[0]
        return passes_from_traffic(traffic)
    except Exception as exc:  # reported; the timing goes on
        print(f"[benchmarks] no traffic counts ({type(exc).__name__}: {exc}); speed runs "
              "without the bandwidth fraction", file=sys.stderr)
        return {}


class Run:
    """Runs parts, keeps their rows and statuses; one failing part never hides the others.
    With a time budget, `settings_for(part)` gives each part its deadline."""

    def __init__(self, settings: Settings | None = None, budget: float | None = None,
                 parts=()):
        self.status: dict[str, str] = {}
        self.data: dict[str, object] = {}
        self.settings = settings
        self.end = None if budget is None else time.monotonic() + budget
        self.pending = [p for p in parts if p in TIME_SHARE]

    def settings_for(self, part: str) -> Settings | None:
        """Settings whose deadline is `part`'s share of the time left, or None (with the
        status set) when even its floor does not fit."""
        if part in self.pending:
            self.pending.remove(part)
        if self.end is None:
            return self.settings
        left = self.end - time.monotonic()
        share = TIME_SHARE.get(part, 1)
        allot = left * share / (share + sum(TIME_SHARE[p] for p in self.pending))
        if allot < TIME_FLOOR_S.get(part, 0):
            self.skip(part, f"time budget ({allot:.0f} s of {left:.0f} s left for it; it "
                      f"needs at least {TIME_FLOOR_S[part]} s)")
            return None
        return dataclasses.replace(self.settings, deadline=time.monotonic() + allot)

    def attempt(self, part, fn):
        print(f"[benchmarks] {part} ...", file=sys.stderr, flush=True)
        try:
            self.data[part] = fn()
            self.status[part] = "ran"
        except Exception as exc:
            traceback.print_exc()
            self.status[part] = f"failed: {type(exc).__name__}: {exc}".splitlines()[0][:300]

    def skip(self, part, why):
        self.status[part] = f"not run: {why}"


def main(argv=None) -> int:
    args = parse(argv)
    settings = Settings(tiny=args.tiny, cpu_only=args.cpu_only, compile=not args.no_compile,
                        memory_budget_gib=args.memory_budget_gib)
    gpu = not args.cpu_only and torch.cuda.is_available()
    device_dir = device_slug(torch.cuda.get_device_name()) if gpu else "cpu"
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / device_dir
    out.mkdir(parents=True, exist_ok=True)
    budgeted = [p for p in args.parts if not (p in GPU_PARTS and not gpu)]
    if gpu and settings.compile:
        budgeted += [f"{p} (torch.compile)" for p in ("speed", "step")
                     if p in args.parts or f"{p}_compiled" in args.parts]
    run = Run(settings, args.time_budget, budgeted)
    env = environment(gpu)
    from . import counts, memory

    def save():
        write_outputs(out, run, run.settings, env, gpu, argv)

    for part in args.parts:
        if part in COMPILED_PARTS:
            if gpu:
                compiled_passes(run, gpu, save, only=COMPILED_PARTS[part])
            else:
                run.skip(f"{COMPILED_PARTS[part]} (torch.compile)", "--cpu-only" if
                         args.cpu_only else "no CUDA GPU visible to torch")
            save()
            continue
        if part in GPU_PARTS and not gpu:
            run.skip(part, "--cpu-only" if args.cpu_only else
                     "no CUDA GPU visible to torch (torch.cuda.is_available() is False)")
            continue
        settings = run.settings_for(part)
        if settings is None:
            continue
        if part == "counts":
            run.attempt(part, lambda: (counts.traffic_rows(settings),
                                       counts.launch_rows(settings)))
        elif part == "compile":
            def compile_part():
                rows = counts.compile_rows(settings)
                if gpu:
                    with tempfile.TemporaryDirectory() as d:
                        rows += counts.gpu_compile_rows(settings, d)
                return rows
            run.attempt(part, compile_part)
        elif part == "saved":
            run.attempt(part, lambda: memory.saved_bytes_rows(settings, "cpu"))
        elif part == "speed":
            def speed_part():
                from . import speed

                return speed.speed_rows(settings, "cuda", speed_passes(run),
                                        progress=lambda s: print(s, file=sys.stderr))
            run.attempt(part, speed_part)
        elif part == "memory":
            run.attempt(part, lambda: (memory.peak_memory_rows(settings),
                                       memory.max_batch_rows(settings)))
        elif part == "step":
            from . import step

            run.attempt(part, lambda: step.step_rows(
                settings, "cuda", progress=lambda s: print(s, file=sys.stderr)))
        elif part == "overhead":
            from . import overhead

            run.attempt(part, lambda: overhead.overhead_rows(settings, gpu))
            if gpu:  # the diagnostic behind the figures: where a layer's host time goes
                _profile_host(out)
        elif part == "precision":
            from . import precision

            run.attempt(part, lambda: precision.precision_data(
                settings, "cuda" if gpu else "cpu", progress=lambda s: print(s, file=sys.stderr)))
        elif part == "step_kernels":
            from . import step_kernels

            run.attempt(part, lambda: step_kernels.kernel_profile(
                settings, "cuda", out, progress=lambda s: print(s, file=sys.stderr)))
        save()  # progress survives a kill
    compiled_passes(run, gpu, save)
    save()
    print(f"[benchmarks] results in {out}", file=sys.stderr)
    return 1 if any(s.startswith("failed") for s in run.status.values()) else 0


def _profile_host(out: Path) -> None:
    """benchmarks.profile_host into out/profile_host.txt; a failure there is reported and
    does not fail the overhead part (it is a diagnostic, not a figure)."""
    from . import profile_host

    try:
        profile_host.main(["--out", str(out), "--iters", "200"])
    except Exception as exc:  # noqa: BLE001 - reported, the figures stand without it
        print(f"[benchmarks] profile_host failed: {type(exc).__name__}: {exc}", file=sys.stderr)


def compiled_passes(run: Run, gpu: bool, save=lambda: None, only: str | None = None) -> None:
    """The torch.compile baselines, after every other part (compiling is the slowest work),
    or only `only`'s where --parts places it. A pass already reported is not run again."""
    if only and gpu and not run.settings.compile:
        run.skip(f"{only} (torch.compile)", "--no-compile")
    if not (gpu and run.settings.compile):
        return
    from . import speed, step

    def log(s):
        print(s, file=sys.stderr)

    def speed_pass(settings):
        rows = run.data["speed"][0]
        done = speed.add_compiled(rows, settings, "cuda", progress=log)
        return f"{done} of {len({r['label'] for r in rows})} shapes"

    def step_pass(settings):
        first = len(run.data["step"])
        rows = step.step_rows(settings, "cuda", compiled=True, progress=log,
                              rows=run.data["step"], on_row=save)[first:]
        return f"{sum(r['status'] == 'ok' for r in rows)} of {len(rows)} runs"

    for part, fn in (("speed", speed_pass), ("step", step_pass)):
        name = f"{part} (torch.compile)"
        if (only and part != only) or name in run.status:
            continue
        if part == "step" and only:  # placed on its own: compiled rows need no eager rows
            run.data.setdefault("step", [])
        if part not in run.data:  # nothing to add a baseline to; its share goes to the rest
            run.pending = [p for p in run.pending if p != name]
            if only:
                run.skip(name, f"the {part} part did not run: no rows to add a baseline to")
            continue
        settings = run.settings_for(name)
        if settings is not None:
            run.attempt(name, lambda: fn(settings))
            if run.status[name] == "ran":
                run.status[name] = f"ran: {run.data[name]}"
            save()


if __name__ == "__main__":
    sys.exit(main())

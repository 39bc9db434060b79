"""One prepared command that verifies and benchmarks everything on a GPU machine.

    python -m benchmarks.gpu_suite [--out DIR] [--budget SECONDS] [--dry-run] [--steps ...]
    python -m benchmarks.gpu_suite --unpack results.tar.gz [--dest benchmarks/results]

Steps, in order, each with its own time limit (gpu_suite_runner explains the budget rule),
each run whatever happened before it:
  1 env        GPU, versions, kernel caches; compiles every kernel module once (warm cache)
  2 pytest     `pytest -m gpu` (xdist workers when pytest-xdist is there)
  3 check      `python -m iabn.check --backend cuda`, the full matrix
  4 sanitizer  compute-sanitizer memcheck, racecheck, synccheck, initcheck in parallel over
               benchmarks.sanitizer_driver (every kernel, awkward shapes, misaligned buffers)
  5 bench      `python -m benchmarks`, parts in BENCH_PARTS order, sized to the time left: host
               time, eager whole step, per-layer speed, memory, compiled steps and layers,
               NVRTC times, the kernel profile of the fused-residual step
  6 ncu        Nsight Compute on the forward and backward kernels of the two largest shapes;
               optional: it runs on what bench leaves, never on time bench could use
  7            the verdict table (verdict.md), rewritten after every step
--dry-run runs the same orchestration without a GPU: CPU stand-ins (pytest collects and
skips, the check runs on the emulator with --quick, the driver runs on the emulator without
a sanitizer, the benchmarks run --tiny --cpu-only, ncu's target runs on the CPU). Output
(--out, default $OUT): a packed results.tar.gz laid out as benchmarks/results/<device>/,
plus verdict.md, suite.log and the benchmarks' summary.md; see benchmarks/README.md for the
device command and unpacking.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from . import gpu_suite_env, gpu_suite_ncu, gpu_suite_pack
from .cases import comma_list, device_slug
from .gpu_suite_runner import (FAILED, OUT_OF_TIME, PASSED, SKIPPED, Context, Interrupted,
                               Outcome, Step, Suite, from_command, totals, verdict_markdown)

STEP_NAMES = ("env", "pytest", "check", "sanitizer", "bench", "ncu")
SANITIZER_TOOLS = ("memcheck", "racecheck", "synccheck", "initcheck")
SANITIZER_FOUND = 86  # --error-exitcode: the tool found something (the driver uses 1 and 2)
# Benchmark parts by importance, the order they run in: a run cut at its budget has the
# host time and the eager whole step first; compiled steps before the NVRTC times; the
# kernel profile last. Those PARTS has, in this order.
BENCH_PARTS = ("overhead", "step", "speed", "memory", "step_compiled", "speed_compiled",
               "compile", "step_kernels")
BENCH_GRACE_S = 45  # the benchmark process's start-up and last write, beyond its own budget


def _module(ctx: Context, *args) -> list:
    return [ctx.python, "-m", *args]


# ------------------------------------------------------------------------------------------
# step bodies
# ------------------------------------------------------------------------------------------
def env_step(ctx: Context, allot: float) -> Outcome:
    path = ctx.results / "suite_environment.json"
    argv = _module(ctx, "benchmarks.gpu_suite_env", "--json", path)
    done = ctx.run(argv + ([] if ctx.dry_run else ["--warm-kernels"]), "environment.log", allot)
    if path.is_file():
        ctx.facts = json.loads(path.read_text())
    f = ctx.facts
    # without facts (the probe itself failed) the GPU steps still try: their own logs will
    # say what is wrong, which a skip would hide
    ctx.gpu = not ctx.dry_run and bool(f.get("gpu", True))

    def judge(done):
        if not f:
            return Outcome(FAILED, f"probe failed (exit {done.rc}); see logs/environment.log")
        t, cp = f.get("torch", {}), f.get("cupy", {})
        cupy = (f"CuPy {cp.get('version')}, NVRTC {cp.get('nvrtc')}, driver "
                f"{cp.get('driver')}, CUDA runtime {cp.get('runtime')}"
                + (f" ({cp['error']})" if "error" in cp else ""))
        versions = (f"{cupy}, torch {t.get('version')} (CUDA {t.get('cuda')}); iabn from "
                    f"{f['imports']['iabn_resolved']}")
        if ctx.dry_run:
            return Outcome(PASSED, f"dry run on {f['device']}: {versions}", ran_as="CPU")
        if not ctx.gpu:
            return Outcome(FAILED, "no CUDA GPU visible to CuPy and torch "
                           f"(cupy: {cp.get('error', cp.get('devices'))}, torch available: "
                           f"{t.get('available')}); use --dry-run on a machine without one")
        gpu = (f"{t['device']} (sm {t['capability']}, {t['sms']} SMs, {t['memory_gib']} GiB, "
               f"L2 {t['l2_mib']} MiB)")
        if done.rc != 0:
            return Outcome(FAILED, f"{gpu}: kernel warm-up failed: "
                           f"{f.get('kernel_warmup_error', 'see logs/environment.log')}")
        warm = f.get("kernel_warmup_s", {})
        return Outcome(PASSED, f"{gpu}; {versions}", dict(
            modules_compiled=len(warm), compile_s=f.get("kernel_warmup_total_s")))

    return from_command(done, judge)


def _junit(path: Path) -> tuple[dict, list[str]]:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    c = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors",
                                                              "skipped")}
    failing = [f"{tc.get('classname')}::{tc.get('name')}" for tc in root.iter("testcase")
               if tc.find("failure") is not None or tc.find("error") is not None]
    passed = c["tests"] - c["failures"] - c["errors"] - c["skipped"]
    return dict(passed=passed, failed=c["failures"] + c["errors"], skipped=c["skipped"]), failing


def pytest_step(ctx: Context, allot: float) -> Outcome:
    xml = ctx.logs / "pytest-gpu.xml"
    # pytest-benchmark (present on the device image) turns itself off under xdist with a
    # warning, which setup.cfg's filterwarnings=error makes an internal error (exit 3): the
    # first GPU run lost this whole step to it. This step times nothing, so it is left out.
    argv = _module(ctx, "pytest", "-m", "gpu", "-q", "-rfE", "-p", "no:cacheprovider",
                   "-p", "no:benchmark", f"--junitxml={xml}", "-o", f"faulthandler_timeout={int(max(30, allot - 20))}")
    if ctx.gpu and "pytest-xdist" in ctx.facts.get("packages", {}):
        # One GPU shared by a few workers: the tests are small, the start-up is the cost.
        argv += ["-n", str(max(2, min(6, (os.cpu_count() or 2) // 2)))]
    done = ctx.run(argv, "pytest-gpu.log", allot)

    def judge(done):
        counts, failing = _junit(xml) if xml.is_file() else ({}, [])
        ran_as = "GPU" if ctx.gpu else "CPU (collection only)"
        if done.rc == 0 and not ctx.gpu:
            return Outcome(SKIPPED, f"no GPU: {counts.get('skipped')} gpu-marked tests collected "
                           "and skipped", counts, ran_as)
        if done.rc == 0:
            return Outcome(PASSED, "", counts, ran_as)
        why = {1: "tests failed", 5: "no tests collected"}.get(done.rc, f"pytest exit {done.rc}")
        return Outcome(FAILED, f"{why}: {', '.join(failing[:8])}" if failing else why,
                       counts, ran_as)

    return from_command(done, judge)


def check_step(ctx: Context, allot: float) -> Outcome:
    js = ctx.results / "check.json"
    backend = ["--backend", "cuda"] if ctx.gpu else ["--backend", "emulator", "--quick"]
    done = ctx.run(_module(ctx, "iabn.check", *backend, "--json", js, "--summary"), "check.log",
                   allot)

    def judge(done):
        cases = json.loads(js.read_text())["cases"] if js.is_file() else []
        bad = [f"{c['case']} ({c['stage']})" for c in cases if not c["passed"]]
        counts = dict(passed=len(cases) - len(bad), failed=len(bad))
        ran_as = "GPU (full matrix)" if ctx.gpu else "CPU stand-in: emulator, --quick"
        if done.rc == 0 and cases:
            return Outcome(PASSED, "", counts, ran_as)
        return Outcome(FAILED, ", ".join(bad[:8]) or f"exit {done.rc}; see logs/check.log",
                       counts, ran_as)

    return from_command(done, judge)


def _driver_report(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _coverage(rep: dict) -> str:
    if not rep:
        return "driver wrote no report"
    return (f"{rep['kernels_launched']}/{rep['kernels_expected']} kernels, {rep['steps']} "
            f"steps{'' if rep.get('finished', True) else ' (cut short)'}, "
            f"{len(rep['problems'])} result problems")


def sanitizer_step(ctx: Context, allot: float) -> Outcome:
    driver = _module(ctx, "benchmarks.sanitizer_driver")
    tool = ctx.facts.get("tools", {}).get("compute-sanitizer")
    if not ctx.gpu or not tool:
        backend = "cuda" if ctx.gpu else "emulator"
        js = ctx.logs / f"driver-{backend}.json"
        done = ctx.run(driver + ["--backend", backend, "--json", js], f"driver-{backend}.log",
                       allot)

        def judge(done):
            rep = _driver_report(js)
            ran_as = ("GPU, no sanitizer" if ctx.gpu else
                      "CPU stand-in: driver on the emulator, no sanitizer")
            if done.rc != 0:
                return Outcome(FAILED, f"driver: {_coverage(rep)}; see logs/{done.log.name}",
                               ran_as=ran_as)
            why = "compute-sanitizer not found" if ctx.gpu else "no GPU"
            return Outcome(SKIPPED if ctx.gpu else PASSED, f"{why}; driver clean: "
                           f"{_coverage(rep)}", ran_as=ran_as)

        return from_command(done, judge)
    jobs = [([tool, "--tool", t, "--error-exitcode", SANITIZER_FOUND, "--print-limit", 100]
             + driver + ["--backend", "cuda", "--json", ctx.logs / f"sanitizer-{t}.json"],
             f"sanitizer-{t}.log") for t in SANITIZER_TOOLS]
    results = ctx.run_parallel(jobs, allot)
    counts, notes, statuses = {}, [], []
    for t, done in zip(SANITIZER_TOOLS, results):
        # the tool's last line: "ERROR SUMMARY: 0 errors" (racecheck: "RACECHECK SUMMARY:
        # 0 hazards displayed (0 errors, 0 warnings)")
        summary = re.findall(r"(?:ERROR|RACECHECK) SUMMARY: (.*)", done.log.read_text(
            errors="replace"))
        rep = _driver_report(ctx.logs / f"sanitizer-{t}.json")
        if done.timed_out:
            counts[t], st = "out of time", OUT_OF_TIME
        elif done.rc == 0:
            counts[t], st = summary[-1].strip() if summary else "clean", PASSED
        elif done.rc == SANITIZER_FOUND:
            counts[t], st = summary[-1].strip() if summary else "reported errors", FAILED
        else:
            counts[t], st = f"driver exit {done.rc}", FAILED
        if st != PASSED:
            notes.append(f"{t}: {counts[t]}, {_coverage(rep)} (logs/{done.log.name})")
        elif t == "memcheck":
            notes.append(f"driver under memcheck: {_coverage(rep)}")
        statuses.append(st)
    status = FAILED if FAILED in statuses else OUT_OF_TIME if OUT_OF_TIME in statuses else PASSED
    return Outcome(status, "; ".join(notes), counts)


def bench_step(ctx: Context, allot: float) -> Outcome:
    from .__main__ import PARTS  # read at run time: parts may be added by later changes

    chosen = getattr(ctx, "bench_parts", BENCH_PARTS)
    parts = [p for p in BENCH_PARTS if p in PARTS and p in chosen]
    budget = max(10.0, allot - BENCH_GRACE_S)
    argv = _module(ctx, "benchmarks", "--parts", ",".join(parts), "--out", ctx.results,
                   "--time-budget", f"{budget:.0f}")
    if not ctx.gpu:
        argv += ["--tiny", "--cpu-only"]
    done = ctx.run(argv, "benchmarks.log", allot)

    envf = ctx.results / "environment.json"  # rewritten by the benchmarks after every part
    status = json.loads(envf.read_text()).get("status", {}) if envf.is_file() else {}
    counts = dict(ran=sum(s.startswith("ran") for s in status.values()),
                  not_run=sum(s.startswith("not run") for s in status.values()),
                  failed=sum(s.startswith("failed") for s in status.values()))
    detail = "; ".join(f"{p}: {s}" for p, s in status.items())
    ran_as = "GPU" if ctx.gpu else "CPU (--tiny --cpu-only; GPU parts not run)"

    def judge(done):
        ok = done.rc == 0 and status and not counts["failed"]
        return Outcome(PASSED if ok else FAILED, detail or f"exit {done.rc}", counts, ran_as)

    out = from_command(done, judge)
    if out.status == OUT_OF_TIME:  # what the parts finished before the kill still counts
        out.detail, out.counts, out.ran_as = f"{out.detail}; {detail}", counts, ran_as
    return out


def plan(budget: float, names=STEP_NAMES) -> list[Step]:
    """The steps with their time limits for a budget of `budget` seconds (480 by default:
    env <= 12%, pytest <= 25%, check <= 15%, sanitizer <= 25%, bench the rest, ncu what
    bench leaves: it is optional, so no earlier step keeps time back for it)."""
    def step(name, title, min_s, share, body, optional=False):  # cap >= the step's minimum
        return Step(name, title, min_s, None if share is None else max(
            min_s, share * budget, 30 if name == "env" else 0), body, optional)

    table = {
        "env": step("env", "environment, kernel cache warm-up", 10, 0.12, env_step),
        "pytest": step("pytest", "pytest -m gpu", 30, 0.25, pytest_step),
        "check": step("check", "python -m iabn.check --backend cuda", 20, 0.15, check_step),
        "sanitizer": step("sanitizer", "compute-sanitizer x4 over the kernel driver", 30, 0.25,
                          sanitizer_step),
        "bench": step("bench", "python -m benchmarks (GPU parts)", 45, None, bench_step),
        "ncu": step("ncu", "ncu on the two largest shapes' kernels", 60, None,
                    gpu_suite_ncu.step, optional=True),
    }
    return [table[n] for n in STEP_NAMES if n in names or n == "env"]


# ------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------
def parse(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_suite",
                                description=__doc__.splitlines()[0])
    p.add_argument("--out", help="folder for what comes back (default $OUT, else a temp dir)")
    p.add_argument("--budget", type=float, default=480.0, help="seconds in all (default 480)")
    p.add_argument("--dry-run", action="store_true", help="no GPU: CPU stand-ins, same flow")
    p.add_argument("--steps", default=",".join(STEP_NAMES), type=comma_list(STEP_NAMES, "steps"),
                   help=f"subset of {','.join(STEP_NAMES)} (env always runs)")
    p.add_argument("--parts", default=",".join(BENCH_PARTS),
                   type=comma_list(BENCH_PARTS, "parts"),
                   help="benchmark parts of the bench step (default: all); a rerun that "
                        "confirms a fix may leave out what it did not touch")
    p.add_argument("--work", help="scratch folder (default: a new temp dir)")
    p.add_argument("--cache-dir", help="kernel caches (default $IABN_CACHE_DIR or ~/.cache/iabn)")
    p.add_argument("--unpack", metavar="FILE", help="unpack a results.tar.gz and exit")
    p.add_argument("--dest", default=str(Path(__file__).parent / "results"),
                   help="where --unpack puts <device>/ (default benchmarks/results)")
    return p.parse_args(argv)


class Log:
    def __init__(self, path: Path):
        self.path, self.t0 = path, time.monotonic()
        path.write_text("")

    def __call__(self, line: str) -> None:
        line = f"[{time.monotonic() - self.t0:6.1f}s] {line}"
        print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")


def child_env(cache: Path) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", MPLBACKEND="Agg", IABN_CACHE_DIR=str(cache),
               CUPY_CACHE_DIR=str(cache / "cupy"), TORCHINDUCTOR_CACHE_DIR=str(cache / "inductor"),
               TRITON_CACHE_DIR=str(cache / "triton"))
    env.pop("IABN_BACKEND", None)  # the suite picks backends itself
    return env


def main(argv=None) -> int:
    args = parse(argv)
    if args.unpack:
        where = gpu_suite_pack.unpack(Path(args.unpack), Path(args.dest))
        print(f"unpacked into {where}\nnext: git add {where} && git commit -m 'GPU results: "
              f"{where.name}'")
        return 0
    root = Path(__file__).resolve().parents[1]
    out = Path(args.out or os.environ.get("OUT") or tempfile.mkdtemp(prefix="iabn-gpu-out-"))
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="iabn-gpu-suite-"))
    results = work / "results"
    results.mkdir(parents=True, exist_ok=True)
    log = Log(out / "suite.log")
    cache = Path(args.cache_dir or os.environ.get("IABN_CACHE_DIR")
                 or Path.home() / ".cache" / "iabn")
    env, how = gpu_suite_env.importable_env(root, child_env(cache), work)
    if how.startswith("shim"):
        sys.path.insert(0, how.split(" ", 1)[1])
    ctx = Context(root, results, env, args.dry_run, sys.executable)
    ctx.bench_parts = list(args.parts)
    steps = plan(args.budget, args.steps)
    header = dict(device="(not probed yet)", mode="DRY RUN (no GPU work)" if args.dry_run
                  else "GPU run", command="python -m benchmarks.gpu_suite " + " ".join(
                      sys.argv[1:] if argv is None else argv),
                  budget_s=args.budget, started_utc=time.strftime("%Y-%m-%d %H:%M:%S",
                                                                  time.gmtime()),
                  iabn_import=how, caches=str(cache), output=str(out), work=str(work))
    t0 = time.monotonic()
    log(f"[suite] {header['mode']}, budget {args.budget:.0f} s, output {out}, iabn: {how}")

    def publish(records, running=None):
        f = ctx.facts
        header.update(device=f.get("device", header["device"]),
                      commit=f.get("git_commit", "unknown"),
                      kernels_sha256=f.get("imports", {}).get("kernels_sha256", "unknown"),
                      elapsed_s=round(time.monotonic() - t0))
        md = verdict_markdown(records, header, steps, running)
        (results / "verdict.md").write_text(md)
        (results / "suite.json").write_text(json.dumps(dict(
            header=header, totals=totals(records), steps=[r.__dict__ for r in records]),
            indent=1, default=str))
        shutil.copyfile(out / "suite.log", ctx.logs / "suite.log")
        top = "dry-run" if args.dry_run else device_slug(f.get("device", "unknown-gpu"))
        notes = gpu_suite_pack.pack(results, out, top, [results / "verdict.md", out / "suite.log",
                                                        results / "summary.md"])
        for n in notes:
            log(f"[pack] {n}")

    def stop(signum, frame):
        raise Interrupted(f"signal {signum}")

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    suite = Suite(steps, ctx, args.budget, reserve_s=10, on_record=publish, log=log)
    ctx.heartbeat = lambda: publish(suite.records, running=len(suite.records) + 1)
    try:
        records = suite.run()
    except Interrupted as exc:  # between steps: record what is known and pack it
        log(f"[suite] interrupted: {exc}")
        records = suite.records
    if cache.is_dir():  # what the kernel caches hold after the run, MiB per cache
        header["cache_mib"] = {p.name: round(gpu_suite_env.du(p) / 2 ** 20, 1)
                               for p in sorted(cache.iterdir()) if p.is_dir()}
    publish(records)
    log("[suite] verdict:\n" + (results / "verdict.md").read_text())
    log(f"[suite] packed into {out}: {sorted(p.name for p in out.iterdir())}")
    return 1 if any(r.status in (FAILED, OUT_OF_TIME) for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())

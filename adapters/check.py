"""Correctness runner: `python -m iabn.check [--backend B] [--quick] [--json PATH]`.

Runs the kernel matrix (stage x dtype x layout x activation x mode, awkward shapes included;
plain and residual forms) on one backend against the float64 reference and prints, per case,
the worst stage's errors and tolerance. Exit status 0 only when every case passes.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time


def environment(backend: str) -> dict:
    info = {"backend": backend, "python": platform.python_version(), "machine": platform.machine()}
    try:
        import cupy
        from cupy.cuda import nvrtc

        info["cupy"] = cupy.__version__
        info["nvrtc"] = ".".join(map(str, nvrtc.getVersion()))
        info["cupy_kernel_cache"] = os.environ.get(
            "CUPY_CACHE_DIR", os.path.expanduser("~/.cupy/kernel_cache"))
        if backend == "cuda":
            rt = cupy.cuda.runtime
            info["device"] = rt.getDeviceProperties(cupy.cuda.Device().id)["name"].decode()
            info["cuda_runtime"] = rt.runtimeGetVersion()
            info["cuda_driver"] = rt.driverGetVersion()
    except Exception as exc:  # CuPy is optional for the CPU backends
        info["cupy"] = f"unavailable ({type(exc).__name__})"
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        info["torch"] = "not installed"
    if backend != "cuda":
        info["device"] = f"CPU ({backend})"
    if backend == "emulator":
        from iabn_core.emulator.build import cache_dir

        info["emulator_cache"] = str(cache_dir())
    from iabn_core.source import kernel_dir

    info["kernels"] = str(kernel_dir())
    return info


def emulator_unavailable() -> str | None:
    """Why the CPU emulator cannot run here (it compiles the kernels with a C++ compiler), or
    None when it can. Asked once, so a missing compiler is one message, not one per case."""
    from iabn_core.emulator import build
    from iabn_core.emulator.errors import EmulatorError

    try:
        build._compiler_version()
    except EmulatorError as exc:
        return (f"{exc}; install g++ (e.g. `apt-get install g++`) or point IABN_EMULATOR_CXX "
                "at a C++17 compiler")
    return None


def _progress(i: int, n: int, name: str, stream) -> None:
    if not stream.isatty():
        return
    width = 30
    done = int(width * i / n)
    stream.write(f"\r[{'#' * done}{'.' * (width - done)}] {i}/{n} {name[:50]:<50}")
    stream.flush()


def main(argv=None) -> int:
    from iabn_core import verify

    ap = argparse.ArgumentParser(prog="python -m iabn.check", description=__doc__.splitlines()[0])
    ap.add_argument("--backend", choices=("cuda", "emulator", "numpy"),
                    help="default: cuda when a GPU is present, else emulator")
    ap.add_argument("--quick", action="store_true", help="a one-minute subset of the matrix")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    ap.add_argument("--summary", action="store_true", help="list failing cases only")
    args = ap.parse_args(argv)
    from iabn_core.backends.cuda import gpu_available

    backend = args.backend or ("cuda" if gpu_available() else "emulator")
    if backend == "emulator":
        why = emulator_unavailable()
        if why:
            print(f"iabn.check: the emulator cannot run: {why}; `--backend numpy` checks "
                  "without it (the NumPy implementation, not the kernels)")
            return 2

    env = environment(backend)
    print("iabn correctness check")
    for k, v in env.items():
        print(f"  {k:<18} {v}")
    cases = verify.matrix(quick=args.quick) + verify.residual_matrix(quick=args.quick)
    rows, t0 = [], time.time()
    for i, case in enumerate(cases):
        _progress(i, len(cases), case.name, sys.stderr)
        try:
            res = verify.run_case(case, backend)
            w = res.worst
            rows.append(dict(case=case.name, stage=w.stage, max_abs=w.max_abs, max_rel=w.max_rel,
                             tol=w.tol, passed=res.passed, error=None))
        except Exception as exc:  # a crash is a failure of that case, not of the runner
            rows.append(dict(case=case.name, stage="-", max_abs=float("inf"),
                             max_rel=float("inf"), tol=0.0, passed=False,
                             error=f"{type(exc).__name__}: {exc}"))
    _progress(len(cases), len(cases), "done", sys.stderr)
    if sys.stderr.isatty():
        sys.stderr.write("\n")

    name_w = max(len(r["case"]) for r in rows)
    shown = [r for r in rows if not (args.summary and r["passed"])]
    if shown:
        print("\nEach case's worst stage against the float64 reference."
              "\nmax abs err = max |got - ref|; max rel err = max abs err / the stage's scale"
              "\n(max |ref|, or the size of the terms that cancel). A case passes when"
              "\nmax rel err <= rel tol, which depends on the dtype a value is stored in:"
              f"\n{verify.tolerance_text()}.")
        print(f"\n{'case':<{name_w}}  {'worst stage':<24} {'max abs err':>11}  "
              f"{'max rel err':>11}  {'rel tol':>7}  result")
    for r in shown:
        verdict = "pass" if r["passed"] else "FAIL"
        print(f"{r['case']:<{name_w}}  {r['stage']:<24} {r['max_abs']:>11.2e}  "
              f"{r['max_rel']:>11.2e}  {verify.tol_text(r['tol']):>7}  {verdict}")
        if r["error"]:
            print(f"    {r['error']}")
    failed = sum(not r["passed"] for r in rows)
    print(f"\n{len(rows) - failed} passed, {failed} failed in {time.time() - t0:.1f} s "
          f"on backend {backend}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "cases": rows}, f, indent=1, default=str)
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

"""The GPU suite's environment: making this tree importable, and the machine probe (step 1).

    python -m benchmarks.gpu_suite_env --json PATH [--warm-kernels]

The device machine gets a copy of the repository, not an installed package, and a pip install
there may fail (no network, no build isolation). The import package `iabn` is `adapters/`
and `iabn_kernels` is `kernels/` only through setup.cfg's package_dir, so `importable_env`
checks which `iabn` a child Python would import and, unless it is this tree's, builds a shim
folder of symlinks (iabn -> adapters, iabn_kernels -> kernels, iabn_core) and puts it first
on PYTHONPATH for the suite and every process it starts.

The probe records what a result depends on: the GPU (name, SMs, memory, L2, compute
capability), driver / CUDA runtime / NVRTC / CuPy / torch versions, package versions, which
files `iabn` was imported from, a hash of the kernel sources, the kernel caches and their
sizes, and the tools (compute-sanitizer, ncu, nvidia-smi). With --warm-kernels it compiles
every kernel module once through CuPy (timed), so later steps load them from the disk cache
instead of compiling in every process; a module that fails to compile fails this step.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

PACKAGES = ("torch", "numpy", "cupy-cuda13x", "cupy-cuda12x", "ml_dtypes", "pytest",
            "pytest-xdist", "matplotlib", "timm", "torchvision", "triton", "hypothesis")
CACHE_VARS = ("IABN_CACHE_DIR", "CUPY_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")
SHIM = {"iabn": "adapters", "iabn_kernels": "kernels", "iabn_core": "iabn_core"}

_WHICH_IABN = "import os, iabn; print(os.path.realpath(iabn.__file__))"


def importable_env(root: Path, env: dict, work: Path, python: str = sys.executable,
                   force_shim: bool = False) -> tuple[dict, str]:
    """(environment for child processes, how `iabn` resolves there: 'installed from this
    tree' or 'shim <folder>'). The tree's root goes on PYTHONPATH too, for `benchmarks`."""
    env = dict(env)
    paths = [str(root)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    if not force_shim:
        got = subprocess.run([python, "-c", _WHICH_IABN], env=env, cwd=str(work),
                             capture_output=True, text=True)
        mine = str((root / "adapters").resolve())
        if got.returncode == 0 and got.stdout.strip().startswith(mine + os.sep):
            return env, "installed from this tree"
    shim = work / "shim"
    shim.mkdir(parents=True, exist_ok=True)
    for name, target in SHIM.items():
        link = shim / name
        if link.is_symlink() or link.exists():
            continue
        try:
            link.symlink_to(root / target, target_is_directory=True)
        except OSError:  # no symlinks on this filesystem: a copy does as well for one run
            shutil.copytree(root / target, link)
    env["PYTHONPATH"] = os.pathsep.join([str(shim)] + paths)
    return env, f"shim {shim}"


def du(path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(dirpath, f))
            except OSError:
                pass
    return total


def caches() -> dict:
    return {v: dict(path=os.environ.get(v), bytes=du(os.environ[v]) if os.environ.get(v)
                    else None) for v in CACHE_VARS}


def find_tool(name: str) -> str | None:
    """A CUDA tool on PATH, or in the usual install folders of the CUDA toolkit."""
    hit = shutil.which(name)
    if hit:
        return hit
    roots = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda", *sorted(
        glob.glob("/usr/local/cuda-*"), reverse=True)]
    for r in filter(None, roots):
        for cand in (f"{r}/bin/{name}", f"{r}/{name}/{name}", f"{r}/compute-sanitizer/{name}"):
            if os.access(cand, os.X_OK):
                return cand
    found = sorted(glob.glob(f"/opt/nvidia/*/{name}") + glob.glob(f"/opt/nvidia/*/*/{name}"))
    return found[-1] if found else None


def _run(argv, timeout=30) -> str:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        return (p.stdout + p.stderr).strip()
    except Exception as exc:  # a tool that is missing or hangs is reported, not fatal
        return f"unavailable ({type(exc).__name__}: {exc})"


def kernels_digest() -> str:
    from iabn_core.instantiations import KERNEL_FILES
    from iabn_core.source import assembled

    h = hashlib.sha256()
    for f in KERNEL_FILES:
        h.update(assembled(f).encode())
    return h.hexdigest()[:16]


def probe(root: Path) -> dict:
    info: dict = dict(python=platform.python_version(), executable=sys.executable,
                      platform=platform.platform(), cpus=os.cpu_count(),
                      date_utc=time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()))
    pk = {}
    for name in PACKAGES:
        try:
            pk[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    info["packages"] = pk
    import iabn
    import iabn_core
    from iabn_core.source import kernel_dir

    info["imports"] = dict(iabn=iabn.__file__, iabn_core=iabn_core.__file__,
                           iabn_resolved=os.path.realpath(iabn.__file__),
                           kernels=str(kernel_dir()), kernels_sha256=kernels_digest())
    git = _run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"])
    info["git_commit"] = git if len(git) < 20 and " " not in git else "unknown (no git here)"
    cupy_gpu, cp = False, {}
    info["cupy"] = cp
    try:  # filled in as far as it gets: the version even without a driver
        import cupy
        from cupy.cuda import nvrtc

        cp.update(version=cupy.__version__, nvrtc=".".join(map(str, nvrtc.getVersion())))
        rt = cupy.cuda.runtime
        cp.update(runtime=rt.runtimeGetVersion(), driver=rt.driverGetVersion(),
                  devices=rt.getDeviceCount())
        cupy_gpu = cp["devices"] > 0
    except Exception as exc:  # no CuPy, no driver, or no device
        cp["error"] = f"{type(exc).__name__}: {exc}"
    import torch

    t = dict(version=torch.__version__, cuda=torch.version.cuda,
             available=torch.cuda.is_available())
    if t["available"]:
        p = torch.cuda.get_device_properties(0)
        t.update(device=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                 memory_gib=round(p.total_memory / 2 ** 30, 2),
                 l2_mib=round(getattr(p, "L2_cache_size", 0) / 2 ** 20, 1),
                 cudnn=torch.backends.cudnn.version())
    info["torch"] = t
    info["gpu"] = bool(cupy_gpu and t["available"])
    info["device"] = t.get("device") or "CPU (" + (platform.processor() or platform.machine()) + ")"
    tools = {}
    for name in ("compute-sanitizer", "ncu", "nvidia-smi", "nvcc"):
        tools[name] = find_tool(name)
    info["tools"] = tools
    if tools["compute-sanitizer"]:
        info["compute_sanitizer_version"] = _run([tools["compute-sanitizer"], "--version"])[-200:]
    if tools["nvidia-smi"]:
        info["nvidia_smi"] = _run([tools["nvidia-smi"], "--query-gpu=name,driver_version,"
                                   "memory.total,clocks.max.sm,power.limit", "--format=csv"])
    info["caches"] = caches()
    return info


def warm_kernels() -> dict:
    """Compiles (or loads) every kernel module through CuPy, timed; raises on a failure."""
    from iabn_core import instantiations as inst
    from iabn_core.backends.cuda import CudaRuntime

    rt = CudaRuntime()
    times = {}
    for spec in inst.all_modules():
        t0 = time.perf_counter()
        rt.function(spec, spec.names[0])  # the whole module: every name expression
        times[f"{spec.filename} {spec.pair.key}"] = round(time.perf_counter() - t0, 3)
    return times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_suite_env")
    ap.add_argument("--json", required=True)
    ap.add_argument("--warm-kernels", action="store_true")
    args = ap.parse_args(argv)
    root = Path(__file__).resolve().parents[1]
    info = probe(root)
    out = Path(args.json)
    out.write_text(json.dumps(info, indent=1, default=str))  # the facts, even if warm-up hangs
    rc = 0
    if args.warm_kernels and info["gpu"]:
        t0 = time.perf_counter()
        try:
            info["kernel_warmup_s"] = warm_kernels()
        except Exception as exc:  # recorded; the suite marks the step failed
            info["kernel_warmup_error"] = f"{type(exc).__name__}: {exc}"[:2000]
            rc = 1
        info["kernel_warmup_total_s"] = round(time.perf_counter() - t0, 2)
        info["caches"] = caches()
    out.write_text(json.dumps(info, indent=1, default=str))
    print(json.dumps(info, indent=1, default=str))
    return rc


if __name__ == "__main__":
    sys.exit(main())

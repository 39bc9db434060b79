"""Device-free compilation with NVRTC: proves every instantiation compiles for real GPU archs.

CuPy's RawModule needs a GPU to pick the arch; `cupy.cuda.nvrtc` drives NVRTC directly and
works on a machine without one, given NVRTC and the CUDA runtime headers (pip wheels).
"""
from __future__ import annotations

import glob
import os

from .instantiations import ModuleSpec
from .source import assembled

# Options we pass to CuPy's RawModule. CuPy itself adds the arch, `-ftz=true` and
# `--device-as-default-execution-space` (passing the latter twice is an NVRTC error).
BASE_OPTIONS = ("-std=c++17",)
# What CuPy appends, so that the device-free compile here sees exactly what a GPU run compiles.
CUPY_ADDED_OPTIONS = ("-ftz=true", "--device-as-default-execution-space")


def cuda_include_dirs() -> list[str]:
    """Folders holding cuda_fp16.h & co: pip's nvidia wheels first, then a CUDA_PATH toolkit."""
    dirs = []
    try:
        import nvidia  # namespace package of the nvidia-* / cuda-toolkit wheels

        for root in nvidia.__path__:
            dirs += sorted(glob.glob(os.path.join(root, "*", "include")))
            dirs += sorted(glob.glob(os.path.join(root, "cuda_runtime", "include")))
    except ImportError:
        pass
    for env in ("CUDA_PATH", "CUDA_HOME"):
        if os.environ.get(env):
            dirs.append(os.path.join(os.environ[env], "include"))
    dirs.append("/usr/local/cuda/include")
    return [d for d in dict.fromkeys(dirs) if os.path.isfile(os.path.join(d, "cuda_fp16.h"))]


def compile_module(spec: ModuleSpec, arch: str) -> dict[str, str]:
    """Compile one module for `arch` (e.g. 'sm_80'); returns name expression -> lowered name.

    Raises RuntimeError carrying the NVRTC log on failure.
    """
    from cupy.cuda import nvrtc

    src = assembled(spec.filename)
    prog = nvrtc.createProgram(src, spec.filename, [], [])
    try:
        for name in spec.names:
            nvrtc.addNameExpression(prog, name)
        opts = list(BASE_OPTIONS + CUPY_ADDED_OPTIONS) + [f"--gpu-architecture={arch}"]
        opts += [f"-I{d}" for d in cuda_include_dirs()]
        try:
            nvrtc.compileProgram(prog, opts)
        except nvrtc.NVRTCError as exc:
            raise RuntimeError(f"NVRTC failed for {spec.filename} {spec.pair.key} {arch}:\n"
                               f"{nvrtc.getProgramLog(prog)}") from exc
        return {name: nvrtc.getLoweredName(prog, name) for name in spec.names}
    finally:
        nvrtc.destroyProgram(prog)

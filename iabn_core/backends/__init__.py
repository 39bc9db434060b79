"""Backend selection: CuPy arrays run on `cuda`; NumPy arrays on `numpy` (default) or
`emulator`; the environment variable IABN_BACKEND sets the NumPy default. `null` (NumPy
arrays) is a measuring tool: the cuda path's host work with no-op launches (backends/null.py)."""
from __future__ import annotations

import os

from .. import arrays

NUMPY_BACKENDS = ("numpy", "emulator", "null")
_instances: dict[str, object] = {}


def get(name: str):
    """The process-wide backend object for `name` (created on first use)."""
    b = _instances.get(name)
    if b is None:
        if name == "numpy":
            from .numpy_backend import NumpyBackend

            b = NumpyBackend()
        elif name == "emulator":
            from .emulator import EmulatorRuntime
            from .kernel_backend import KernelBackend

            b = KernelBackend(EmulatorRuntime())
        elif name == "null":
            from .kernel_backend import KernelBackend
            from .null import NullRuntime

            b = KernelBackend(NullRuntime())
        elif name == "cuda":
            from .cuda import CudaRuntime
            from .kernel_backend import KernelBackend

            b = KernelBackend(CudaRuntime())
        else:
            raise ValueError(f"backend must be 'cuda', 'numpy', 'emulator' or 'null', got "
                             f"{name!r}")
        _instances[name] = b
    return b


def select(x, requested: str | None):
    """Backend for array x, honouring an explicit request; errors name the `backend` argument.

    `requested` may also be a backend object, used as is: the torch adapter passes a
    KernelBackend whose CUDA workspaces come from torch's caching allocator.
    """
    if requested is not None and not isinstance(requested, str):
        return requested
    k = arrays.kind(x)
    if k == "cupy":
        if requested not in (None, "cuda"):
            raise ValueError(f"backend={requested!r} cannot run CuPy arrays; use backend='cuda' "
                             "or pass NumPy arrays")
        return get("cuda")
    name = requested or os.environ.get("IABN_BACKEND") or "numpy"
    if name == "cuda":
        raise ValueError("backend='cuda' needs CuPy arrays on a GPU; move the arrays with "
                         "cupy.asarray(...) or choose backend='numpy' / 'emulator'")
    if name not in NUMPY_BACKENDS:
        raise ValueError(f"backend must be 'cuda', 'numpy', 'emulator' or 'null', got "
                         f"{name!r}")
    return get(name)

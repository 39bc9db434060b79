"""GPU runtime: CuPy RawModule per (kernel file, dtype pair, device), compiled once per process.

NVRTC output is cached on disk by CuPy (CUPY_CACHE_DIR); the source string carries every header
(iabn_core.source), so the cache key covers all kernel code.
"""
from __future__ import annotations

import numpy as np

from ..dtypes import numpy_dtype
from ..instantiations import ModuleSpec
from ..nvrtc import BASE_OPTIONS, cuda_include_dirs
from ..source import assembled


def import_cupy():
    try:
        import cupy
    except ImportError as exc:  # the package itself imports fine without CuPy
        raise RuntimeError("the 'cuda' backend needs CuPy: pip install 'iabn[cuda12]' or "
                           "'iabn[cuda13]' (and a CUDA GPU)") from exc
    return cupy


def gpu_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no CuPy, no driver, or no device
        return False


class CudaRuntime:
    name = "cuda"
    null = np.uint64(0)  # a null pointer is passed as a 64-bit zero

    def __init__(self, allocator=None):
        self.cupy = import_cupy()
        self._modules: dict[tuple, object] = {}
        self._functions: dict[tuple, object] = {}
        self._allocator = allocator  # optional (shape, dtype_name) -> array, e.g. torch-backed
        self._sm: dict[int, int] = {}
        # The driver's cuLaunchKernel (Cython, no Python frame): launch programs call it
        # directly with their packed kernelParams (iabn_core.program).
        self.launch_packed = self.cupy.cuda.driver.launchKernel

    @property
    def sm_count(self) -> int:
        dev = self.cupy.cuda.Device()
        if dev.id not in self._sm:
            self._sm[dev.id] = dev.attributes["MultiProcessorCount"]
        return self._sm[dev.id]

    def ptr(self, a) -> int:
        return a.data.ptr

    def stream(self) -> int:
        return self.cupy.cuda.get_current_stream().ptr

    @staticmethod
    def handle(fn) -> int:
        # RawModule.get_function returns a RawKernel; its `kernel` is the loaded
        # cupy.cuda.function.Function (for the current device), whose `ptr` is the CUfunction.
        return fn.kernel.ptr

    def empty(self, shape, dtype_name):
        if self._allocator is not None:
            return self._allocator(shape, dtype_name)
        return self.cupy.empty(shape, dtype=numpy_dtype(dtype_name))

    def function(self, spec: ModuleSpec, name: str):
        dev = self.cupy.cuda.Device().id
        key = (spec, name, dev)
        fn = self._functions.get(key)
        if fn is None:
            mod_key = (spec, dev)
            mod = self._modules.get(mod_key)
            if mod is None:
                opts = BASE_OPTIONS + tuple(f"-I{d}" for d in cuda_include_dirs())
                mod = self.cupy.RawModule(code=assembled(spec.filename), options=opts,
                                          name_expressions=spec.names)
                self._modules[mod_key] = mod
            fn = self._functions[key] = mod.get_function(name)
        return fn

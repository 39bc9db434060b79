"""A measuring tool, not an engine: the `null` runtime does everything the `cuda` runtime does
per call except the launch itself, over NumPy buffers.

With IABN_BACKEND=null, NumPy arrays (and CPU tensors through iabn.torch) take the full
KernelBackend path: validation, plans, workspace allocation, kernel lookup and argument
marshalling, and one call per kernel launch, each to a function that does nothing. Timing that
path on any CPU gives the host cost a GPU run pays on top of its kernels
(`python -m benchmarks --parts overhead`). Results are meaningless: x is left as it was and
workspaces stay uninitialised.
"""
from __future__ import annotations

import numpy as np

from ..dtypes import numpy_dtype
from ..instantiations import ModuleSpec

# An H100's SM count, so grids (and the G of every plan) are the sizes a real GPU run gets.
NULL_SM_COUNT = 132


def _no_launch(grid, block, args) -> None:
    """Stands in for a compiled kernel: called once per launch, does nothing."""


class NullRuntime:
    name = "null"
    null = np.uint64(0)  # null pointers as the cuda runtime passes them
    sm_count = NULL_SM_COUNT

    def __init__(self, allocator=None):
        self._functions: dict[tuple, object] = {}
        self._allocator = allocator  # optional (shape, dtype_name) -> array, as in CudaRuntime

    # The driver-shaped launch of iabn_core.program: a C-level call that takes and ignores any
    # positional arguments, so `null` takes the cuda runtime's Python route call for call.
    launch_packed = "".format

    def ptr(self, a) -> int:
        return a.ctypes.data

    def stream(self) -> int:
        return 0

    @staticmethod
    def handle(fn) -> int:
        return 0

    def empty(self, shape, dtype_name):
        if self._allocator is not None:
            return self._allocator(shape, dtype_name)
        return np.empty(shape, dtype=numpy_dtype(dtype_name))

    def function(self, spec: ModuleSpec, name: str):
        # The same keyed lookup CudaRuntime.function makes (device 0), minus the compile.
        key = (spec, name, 0)
        fn = self._functions.get(key)
        if fn is None:
            if name not in spec.names:
                raise KeyError(f"{name} is not instantiated in {spec.filename}")
            fn = self._functions[key] = _no_launch
        return fn

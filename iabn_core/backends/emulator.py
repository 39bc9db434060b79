"""CPU runtime: the same kernels, compiled by the host compiler and run by iabn_core.emulator."""
from __future__ import annotations

import numpy as np

from ..dtypes import numpy_dtype
from ..instantiations import ModuleSpec
from ..source import assembled

# A deliberately small "device": few blocks per wave, so even modest test shapes split each
# channel over several blocks and exercise the ordered merge of partials.
EMULATED_SM_COUNT = 1


class EmulatorRuntime:
    name = "emulator"
    null = None
    sm_count = EMULATED_SM_COUNT

    def __init__(self):
        self._modules: dict[ModuleSpec, object] = {}
        self.traffic = [0, 0]  # global bytes (loaded, stored) over all launches; tests reset it

    def ptr(self, a) -> int:
        return a.ctypes.data

    def empty(self, shape, dtype_name):
        # NaN-filled rather than uninitialised so a kernel that reads what it never wrote shows up.
        return np.full(shape, np.nan, dtype=numpy_dtype(dtype_name))

    def function(self, spec: ModuleSpec, name: str):
        from ..emulator import build_module

        mod = self._modules.get(spec)
        if mod is None:
            mod = self._modules[spec] = build_module(assembled(spec.filename), list(spec.names))
        return _Launcher(mod.get_function(name), self.traffic)

    def stream(self) -> int:
        return 0

    @staticmethod
    def handle(fn):
        return fn

    @staticmethod
    def launch_packed(fn, gx, gy, gz, bx, by, bz, smem, stream, params, extra) -> None:
        """The driver's launch signature over the emulator: runs the kernel now."""
        fn.kernel.launch_packed((gx, gy, gz), (bx, by, bz), smem, params)
        fn.count_traffic()

    @staticmethod
    def check_packed(fn, args) -> None:
        fn.kernel.check_packed(args)


class _Launcher:
    """An emulated kernel as the stages call it (k(grid, block, args)), adding its global
    traffic to the runtime's counters after every launch."""

    def __init__(self, kernel, traffic: list):
        self.kernel, self._traffic = kernel, traffic

    def __call__(self, grid, block, args) -> None:
        self.kernel(grid, block, args)
        self.count_traffic()

    def count_traffic(self) -> None:
        loaded, stored = self.kernel.last_traffic
        self._traffic[0] += loaded
        self._traffic[1] += stored

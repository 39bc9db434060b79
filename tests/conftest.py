"""Shared fixtures: the backends every kernel test body runs on.

`numpy` and `emulator` always run (the emulator executes the exact CUDA sources on the CPU);
`cuda` runs when CuPy sees a GPU and is skipped, with the reason, otherwise.
"""
from __future__ import annotations

import functools

import pytest


@functools.lru_cache(maxsize=None)
def gpu_available() -> bool:
    from iabn_core.backends.cuda import gpu_available as probe

    return probe()


def backend_params(*names):
    out = []
    for name in names:
        if name == "cuda":
            out.append(pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
                not gpu_available(), reason="no CUDA GPU on this machine")]))
        else:
            out.append(name)
    return out


ALL_BACKENDS = backend_params("numpy", "emulator", "cuda")
KERNEL_BACKENDS = backend_params("emulator", "cuda")

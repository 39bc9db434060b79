"""The package imports and runs on the CPU without CuPy, and ships its kernel sources."""
from __future__ import annotations

import subprocess
import sys
import textwrap

from iabn_core.instantiations import KERNEL_FILES


def test_imports_and_runs_without_cupy():
    code = textwrap.dedent("""
        import sys
        sys.modules["cupy"] = None          # any `import cupy` now raises ImportError
        import numpy as np
        import iabn.cupy as iabn
        x = np.random.default_rng(0).normal(size=(4, 3, 5)).astype(np.float32)
        ctx = iabn.forward(x)
        assert abs(float(ctx.mean[0])) < 10 and ctx.count == 20
        try:
            iabn.forward(x, backend="cuda")
        except ValueError as e:
            assert "CuPy" in str(e), e
        else:
            raise AssertionError("cuda backend accepted NumPy arrays")
        from iabn_core.backends.cuda import import_cupy
        try:
            import_cupy()
        except RuntimeError as e:
            assert "pip install" in str(e), e
        else:
            raise AssertionError("no error without CuPy")
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_kernel_sources_are_found_and_complete():
    from iabn_core.source import kernel_dir

    d = kernel_dir()
    for name in KERNEL_FILES + ("common.cuh", "activations.cuh", "layout.cuh", "reduce.cuh"):
        assert (d / name).is_file(), name


def test_installed_package_ships_kernels_as_data():
    import importlib.resources

    files = importlib.resources.files("iabn_kernels")
    for name in KERNEL_FILES:
        assert files.joinpath(name).is_file(), name
    emu = importlib.resources.files("iabn_core.emulator")
    assert emu.joinpath("include", "emu_cuda.h").is_file()

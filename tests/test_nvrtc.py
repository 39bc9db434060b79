"""Every kernel instantiation compiles with NVRTC for real GPU archs, with no GPU present."""
from __future__ import annotations

import pytest

from iabn_core.instantiations import KERNEL_FILES, all_modules
from iabn_core.dtypes import PAIRS

pytest.importorskip("cupy", reason="NVRTC comes with CuPy (pip install '.[test]')")

ARCHS = ("sm_75", "sm_80", "sm_90")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("spec", all_modules(), ids=lambda s: f"{s.filename}-{s.pair.key}")
def test_compiles_and_lowers_every_name(spec, arch):
    from iabn_core.nvrtc import compile_module

    lowered = compile_module(spec, arch)
    assert set(lowered) == set(spec.names)
    for name, mangled in lowered.items():
        base = name.split("<")[0]
        assert mangled.startswith("_Z") and base in mangled, (name, mangled)


def test_table_covers_every_pair_file_activation_layout_and_width():
    specs = all_modules()
    assert len(specs) == len(PAIRS) * len(KERNEL_FILES)
    per_file = {"stats.cu": 2 * 2 + 1, "forward.cu": 3 * 2 * 2, "backward.cu": 2 * 3 * 2 * 2 + 1}
    for spec in specs:
        assert len(set(spec.names)) == per_file[spec.filename], spec
        assert all(spec.pair.c_x in n or spec.pair.c_acc in n for n in spec.names)


def test_a_broken_kernel_fails_with_the_nvrtc_log(monkeypatch):
    from iabn_core import nvrtc, source
    from iabn_core.instantiations import module_for

    monkeypatch.setattr(source, "assembled", lambda f: "this is not CUDA;")
    monkeypatch.setattr(nvrtc, "assembled", lambda f: "this is not CUDA;")
    with pytest.raises(RuntimeError, match="NVRTC failed"):
        nvrtc.compile_module(module_for("forward.cu", PAIRS[0]), "sm_80")


def test_headers_are_inlined_so_the_cache_key_covers_them():
    from iabn_core.source import assembled

    src = assembled("backward.cu")
    assert '#include "' not in src
    for header in ("common.cuh", "activations.cuh", "layout.cuh", "reduce.cuh"):
        assert f'#line 1 "kernels/{header}"' in src

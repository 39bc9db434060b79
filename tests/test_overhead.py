"""Host-overhead tooling: the `null` runtime (the cuda path's host work, no-op launches) and
the `overhead` benchmark part. Timings are never asserted; launch counts and the rows' shape
are (machine-independent)."""
from __future__ import annotations

import numpy as np
import pytest

from iabn_core import backends, ops
from iabn_core.validate import IABNError

torch = pytest.importorskip("torch")


def _arrays(shape=(2, 8, 4, 4), seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape).astype(np.float32)
    dz = rng.normal(size=shape).astype(np.float32)
    c = shape[1]
    return x, dz, np.ones(c, np.float32), np.zeros(c, np.float32), np.zeros(c, np.float32), \
        np.ones(c, np.float32)


def test_null_backend_runs_the_kernel_path_without_launching():
    """Same stage sequence and launch count as a kernel backend; nothing is computed, so the
    caller's buffers keep their bytes."""
    be = backends.get("null")
    x, dz, w, b, rm, rv = _arrays()
    before = [a.copy() for a in (x, rm, rv)]
    n0 = be.launches
    ctx = ops.forward(x, w, b, rm, rv, backend="null")
    fwd = be.launches - n0
    ops.backward(ctx, x, dz)
    bwd = be.launches - n0 - fwd
    assert ctx.backend is be and be.rt.name == "null"
    assert (fwd, bwd) == (2, 2)
    for a, a0 in zip((x, rm, rv), before):
        np.testing.assert_array_equal(a, a0)


def test_null_backend_still_validates(monkeypatch):
    monkeypatch.setenv("IABN_BACKEND", "null")
    x, _, w, b, rm, rv = _arrays()
    with pytest.raises(IABNError, match="running_var"):
        ops.forward(x, w, b, rm, rv[:3])
    with pytest.raises(IABNError, match="read-only"):
        x.flags.writeable = False
        ops.forward(x, w, b, rm, rv)


def test_null_backend_through_torch(monkeypatch):
    """IABN_BACKEND=null routes CPU tensors through the torch-allocating null backend."""
    from iabn.torch import InPlaceABN
    from iabn.torch_ops import _null_backend

    monkeypatch.setenv("IABN_BACKEND", "null")
    m = InPlaceABN(8)
    x = torch.randn(2, 8, 4, 4, requires_grad=True)
    be = _null_backend()
    n0 = be.launches
    m(x.clone()).sum().backward()
    assert be.launches - n0 == 4
    assert x.grad is not None and x.grad.shape == x.shape


def test_overhead_rows():
    from benchmarks import overhead
    from benchmarks.cases import Settings

    rows = overhead.overhead_rows(Settings(tiny=True))
    got = {(r["impl"], r["path"], r["variant"], r["stage"]): r for r in rows}
    for stage in overhead.STAGES:
        for key in (("torch", "cpu", "plain", stage), ("iabn", "cpu", "plain", stage),
                    ("iabn", "null", "plain", stage)):
            assert got[key]["us_per_call"] > 0, key
        for variant in overhead.VARIANTS:
            assert got[("iabn", "null", variant, stage)]["us_per_call"] > 0, variant
    for variant in overhead.VARIANTS:
        want = [1, 2, 3] if variant == "eval" else [2, 2, 4]
        assert [got[("iabn", "null", variant, s)]["launches"] for s in overhead.STAGES] == want
        frames = got[("iabn", "null", variant, "step")]["frames"]
        assert 0 < frames <= overhead.FRAME_BUDGET, (variant, frames)
    ratios = overhead.ratios(rows)
    assert {(r["path"], r["variant"], r["stage"]) for r in ratios} == {
        ("cpu", "plain", s) for s in overhead.STAGES} | {
        ("null", v, s) for v in overhead.VARIANTS for s in overhead.STAGES}
    md = "\n".join(overhead.summary_section(rows))
    assert "null step <= 1.0x" in md and "cpu step <= 4.0x" in md and "frames per step" in md


def test_host_profile_names_every_piece_on_the_cpu(tmp_path, monkeypatch):
    """benchmarks.profile_host (run on the GPU machine) works without one: the null path."""
    from benchmarks import profile_host

    monkeypatch.setenv("IABN_BACKEND", "null")  # what main() sets without a GPU; restored after
    assert profile_host.main(["--out", str(tmp_path), "--iters", "20"]) == 0
    text = (tmp_path / "profile_host.txt").read_text()
    for piece in ("to_core", "from_core", "_device_scope", "forward op body",
                  "backward op body", "by tottime", "by cumulative"):
        assert piece in text
    assert "step of iabn InPlaceABN" in text and "identity Python autograd.Function" in text
    us = [float(line.split()[0]) for line in text.splitlines()[3:12]]
    assert len(us) == 9 and all(u > 0 for u in us)

"""Residual argument checks (z = act(BN(x) + r)): IABNError naming `residual` (or
`residual_out`), raised before any byte of any buffer is written."""
from __future__ import annotations

import numpy as np
import pytest

from iabn_core import ops
from iabn_core.verify import channels_last
from test_validation import assert_same, make, snapshot

from iabn_core.validate import IABNError


@pytest.fixture(params=["numpy", "emulator"])
def backend(request):
    return request.param


def _forward_rejects(match, x, params, residual, backend):
    before = snapshot(x, residual, *params.values())
    with pytest.raises(IABNError, match=match):
        ops.forward(x, **params, backend=backend, residual=residual)
    assert_same(before, [x, residual, *params.values()])


def test_forward_residual_must_be_like_x(backend):
    x, params = make(shape=(4, 3, 8))
    _forward_rejects(r"residual has shape", x, params, np.zeros((4, 3, 7), np.float32), backend)
    _forward_rejects(r"residual has dtype float64", x, params, np.zeros((4, 3, 8)), backend)
    x4, p4 = make(shape=(2, 3, 4, 4))
    _forward_rejects(r"residual must have x's memory layout", x4, p4,
                     channels_last(np.ones((2, 3, 4, 4), np.float32)), backend)
    _forward_rejects(r"residual must be a NumPy or CuPy array", x, params, [[0.0]], backend)


def test_forward_residual_may_not_overlap_written_buffers(backend):
    x, params = make(shape=(4, 3, 8))
    _forward_rejects(r"residual shares memory with x", x, params, x[:, :, :], backend)
    buf = np.zeros(4 * 3 * 8 + 2, np.float32)
    r = buf[2:].reshape(4, 3, 8)  # its first element is running_mean's last
    params["running_mean"] = buf[:3]
    _forward_rejects(r"residual shares memory with running_mean", x, params, r, backend)


def test_read_only_residual_is_accepted_and_unchanged(backend):
    x, params = make(shape=(4, 3, 8))
    r = np.random.default_rng(1).normal(size=x.shape).astype(np.float32)
    keep = r.copy()
    r.flags.writeable = False
    ctx = ops.forward(x, **params, backend=backend, residual=r)
    dz = np.ones_like(x)
    dx, dw, db, dr = ops.backward(ctx, x, dz, residual=r)
    np.testing.assert_array_equal(r, keep)
    assert dr.shape == x.shape and dr is not dz and dr is not r


def _backward_setup(backend, with_residual=True, shape=(4, 3, 8)):
    x, params = make(shape=shape)
    r = np.random.default_rng(2).normal(size=shape).astype(np.float32)
    ctx = ops.forward(x, **params, backend=backend, residual=r if with_residual else None)
    dz = np.random.default_rng(3).normal(size=shape).astype(np.float32)
    return ctx, x, dz, r


def _backward_rejects(match, ctx, z, dz, **kw):
    arrays = [z, dz] + [a for a in kw.values() if isinstance(a, np.ndarray)]
    before = snapshot(*arrays)
    with pytest.raises(IABNError, match=match):
        ops.backward(ctx, z, dz, **kw)
    assert_same(before, arrays)


def test_backward_needs_the_residual_exactly_when_forward_had_one(backend):
    ctx, z, dz, r = _backward_setup(backend)
    _backward_rejects(r"residual is required", ctx, z, dz)
    ctx2, z2, dz2, r2 = _backward_setup(backend, with_residual=False)
    _backward_rejects(r"residual was given to backward, but the forward had none", ctx2, z2,
                      dz2, residual=r2)
    assert len(ops.backward(ctx2, z2, dz2)) == 3
    assert len(ops.backward(ctx, z, dz, residual=r)) == 4


def test_backward_residual_checks(backend):
    ctx, z, dz, r = _backward_setup(backend)
    _backward_rejects(r"residual has shape", ctx, z, dz, residual=r[:, :, :4].copy())
    _backward_rejects(r"residual shares memory with dz", ctx, z, dz, residual=dz)
    out = np.empty_like(dz)
    _backward_rejects(r"residual shares memory with out", ctx, z, dz, out=out, residual=out)
    _backward_rejects(r"residual_out shares memory with z", ctx, z, dz, residual=r,
                      residual_out=z)
    _backward_rejects(r"residual_out shares memory with residual", ctx, z, dz, residual=r,
                      residual_out=r)
    ro = np.empty_like(dz)
    ro.flags.writeable = False
    _backward_rejects(r"residual_out is read-only", ctx, z, dz, residual=r, residual_out=ro)


def test_backward_residual_out_receives_the_gradient(backend):
    ctx, z, dz, r = _backward_setup(backend)
    buf = np.full_like(dz, np.nan)
    dx, dw, db, dr = ops.backward(ctx, z, dz, residual=r, residual_out=buf)
    assert dr is buf and np.all(np.isfinite(buf))

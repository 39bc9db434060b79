"""Bugs found by the review of the core (buffer-level ops, validation, signature cache,
kernels), each with the smallest reproducer."""
from __future__ import annotations

import numpy as np
import pytest

from iabn_core import ops, reference as ref, signature
from iabn_core.validate import IABNError

BACKENDS = ["numpy", "emulator"]


def _inputs(seed=0, shape=(3, 4, 5)):
    rng = np.random.default_rng(seed)
    c = shape[1]
    x = rng.normal(size=shape).astype(np.float32)
    w = rng.uniform(0.5, 1.5, c).astype(np.float32)
    b = rng.normal(size=c).astype(np.float32)
    return x, w, b, np.zeros(c, np.float32), np.ones(c, np.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cached", [False, True])
def test_backward_with_out_only_reads_dz_so_a_read_only_dz_is_accepted(backend, cached):
    """README: `backward(ctx, z, dz, out=buf)`: dx into buf, dz only read. A read-only dz was
    refused ("dz is read-only; backward writes dx into dz's buffer") on both the cached and
    the uncached path, although nothing writes it."""
    if not cached:
        signature.clear()
    x, w, b, rm, rv = _inputs()
    x0 = x.copy()
    if cached:  # make the signature a hit
        ops.forward(x.copy(), w, b, rm.copy(), rv.copy(), backend=backend)
    ctx = ops.forward(x, w, b, rm, rv, backend=backend)
    dz = np.random.default_rng(1).normal(size=x.shape).astype(np.float32)
    dz0 = dz.copy()
    dz.flags.writeable = False
    out = np.empty_like(x)
    dx, dw, db = ops.backward(ctx, x, dz, out=out)
    assert dx is out and dz.tobytes() == dz0.tobytes()
    st = ref.forward(x0.astype(np.float64), w, b, training=True, eps=1e-5,
                     activation="leaky_relu", param=0.01)
    exp = ref.backward(x.astype(np.float64), dz0.astype(np.float64), st["invstd"], st["count"],
                       w, b, training=True, eps=1e-5, activation="leaky_relu", param=0.01)
    for got, want in ((dx, exp["dx"]), (dw, exp["dweight"]), (db, exp["dbias"])):
        assert ref.rel_error(got, want) < 1e-4
    # without out=, dx goes over dz: a read-only dz is still refused
    with pytest.raises(IABNError, match="^dz is read-only"):
        ops.backward(ctx, x, dz)


@pytest.mark.parametrize("layout", ["ncs", "nsc"])
@pytest.mark.parametrize("value", [np.inf, np.nan])
@pytest.mark.parametrize("residual", [False, True])
def test_eval_backward_dx_does_not_depend_on_xhat(layout, value, residual):
    """Eval: dx = gamma * invstd * dy (the statistics are constants; reference.input_grad).
    The kernel computed scale * (dy - 0 - xhat * 0), so a non-finite z (from an Inf or NaN in
    x) gave dx = NaN where the NumPy backend and the reference give the finite k * dy."""
    shape, c = (3, 4, 8), 4
    rng = np.random.default_rng(2)
    x = rng.normal(size=shape).astype(np.float32)
    r = rng.normal(size=shape).astype(np.float32) if residual else None
    dz = rng.normal(size=shape).astype(np.float32)
    w = rng.uniform(0.5, 1.5, c).astype(np.float32)
    b, rm = rng.normal(size=c).astype(np.float32), rng.normal(size=c).astype(np.float32)
    rv = rng.uniform(0.5, 2, c).astype(np.float32)
    x[1, 2, 3] = value
    if layout == "nsc":
        x, dz = (np.moveaxis(np.ascontiguousarray(np.moveaxis(a, 1, -1)), -1, 1) for a in (x, dz))
        r = None if r is None else np.moveaxis(np.ascontiguousarray(np.moveaxis(r, 1, -1)), -1, 1)
    got = {}
    for be in BACKENDS:
        xx, d = x.copy(order="K"), dz.copy(order="K")
        ctx = ops.forward(xx, w, b, rm, rv, training=False, residual=r, backend=be)
        got[be] = (xx, ops.backward(ctx, xx, d, residual=r)[0], ctx.invstd)
    z, _, invstd = got["numpy"]
    want = ref.backward(z.astype(np.float64), dz.astype(np.float64), invstd, 1, w, b,
                        training=False, eps=1e-5, activation="leaky_relu", param=0.01,
                        residual=r)["dx"]
    assert np.isfinite(want).all()  # dx = k * dy: finite although z holds an Inf or NaN
    for be in BACKENDS:
        dx = got[be][1]
        assert np.isfinite(dx).all(), be
        assert ref.rel_error(dx, want) < 1e-5, be


def _both(fn):
    """fn(backend) on the NumPy backend and the emulated kernels."""
    return {be: fn(be) for be in BACKENDS}


@pytest.mark.xfail(strict=True, reason="kernels keep Welford's m2 = count * var in the "
                   "accumulator dtype: it overflows float32 for finite inputs whose variance "
                   "still fits (here 2.25e38), and the non-finite rule then makes the channel "
                   "NaN; the NumPy backend (float64 sums) gives finite statistics and z")
def test_float32_variance_near_the_range_limit_agrees_between_backends():
    x0 = (np.array([1, -1] * 4, np.float32) * np.float32(1.5e19)).reshape(2, 1, 4)
    assert np.var(x0.astype(np.float64)) < np.finfo(np.float32).max  # var is representable

    def run(be):
        x, rm, rv = x0.copy(), np.zeros(1, np.float32), np.ones(1, np.float32)
        ctx = ops.forward(x, None, None, rm, rv, backend=be)
        return np.concatenate([x.ravel(), rm, rv, np.asarray(ctx.var, np.float32)])

    got = _both(run)
    assert np.array_equal(np.isnan(got["numpy"]), np.isnan(got["emulator"]))


@pytest.mark.xfail(strict=True, reason="ELU with a -Inf residual element: z = -alpha; the "
                   "kernels compute z + alpha with alpha rounded to float32 (0 -> dy = 0, "
                   "0 * Inf xhat = NaN over the channel's dx and dweight), the NumPy backend "
                   "with the Python float alpha (1e-8 > 0 -> finite dx, dweight -Inf)")
def test_elu_with_a_minus_inf_residual_agrees_between_backends():
    shape, c = (3, 4, 8), 4
    rng = np.random.default_rng(1)
    x0, r, dz0 = (rng.normal(size=shape).astype(np.float32) for _ in range(3))
    w = rng.uniform(0.5, 1.5, c).astype(np.float32)
    b = rng.normal(size=c).astype(np.float32)
    r[0, 1, 5] = -np.inf

    def run(be):
        x, dz = x0.copy(), dz0.copy()
        ctx = ops.forward(x, w, b, residual=r, activation="elu", activation_param=0.7,
                          backend=be)
        dx, dw, db, dr = ops.backward(ctx, x, dz, residual=r)
        return np.concatenate([a.ravel() for a in (x, dx, dw, db)])

    got = _both(run)
    assert np.array_equal(np.isnan(got["numpy"]), np.isnan(got["emulator"]))

"""NumpyBackend, stage by stage, against the float64 reference for every dtype pair and layout.

Each stage is compared with the reference evaluated on exactly the inputs the stage received
(cast to float64), so a tolerance only has to absorb the rounding of the stage's own outputs
into their storage dtype. The in-place contract is checked through the caller's original
4-D buffer: if a stage rebinds instead of writing, that buffer keeps the old values.
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest

import iabn_core.backends.numpy_backend as nb
from iabn_core import reference as ref
from iabn_core.backends.base import Problem
from iabn_core.dtypes import PAIRS, numpy_dtype
from iabn_core.merge import merge_partials

# Relative to the output scale; a pair is as coarse as its coarsest storage dtype.
TOL = {"float64": 1e-12, "float32": 1e-5, "float16": 2e-3, "bfloat16": 2e-2}
EPS = 1e-5
MOMENTUM = 0.1
ACT_PARAM = {"identity": 0.0, "leaky_relu": 0.1, "elu": 0.7}
LAYOUTS = ("ncs", "nsc")

pair_ids = [p.key for p in PAIRS]


def tol(pair):
    return max(TOL[pair.x], TOL[pair.param])


def check(actual, expected, rtol, what=""):
    err = ref.rel_error(actual, expected)
    assert err <= rtol, f"{what}: relative error {err:.3e} > {rtol:.1e}"


def f64(a):
    return np.asarray(a, dtype=np.float64)


def make_problem(pair, layout, n, c, s, activation="identity", affine=True):
    return Problem(n=n, c=c, s=s, layout=layout, x_dtype=pair.x, param_dtype=pair.param,
                   acc_dtype=pair.acc, activation=activation,
                   activation_param=ACT_PARAM[activation], eps=EPS, has_weight=affine,
                   has_bias=affine)


def make_tensor(rng, pair, layout, n, c, h, w, loc=None):
    """A 4-D buffer as a user would hold it (NCHW or NHWC) and its 3-D view for the backend."""
    dt = numpy_dtype(pair.x)
    loc = np.zeros(c) if loc is None else loc
    base = (rng.normal(size=(n, c, h, w)) + loc[None, :, None, None]).astype(dt)
    if layout == "nsc":
        base = np.ascontiguousarray(base.transpose(0, 2, 3, 1))
        x3 = base.reshape(n, h * w, c)
    else:
        x3 = base.reshape(n, c, h * w)
    assert np.shares_memory(x3, base)
    return base, x3


def to_ncs(x3, layout):
    return ref.to_ncs(x3, layout)


@pytest.fixture
def backend():
    return nb.NumpyBackend()


def test_backend_name(backend):
    assert backend.name == "numpy"


@pytest.mark.parametrize("pair", PAIRS, ids=pair_ids)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("activation", ref.ACTIVATIONS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_stages_match_reference(backend, pair, layout, activation, training, affine):
    n, c, h, w = 4, 3, 2, 3
    # crc32, not hash(): str hashing is salted per process and seeds must be reproducible
    rng = np.random.default_rng(zlib.crc32(f"{pair.key}-{layout}-{activation}".encode()))
    prob = make_problem(pair, layout, n, c, h * w, activation, affine)
    pdt, acc, rtol = numpy_dtype(pair.param), numpy_dtype(pair.acc), tol(pair)
    base, x3 = make_tensor(rng, pair, layout, n, c, h, w, loc=np.array([1.0, -2.0, 3.0]))
    _, dz3 = make_tensor(rng, pair, layout, n, c, h, w)
    weight = rng.normal(size=c).astype(pdt) if affine else None
    bias = rng.normal(size=c).astype(pdt) if affine else None
    rm = rng.normal(size=c).astype(pdt)
    rv = rng.uniform(0.5, 2.0, size=c).astype(pdt)
    rm0, rv0 = rm.copy(), rv.copy()
    x64 = to_ncs(x3, layout)

    # batch_stats + finalize
    if training:
        partials = backend.batch_stats(prob, x3)
        assert partials.dtype == acc and partials.shape[1:] == (3, c)
        count, mean, var = ref.batch_stats(x64)
        merged = backend.merge_stats(prob, partials)
        np.testing.assert_array_equal(merged[0], count)
        check(merged[1], mean, rtol, "mean")
        check(merged[2], var, rtol, "var")
        stats = backend.finalize(prob, partials, rm, rv, MOMENTUM, training)
        mg = merge_partials_f64(partials)
        want_rm, want_rv = ref.running_update(f64(rm0), f64(rv0), mg[1], mg[2], mg[0], MOMENTUM)
        assert rm.dtype == pdt and rv.dtype == pdt  # updated in their own dtype, in place
        check(rm, want_rm, rtol, "running_mean")
        check(rv, want_rv, rtol, "running_var")
        want_stats = np.stack([mg[0], mg[1], mg[2], ref.invstd(mg[2], EPS)])
    else:
        stats = backend.finalize(prob, None, rm, rv, MOMENTUM, training)
        np.testing.assert_array_equal(rm, rm0)  # eval never touches running stats
        np.testing.assert_array_equal(rv, rv0)
        want_stats = np.stack([np.full(c, n * h * w), f64(rm0), f64(rv0),
                               ref.invstd(f64(rv0), EPS)])
    assert stats.dtype == acc and stats.shape == (4, c)
    for row, name in enumerate(("count", "mean", "var", "invstd")):
        check(stats[row], want_stats[row], rtol, name)

    # forward, in place
    st64 = f64(stats)
    w64 = None if weight is None else f64(weight)
    b64 = None if bias is None else f64(bias)
    gam = ref.gamma(w64, EPS, c)
    b_eff = np.zeros(c) if b64 is None else b64
    want_z = ref.affine_act(x64, st64[1], st64[3], gam, b_eff, activation, prob.activation_param)
    owned = [a.copy() for a in (stats, dz3) + ((weight, bias) if affine else ())]
    backend.forward(prob, x3, stats, weight, bias)
    assert x3.dtype == numpy_dtype(pair.x)
    check(to_ncs(x3, layout), want_z, rtol, "z (via the 3-D view)")
    check(base_to_ncs(base, layout), want_z, rtol, "z (via the caller's 4-D buffer)")
    assert_unchanged(owned, [stats, dz3] + ([weight, bias] if affine else []), "forward")

    # backward_reduce / backward_finalize
    z3 = x3
    z64, dz64 = to_ncs(z3, layout), to_ncs(dz3, layout)
    bwd = ref.backward(z64, dz64, st64[3], st64[0], w64, b64, training=training, eps=EPS,
                       activation=activation, param=prob.activation_param)
    owned = [a.copy() for a in (z3, dz3, stats)]
    psums = backend.backward_reduce(prob, z3, dz3, stats, weight, bias)
    assert_unchanged(owned, [z3, dz3, stats], "backward_reduce")
    assert psums.dtype == acc and psums.shape[1:] == (2, c)
    check(f64(psums).sum(axis=0)[0], bwd["sum_dy"], rtol, "sum_dy")
    check(f64(psums).sum(axis=0)[1], bwd["sum_dy_xhat"], rtol, "sum_dy_xhat")
    sums, dweight, dbias = backend.backward_finalize(prob, psums, weight, bias)
    assert sums.dtype == acc and sums.shape == (2, c)
    s64 = f64(sums)
    check(s64, f64(psums).sum(axis=0), TOL[pair.acc], "sums")
    if affine:
        assert dweight.dtype == pdt and dbias.dtype == pdt
        check(dweight, ref.abs_slope(w64) * s64[1], rtol, "dweight")
        check(dbias, s64[0], rtol, "dbias")
    else:
        assert dweight is None and dbias is None

    # backward_elementwise, in place on dz3
    want_dx = ref.input_grad(bwd["dy"], bwd["xhat"], gam, st64[3], st64[0], s64[0], s64[1],
                             training)
    owned = [a.copy() for a in (z3, stats, sums)]
    backend.backward_elementwise(prob, z3, dz3, stats, sums, weight, bias, training)
    assert dz3.dtype == numpy_dtype(pair.x)
    check(to_ncs(dz3, layout), want_dx, rtol, "dx")
    assert_unchanged(owned, [z3, stats, sums], "backward_elementwise")


def merge_partials_f64(partials):
    return merge_partials(f64(partials))


def base_to_ncs(base, layout):
    n = base.shape[0]
    if layout == "nsc":
        return ref.to_ncs(base.reshape(n, -1, base.shape[-1]), "nsc")
    return ref.to_ncs(base.reshape(n, base.shape[1], -1), "ncs")


def assert_unchanged(before, after, stage):
    for i, (a, b) in enumerate(zip(before, after)):
        assert np.array_equal(f64(a), f64(b), equal_nan=True), f"{stage} modified buffer #{i}"


@pytest.mark.parametrize("pair", PAIRS, ids=pair_ids)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(1, 1, 1, 2), (2, 1, 1, 1), (5, 7, 1, 1), (3, 2, 1, 11)],
                         ids=lambda s: "x".join(map(str, s)))
def test_batch_stats_odd_shapes(backend, pair, layout, shape):
    n, c, h, w = shape
    rng = np.random.default_rng(7)
    prob = make_problem(pair, layout, n, c, h * w)
    _, x3 = make_tensor(rng, pair, layout, n, c, h, w, loc=np.full(c, 5.0))
    partials = backend.batch_stats(prob, x3)
    assert partials.shape == (1, 3, c)  # G = 1 for this backend
    count, mean, var = ref.batch_stats(to_ncs(x3, layout))
    np.testing.assert_array_equal(partials[0, 0], count)
    check(partials[0, 1], mean, tol(pair), "mean")
    # variance error is judged against the data's scale: var is a difference of squares
    assert np.max(np.abs(f64(partials[0, 2]) - var)) <= tol(pair) * max(1.0, var.max())


@pytest.mark.parametrize("pair", PAIRS, ids=pair_ids)
def test_merge_stats_drops_empty_pieces(backend, pair):
    prob = make_problem(pair, "ncs", 6, 3, 4)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6, 3, 4))
    pieces = [x[:2], x[2:2], x[2:6], x[6:]]
    partials = ref.stats_of_pieces(pieces).astype(numpy_dtype(pair.acc))
    merged = backend.merge_stats(prob, partials)
    assert merged.dtype == numpy_dtype(pair.acc) and merged.shape == (3, 3)
    count, mean, var = ref.batch_stats(x)
    np.testing.assert_array_equal(merged[0], count)
    check(merged[1:], np.stack([mean, var]), TOL[pair.acc], "merged")


def test_finalize_training_without_running_stats(backend):
    pair = PAIRS[0]
    prob = make_problem(pair, "ncs", 3, 2, 5)
    x3 = np.random.default_rng(2).normal(size=(3, 2, 5)).astype(np.float32)
    stats = backend.finalize(prob, backend.batch_stats(prob, x3), None, None, MOMENTUM, True)
    count, mean, var = ref.batch_stats(x3)
    check(stats[2], var, 1e-6, "var")


def test_finalize_eval_requires_running_stats(backend):
    prob = make_problem(PAIRS[0], "ncs", 3, 2, 5)
    with pytest.raises(ValueError):
        backend.finalize(prob, None, None, None, MOMENTUM, False)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_chunking_does_not_change_results(backend, monkeypatch, layout, training):
    """Tiny chunks (one sample at a time) give the same answers as one big chunk."""
    pair = next(p for p in PAIRS if p.x == "float64")
    n, c, h, w = 5, 3, 2, 2
    prob = make_problem(pair, layout, n, c, h * w, "elu", True)
    rng = np.random.default_rng(4)
    _, x3 = make_tensor(rng, pair, layout, n, c, h, w)
    _, dz3 = make_tensor(rng, pair, layout, n, c, h, w)
    weight, bias = rng.normal(size=c), rng.normal(size=c)

    def run():
        x, dz = x3.copy(), dz3.copy()
        rm, rv = np.zeros(c), np.ones(c)
        parts = backend.batch_stats(prob, x) if training else None
        stats = backend.finalize(prob, parts, rm, rv, MOMENTUM, training)
        backend.forward(prob, x, stats, weight, bias)
        sums, dwt, dbs = backend.backward_finalize(
            prob, backend.backward_reduce(prob, x, dz, stats, weight, bias), weight, bias)
        backend.backward_elementwise(prob, x, dz, stats, sums, weight, bias, training)
        return [stats, x, sums, dwt, dbs, dz, rm, rv]

    whole = run()
    monkeypatch.setattr(nb, "_CHUNK_ELEMS", 1)
    for a, b in zip(whole, run()):
        check(b, a, 1e-13, "chunked")


def test_elu_backward_finite_at_asymptote(backend):
    """z rounded onto (or below) -p in low precision must not produce NaN/inf gradients."""
    pair = next(p for p in PAIRS if p.x == "float16" and p.param == "float32")
    prob = make_problem(pair, "nsc", 1, 2, 4, "elu", True)
    p = prob.activation_param
    z3 = np.array([[[-p, -p], [-2 * p, 0.5], [-p * 0.999, 1.0], [0.0, -1.0]]], np.float16)
    dz3 = np.ones_like(z3)
    stats = np.array([[4, 4], [0, 0], [1, 1], [1, 1]], np.float32)
    weight, bias = np.ones(2, np.float32), np.zeros(2, np.float32)
    psums = backend.backward_reduce(prob, z3, dz3, stats, weight, bias)
    sums, dw, db = backend.backward_finalize(prob, psums, weight, bias)
    backend.backward_elementwise(prob, z3, dz3, stats, sums, weight, bias, True)
    for a in (psums, sums, dw, db, dz3):
        assert np.all(np.isfinite(f64(a)))

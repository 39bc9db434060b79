"""Launch plans stay within CUDA's limits for every shape, and the kernels stay correct with the
grids a real GPU gets (many blocks per channel)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from iabn_core import backends, plan, verify
from iabn_core.backends.base import Problem
from iabn_core.dtypes import PAIRS

SIZES = [1, 2, 3, 7, 31, 64, 1000, 65535, 65537, 2**20, 2**31 - 1]  # C <= 2^31-1: validate.py


def _prob(n, c, s, layout, pair=PAIRS[2]):
    return Problem(n=n, c=c, s=s, layout=layout, x_dtype=pair.x, param_dtype=pair.param,
                   acc_dtype=pair.acc, activation="identity", activation_param=0.0, eps=1e-5,
                   has_weight=False, has_bias=False)


@pytest.mark.parametrize("layout", ["ncs", "nsc"])
@pytest.mark.parametrize("sm_count", [1, 132])
def test_plans_respect_cuda_limits(layout, sm_count):
    for n, c, s in itertools.product(SIZES[:7] + [2**20], SIZES, [1, 7, 49, 12544, 2**26]):
        if n * c * s > 2**40 or (layout == "ncs" and s == 1):
            continue
        prob = _prob(n, c, s, layout)
        for vec in (1, 8):
            if (s if layout == "ncs" else c) % vec:
                continue
            p = plan.elementwise(prob, vec, sm_count)
            bx, by, bz = p.block
            assert bx * by * bz == plan.BLOCK_THREADS and bz == 1
            assert bx & (bx - 1) == 0 and by & (by - 1) == 0  # NSC's tree needs powers of 2
            assert 1 <= p.grid[0] <= 2**31 - 1 and 1 <= p.grid[1] <= 65535 and p.grid[2] == 1
            if layout == "nsc":
                assert bx <= 32 and p.grid[0] * bx * vec >= c
            else:
                assert p.grid[0] == c and p.seg % bx == 0 and p.seg >= bx


@pytest.mark.parametrize("case", [
    verify.Case(PAIRS[0], "ncs", "elu", True, (3, 2, 128, 41)),
    verify.Case(PAIRS[2], "nsc", "leaky_relu", True, (5, 16, 33, 17)),
    verify.Case(PAIRS[1], "ncs", "identity", False, (2, 1, 4099)),
], ids=lambda c: c.name)
def test_kernels_with_the_grid_of_a_large_gpu(monkeypatch, case):
    """Plan as for a 132-SM GPU (hundreds of blocks per channel) and run it in the emulator."""
    monkeypatch.setattr(backends.get("emulator").rt, "sm_count", 132)
    n, c = case.shape[:2]
    s = int(np.prod(case.shape[2:]))
    assert plan.elementwise(_prob(n, c, s, case.layout, case.pair), 1, 132).g > 8
    result = verify.run_case(case, "emulator")
    assert result.passed, [ch for ch in result.checks if not ch.passed]


def _step(backend, case, seed=3):
    """One training forward + backward through ops (the fused forward_all/backward_all), as
    host arrays, with the launches it took."""
    from iabn_core import ops

    be = backends.get(backend)
    x, dz, w, b, rm, rv = verify.make_inputs(case, seed=seed)
    before = getattr(be, "launches", 0)
    ctx = ops.forward(x, w, b, rm, rv, training=True, activation=case.activation,
                      activation_param=0.01, backend=backend)
    dx, dw, db = ops.backward(ctx, x, dz)
    outs = [np.asarray(a, np.float64) for a in (x, dx, dw, db, rm, rv, ctx.stats[1:3])]
    return outs, getattr(be, "launches", 0) - before


@pytest.mark.parametrize("layout,shape", [("nsc", (8, 16, 33, 17)), ("ncs", (70, 1, 32, 32))])
def test_many_partials_take_a_split_merge_launch(monkeypatch, layout, shape):
    """At a large GPU's grid a small C gives more block partials than each block should merge
    (plan.fuse_merge; the first H200 run spent ~8 ms per channels-last layer doing it): the
    training forward and backward then take a separate finalize launch each, whose merge is
    split over 32 threads per channel, and agree with the NumPy backend."""
    monkeypatch.setattr(backends.get("emulator").rt, "sm_count", 132)
    case = verify.Case(PAIRS[0], layout, "leaky_relu", True, shape)
    n, c = shape[:2]
    prob = _prob(n, c, int(np.prod(shape[2:])), layout, PAIRS[0])
    vec = plan.choose_vec(prob, ())
    g = plan.elementwise(prob, vec, 132).g
    assert g > plan.SERIAL_MERGE_ROWS and not plan.fuse_merge(prob, g, vec)
    got, launches = _step("emulator", case)
    want, _ = _step("numpy", case)
    assert launches == 6  # batch_stats, finalize, forward; reduce, finalize, elementwise
    for name, a, e in zip(("z", "dx", "dweight", "dbias", "running_mean", "running_var",
                           "mean/var"), got, want):
        np.testing.assert_allclose(a, e, rtol=2e-5, atol=2e-5 * np.abs(e).max(), err_msg=name)


def test_few_partials_stay_fused():
    """The emulator's one-SM plan gives few partials: 2 launches per forward and backward."""
    case = verify.Case(PAIRS[0], "nsc", "elu", True, (3, 16, 5))
    n, c = case.shape[:2]
    prob = _prob(n, c, 5, "nsc", PAIRS[0])
    vec = plan.choose_vec(prob, ())
    assert plan.fuse_merge(prob, plan.elementwise(prob, vec, 1).g, vec)
    _, launches = _step("emulator", case)
    assert launches == 4

"""Every kernel stage x dtype x layout x activation x mode against the float64 closed form,
on every backend (the emulator runs the exact .cu sources; cuda when a GPU is present)."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import ALL_BACKENDS, KERNEL_BACKENDS
from iabn_core import backends, ops, verify
from iabn_core.dtypes import PAIRS

CASES = verify.matrix()


def report(result) -> str:
    bad = [c for c in result.checks if not c.passed]
    return "; ".join(f"{c.stage}: rel {c.max_rel:.2e} > tol {c.tol:.0e} (abs {c.max_abs:.2e})"
                     for c in bad)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_every_stage_matches_reference(backend, case):
    result = verify.run_case(case, backend)
    assert result.checks, "no stage was checked"
    assert result.passed, report(result)


def _plant(monkeypatch, filename, good, bad):
    """Make the emulator compile `filename` with the text `good` replaced by `bad`."""
    from iabn_core import source

    original = source.assembled

    def planted(name):
        src = original(name)
        if name == filename:
            assert good in src
            src = src.replace(good, bad)
        return src

    monkeypatch.setattr("iabn_core.backends.emulator.assembled", planted)
    monkeypatch.setattr(backends, "_instances", {})


def test_a_planted_kernel_bug_is_caught(monkeypatch):
    """The comparison can fail: a sign flip of the bias in the real forward kernel is found."""
    _plant(monkeypatch, "forward.cu", "* cf.scale + cf.shift", "* cf.scale - cf.shift")
    case = verify.Case(PAIRS[0], "ncs", "identity", True, (2, 3, 8))
    result = verify.run_case(case, "emulator")
    failed = {c.stage for c in result.checks if not c.passed}
    assert "forward z" in failed


def _full_step(backend, x, dz, w, b, rm, rv, training=True):
    ctx = ops.forward(x, w, b, rm, rv, training=training, activation="elu",
                      activation_param=0.5, backend=backend)
    dx, dw, db = ops.backward(ctx, x, dz)
    return ctx, dx, dw, db


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("layout", ["ncs", "nsc"])
def test_bitwise_deterministic(backend, layout):
    """Two runs give identical bits (fixed-order merges, no float atomics); shapes chosen so
    that each channel is split over several blocks."""
    case = verify.Case(PAIRS[2], layout, "elu", True, (3, 2, 37, 29))
    host = verify.Host(backend)
    outs = []
    for _ in range(2):
        x, dz, w, b, rm, rv = (host.put(a) for a in verify.make_inputs(case, seed=5))
        ctx, dx, dw, db = _full_step(backend, x, dz, w, b, rm, rv)
        outs.append([host.get(a).tobytes() for a in (x, ctx.stats, dx, dw, db, rm, rv)])
    assert outs[0] == outs[1]


def _per_channel_bytes(case, x, w, b, rm, rv, training):
    """Bound on the O(C) traffic beside the tensor itself. Per-channel constants are loaded once
    per block (kernels/layout.cuh channel_constants), partials are one row per block, and each of
    a channel's G consuming blocks merges its G partials itself: O(C * G^2) bytes (G is small: it
    only grows where C is small)."""
    from iabn_core import plan, validate

    prob, _ = validate.problem(x, w, b, rm, rv, training=training, momentum=0.1, eps=1e-5,
                               activation="leaky_relu", activation_param=0.01)
    g = plan.elementwise(prob, plan.choose_vec(prob, [x.ctypes.data]), 1).g
    return (g * g + g + 4) * case.shape[1] * 8 * 8


def _emulator_traffic(fn):
    rt = backends.get("emulator").rt
    rt.traffic[:] = [0, 0]
    be = backends.get("emulator")
    n0 = be.launches
    fn()
    return tuple(rt.traffic), be.launches - n0


@pytest.mark.parametrize("pair", [PAIRS[0], PAIRS[2]], ids=lambda p: p.key)
@pytest.mark.parametrize("layout", ["ncs", "nsc"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_global_traffic_and_launch_budget(pair, layout, training):
    """Forward <= 2 reads + 1 write of the tensor, backward <= 4 reads + 1 write, plus O(C);
    2 launches per training forward/backward, 1 for eval forward (the consuming kernel
    finalizes the statistics / sums for itself)."""
    case = verify.Case(pair, layout, "leaky_relu", training, (4, 8, 16, 16))
    x, dz, w, b, rm, rv = verify.make_inputs(case, seed=1)
    nbytes = x.nbytes
    per_channel = _per_channel_bytes(case, x, w, b, rm, rv, training)
    holder = {}
    (ld, st), launches = _emulator_traffic(lambda: holder.setdefault("ctx", ops.forward(
        x, w, b, rm, rv, training=training, backend="emulator")))
    reads = 2 if training else 1
    assert nbytes * reads <= ld <= nbytes * reads + per_channel
    assert nbytes <= st <= nbytes + per_channel
    assert launches == (2 if training else 1)

    (ld, st), launches = _emulator_traffic(lambda: ops.backward(holder["ctx"], x, dz))
    assert 4 * nbytes <= ld <= 4 * nbytes + per_channel
    assert nbytes <= st <= nbytes + per_channel
    assert launches == 2


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("layout", ["ncs", "nsc"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fused_and_staged_paths_agree_bitwise(backend, layout, training):
    """ops (2 launches: the consumer finalizes for itself) and the stages one by one (as
    synchronized BN runs them) give the same bits: one finalize code, one order. The shape
    splits every channel over several blocks, so the merges have work to do."""
    from iabn_core.layout import view3

    case = verify.Case(PAIRS[2], layout, "elu", training, (3, 2, 37, 29))
    host = verify.Host(backend)
    be = backends.get(backend)
    fused = [host.put(a) for a in verify.make_inputs(case, seed=4)]
    staged = [host.put(a) for a in verify.make_inputs(case, seed=4)]
    x, dz, w, b, rm, rv = fused
    ctx = ops.forward(x, w, b, rm, rv, training=training, activation="elu",
                      activation_param=0.5, backend=backend)
    dx, dw, db = ops.backward(ctx, x, dz)
    x2, dz2, w2, b2, rm2, rv2 = staged
    prob, lay = ctx.prob, ctx.layout
    x3, dz3 = view3(x2, lay), view3(dz2, lay)
    partials = be.batch_stats(prob, x3) if training else None
    stats = be.finalize(prob, partials, rm2, rv2, 0.1, training)
    be.forward(prob, x3, stats, w2, b2)
    sums, dw2, db2 = be.backward_finalize(prob, be.backward_reduce(prob, x3, dz3, stats, w2, b2),
                                          w2, b2)
    be.backward_elementwise(prob, x3, dz3, stats, sums, w2, b2, training)
    for got, want in zip((x, ctx.stats, rm, rv, dx, dw, db), (x2, stats, rm2, rv2, dz2, dw2, db2)):
        assert host.get(got).tobytes() == host.get(want).tobytes()


def test_eval_backward_without_parameters_is_one_launch():
    case = verify.Case(PAIRS[0], "ncs", "identity", False, (2, 3, 8), affine=False)
    x, dz, _, _, rm, rv = verify.make_inputs(case)
    ctx = ops.forward(x, None, None, rm, rv, training=False, backend="emulator")
    (ld, st), launches = _emulator_traffic(lambda: ops.backward(ctx, x, dz))
    assert launches == 1 and ld <= 2 * x.nbytes + 64 * 3 * 8


@pytest.mark.parametrize("layout", ["ncs", "nsc"])
def test_reverse_thread_order_gives_the_same_results(layout):
    """Threads run in reverse order within each scheduling round: a missing barrier would read
    unwritten (NaN-poisoned) shared memory in one of the two orders."""
    from iabn_core.emulator import options

    for pair in (PAIRS[0], PAIRS[1], PAIRS[4]):
        case = verify.Case(pair, layout, "leaky_relu", True, (3, 16, 5, 7))
        with options(reverse=True):
            result = verify.run_case(case, "emulator")
        assert result.passed, report(result)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("layout", ["ncs", "nsc"])
def test_backward_into_a_separate_buffer(backend, layout):
    """backward(..., out=buf) writes dx into buf, leaves dz untouched, and gives the same bits
    as the in-place form (the same kernel; only the store address differs)."""
    case = verify.Case(PAIRS[4], layout, "leaky_relu", True, (2, 8, 6, 4))
    host = verify.Host(backend)
    results = []
    for use_out in (False, True):
        x, dz, w, b, rm, rv = (host.put(a) for a in verify.make_inputs(case, seed=3))
        dz_before = host.get(dz)
        ctx = ops.forward(x, w, b, rm, rv, backend=backend)
        out = None
        if use_out:
            out = (host.cp if host.gpu else np).empty_like(x)  # keeps x's memory layout
            out[...] = 0
        dx, dw, db = ops.backward(ctx, x, dz, out=out)
        if use_out:
            assert dx is out
            np.testing.assert_array_equal(host.get(dz), dz_before)
        else:
            assert dx is dz
        results.append([host.get(a).tobytes() for a in (dx, dw, db)])
    assert results[0] == results[1]


def test_backward_out_traffic_is_one_pass():
    case = verify.Case(PAIRS[0], "nsc", "elu", True, (4, 8, 16, 16))
    x, dz, w, b, rm, rv = verify.make_inputs(case, seed=2)
    ctx = ops.forward(x, w, b, rm, rv, backend="emulator")
    out = np.empty_like(x)
    (ld, st), launches = _emulator_traffic(lambda: ops.backward(ctx, x, dz, out=out))
    assert 4 * x.nbytes <= ld <= 4 * x.nbytes + 64 * 8 * 8 * 8
    assert x.nbytes <= st <= x.nbytes + 64 * 8 * 8 * 8
    assert launches == 2


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_elu_outputs_below_the_asymptote(backend):
    """A stored ELU output at or below -alpha (low-precision rounding) has a clamped inverse and a
    zero slope on every backend, exactly as the reference says: finite, and no sign flip."""
    from iabn_core import reference as ref
    from iabn_core.backends.base import Problem

    alpha = 0.3
    pair = PAIRS[2]  # float16 inputs, float32 parameters
    prob = Problem(n=1, c=2, s=4, layout="nsc", x_dtype=pair.x, param_dtype=pair.param,
                   acc_dtype=pair.acc, activation="elu", activation_param=alpha, eps=1e-5,
                   has_weight=True, has_bias=True)
    z0 = np.array([[[-0.3, -0.31], [-0.5, 0.25], [-1.0, -0.29], [0.7, -2.0]]], np.float16)
    dz0 = np.array([[[1.0, -1.0], [0.5, 2.0], [-1.5, 1.0], [1.0, 0.25]]], np.float16)
    stats0 = np.array([[4, 4], [0.1, -0.2], [1.5, 0.5], [1 / np.sqrt(1.5 + 1e-5),
                                                        1 / np.sqrt(0.5 + 1e-5)]], np.float32)
    w0, b0 = np.array([0.8, -1.2], np.float32), np.array([0.1, -0.3], np.float32)
    want = ref.backward(z0.astype(np.float64), dz0.astype(np.float64), stats0[3], stats0[0],
                        w0, b0, training=True, eps=1e-5, activation="elu", param=alpha,
                        layout="nsc")
    host = verify.Host(backend)
    be = backends.get(backend)
    z, dz, stats, w, b = (host.put(a) for a in (z0, dz0, stats0, w0, b0))
    sums, dw, db = be.backward_finalize(prob, be.backward_reduce(prob, z, dz, stats, w, b), w, b)
    be.backward_elementwise(prob, z, dz, stats, sums, w, b, True)
    got_sums, got_dx = host.get(sums), host.get(dz)
    assert np.all(np.isfinite(got_sums)) and np.all(np.isfinite(got_dx))
    assert ref.rel_error(got_sums[0], want["sum_dy"]) < 1e-5
    assert ref.rel_error(got_sums[1], want["sum_dy_xhat"]) < 1e-5
    assert ref.rel_error(got_dx, want["dx"]) < 2e-3
    assert want["dy"][0, 0, 1] == 0.0  # z = -0.31 < -alpha: zero slope, not -0.01


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("layout", ["ncs", "nsc"])
def test_misaligned_buffers_take_the_scalar_path(backend, layout):
    """A buffer starting 2 bytes past a 16-byte boundary cannot use 16-byte vectors: the plan
    falls back to VEC=1 and the results still match (the emulator traps on any misaligned
    vector access, as a GPU would fault)."""
    case = verify.Case(PAIRS[2], layout, "leaky_relu", True, (2, 8, 4, 4))
    x0, dz0, w, b, rm, rv = verify.make_inputs(case, seed=9)
    host = verify.Host(backend)

    def shifted(a):  # same values, data pointer at +1 element (2 bytes for float16)
        flat = np.empty(a.size + 1, a.dtype)[1:]
        order = np.argsort(a.strides)[::-1]  # keep a's memory order (channels-last too)
        buf = flat.reshape(tuple(np.array(a.shape)[order]))
        view = buf.transpose(np.argsort(order))
        view[...] = a
        return view

    outs = []
    for make in (lambda a: a.copy(order="K"), shifted):
        x, dz = host.put(make(x0)), host.put(make(dz0))
        if not host.gpu:
            assert (x.ctypes.data % 16 != 0) == (make is shifted)
        ctx = ops.forward(x, *(host.put(a.copy()) for a in (w, b, rm, rv)), backend=backend)
        dx, dw, db = ops.backward(ctx, x, dz)
        outs.append([host.get(a) for a in (x, dx, dw, db)])
    for a, b_ in zip(*outs):
        np.testing.assert_allclose(a, b_, rtol=2e-3, atol=2e-3)


def test_emulator_traps_a_misaligned_vector_access():
    from iabn_core.emulator import EmulatorError
    from iabn_core.instantiations import forward as forward_name

    pair = PAIRS[0]
    name = forward_name(pair, "identity", "ncs", 4)
    rt = backends.get("emulator").rt
    from iabn_core.instantiations import module_for

    kernel = rt.function(module_for("forward.cu", pair), name)
    x = np.zeros(33, np.float32)[1:]  # 4 bytes past a 16-byte boundary
    stats = np.ones((4, 1), np.float32)
    with pytest.raises(EmulatorError, match=r"__trap\(\) called at kernels/common.cuh"):
        kernel((1, 1, 1), (8, 32, 1), (x, stats, None, None, np.float32(1e-5), np.float32(0),
                                      np.int64(1), np.int64(1), np.int64(32), np.int64(8),
                                      # no residual; stats given (mode 0): no partials, no
                                      # running stats
                                      None, None, np.int64(0), None, None, None, None,
                                      np.float32(0), np.float32(0), np.int32(0),
                                      None))  # no batch counter


# ------------------------------------------------------------------------------------------
# Residual form z = act(BN(x) + r)
# ------------------------------------------------------------------------------------------
RESIDUAL_CASES = verify.residual_matrix()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("case", RESIDUAL_CASES, ids=[c.name for c in RESIDUAL_CASES])
def test_residual_every_stage_matches_reference(backend, case):
    result = verify.run_case(case, backend)
    assert {"forward z", "backward dx", "backward dresidual"} <= {c.stage for c in result.checks}
    assert result.passed, report(result)


def test_a_planted_residual_bug_is_caught(monkeypatch):
    """The residual checks can fail: dropping r from the backward's xhat is found."""
    _plant(monkeypatch, "backward.cu", "Act::inverse(z, p) - r - a.shift",
           "Act::inverse(z, p) - a.shift")
    case = verify.Case(PAIRS[0], "ncs", "identity", True, (2, 3, 8), residual=True)
    failed = {c.stage for c in verify.run_case(case, "emulator").checks if not c.passed}
    assert {"sum_dy_xhat", "backward dx"} <= failed


@pytest.mark.parametrize("pair", [PAIRS[0], PAIRS[2]], ids=lambda p: p.key)
@pytest.mark.parametrize("layout", ["ncs", "nsc"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_residual_traffic_and_launch_budget(pair, layout, training):
    """With a residual: forward reads r once more (training 2 reads of x + 1 of r + 1 write);
    backward's reduce and elementwise each read z, dz, r (6 reads) and elementwise writes dx
    and dr (2 writes); the launch counts are those of the plain form."""
    case = verify.Case(pair, layout, "leaky_relu", training, (4, 8, 16, 16), residual=True)
    x, dz, w, b, rm, rv = verify.make_inputs(case, seed=1)
    r = verify.make_residual(case, seed=2)
    nbytes = x.nbytes
    per_channel = _per_channel_bytes(case, x, w, b, rm, rv, training)
    holder = {}
    (ld, st), launches = _emulator_traffic(lambda: holder.setdefault("ctx", ops.forward(
        x, w, b, rm, rv, training=training, backend="emulator", residual=r)))
    reads = 3 if training else 2
    assert nbytes * reads <= ld <= nbytes * reads + per_channel
    assert nbytes <= st <= nbytes + per_channel
    assert launches == (2 if training else 1)

    got = {}
    (ld, st), launches = _emulator_traffic(
        lambda: got.setdefault("out", ops.backward(holder["ctx"], x, dz, residual=r)))
    assert len(got["out"]) == 4
    assert 6 * nbytes <= ld <= 6 * nbytes + per_channel
    assert 2 * nbytes <= st <= 2 * nbytes + per_channel
    assert launches == 2


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("layout", ["ncs", "nsc"])
def test_residual_full_step_matches_reference(backend, layout):
    """ops.forward/backward with a residual end to end: z, dx, dr, dweight, dbias and the
    running stats against the float64 closed form; dr comes back in x's layout."""
    from iabn_core import reference as ref

    case = verify.Case(PAIRS[2], layout, "elu", True, (3, 6, 5, 4), residual=True)
    host = verify.Host(backend)
    x0, dz0, w0, b0, rm0, rv0 = verify.make_inputs(case, seed=4)
    r0 = verify.make_residual(case, seed=5)
    x, dz, w, b, rm, rv, r = (host.put(a) for a in (x0, dz0, w0, b0, rm0, rv0, r0))
    x0, dz0, rm0, rv0 = (a.copy() for a in (x0, dz0, rm0, rv0))  # CPU backends write into x, dz
    ctx = ops.forward(x, w, b, rm, rv, activation="elu", activation_param=0.5, backend=backend,
                      residual=r)
    n, c = case.shape[:2]
    f64 = lambda a: np.ascontiguousarray(a, np.float64).reshape(n, c, -1)  # noqa: E731
    want = ref.forward(f64(x0), w0, b0, rm0, rv0, training=True, activation="elu", param=0.5,
                       residual=f64(r0))
    assert ref.rel_error(f64(host.get(x)), want["z"]) < 2e-3
    assert ref.rel_error(host.get(rm), want["running_mean"]) < 2e-5
    z64 = f64(host.get(x))
    bwd = ref.backward(z64, f64(dz0), host.get(ctx.invstd), ctx.count, w0, b0, training=True,
                       activation="elu", param=0.5, residual=f64(r0))
    dx, dw, db, dr = ops.backward(ctx, x, dz, residual=r)
    assert (dr.strides == x.strides) if not host.gpu else True
    assert ref.rel_error(f64(host.get(dx)), bwd["dx"]) < 5e-3
    assert ref.rel_error(f64(host.get(dr)), bwd["dresidual"]) < 2e-3
    assert ref.rel_error(host.get(dw), bwd["dweight"]) < 1e-4
    assert ref.rel_error(host.get(db), bwd["dbias"]) < 1e-4

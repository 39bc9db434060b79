"""Hostile input (issue 9): each reproducer, pinned by the rule that fixes its class of problem.

A rejected call raises IABNError whose message starts with the argument's name and leaves every
buffer byte-for-byte unchanged; an accepted one agrees with the float64 reference. The
property-based version of these rules is tests/test_hostile_fuzz.py.
"""
from __future__ import annotations

import fractions
import threading

import numpy as np
import pytest

from iabn_core import ops, reference as ref
from iabn_core.emulator import build as emu_build
from iabn_core.validate import IABNError
from iabn_core.verify import TOL

C = 3


@pytest.fixture(params=["numpy", "emulator"])
def backend(request):
    return request.param


def make(dtype=np.float32, shape=(2, C, 4), seed=0, pdt=None):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape).astype(dtype)
    pdt = pdt or (np.float64 if dtype == np.float64 else np.float32)
    return x, dict(weight=rng.uniform(0.5, 1.5, shape[1]).astype(pdt),
                   bias=rng.normal(size=shape[1]).astype(pdt),
                   running_mean=np.zeros(shape[1], pdt), running_var=np.ones(shape[1], pdt))


def raises_unchanged(match, fn, *arrays):
    """fn() raises IABNError matching `match`, and no byte of `arrays` changed."""
    before = [a.tobytes() for a in arrays]
    with pytest.raises(IABNError, match=match):
        fn()
    assert [a.tobytes() for a in arrays] == before, "a rejected call wrote to a buffer"


def misaligned(shape, dtype):
    """An array of `shape` one byte past its dtype's alignment (inside a larger buffer)."""
    dt = np.dtype(dtype)
    buf = np.zeros(int(np.prod(shape)) * dt.itemsize + 1, np.uint8)
    return buf[1:].view(dt).reshape(shape)


# ------------------------------------------------ 1, 4: byte order and alignment, every array
def _spoil(args, name, how):
    """Replace args[name] by an equal array in big-endian order or at a misaligned address;
    returns the start of the error the call must raise."""
    good = args[name]
    if how == "byte_order":
        args[name] = good.astype(good.dtype.newbyteorder(">"))
        return rf"^{name} has non-native byte order"
    args[name] = misaligned(good.shape, good.dtype)
    args[name][...] = good
    return rf"^{name} is not aligned"


@pytest.mark.parametrize("name", ["x", "weight", "bias", "running_mean", "running_var"])
@pytest.mark.parametrize("how", ["byte_order", "misaligned"])
def test_forward_arrays_must_be_native_and_aligned(backend, name, how):
    x, p = make()
    args = dict(p, x=x)
    match = _spoil(args, name, how) + (" to its 4-byte elements" if how == "misaligned" else "")
    raises_unchanged(match, lambda: ops.forward(backend=backend, **args), *args.values())


@pytest.mark.parametrize("name", ["z", "dz", "out"])
@pytest.mark.parametrize("how", ["byte_order", "misaligned"])
def test_backward_arrays_must_be_native_and_aligned(backend, name, how):
    x, p = make()
    ctx = ops.forward(x, **p, backend=backend)
    args = dict(z=x, dz=np.ones_like(x), out=np.zeros_like(x))
    match = _spoil(args, name, how)
    raises_unchanged(match, lambda: ops.backward(ctx, **args), *args.values(), *p.values())


# ----------------------------------------------------- 3: eval never needs writable stats
def test_eval_accepts_read_only_running_stats_training_does_not(backend):
    x, p = make()
    for k in ("running_mean", "running_var"):
        p[k] = np.array([0.3, -1.0, 2.0], np.float32) if k == "running_mean" else p[k] * 2
        p[k].flags.writeable = False
    expected = ref.forward(x, **p, training=False, activation="leaky_relu", param=0.01)
    ops.forward(x, **p, training=False, backend=backend)
    assert ref.rel_error(x, expected["z"]) <= TOL["float32"]
    raises_unchanged(r"^running_mean is read-only; it is updated when training=True",
                     lambda: ops.forward(x, **p, training=True, backend=backend), x)


# -------------------------------------- 5: backward's writes never land on what forward kept
@pytest.mark.parametrize("kept", ["weight", "bias", "stats"])
@pytest.mark.parametrize("name", ["dz", "out"])
def test_backward_buffers_must_not_overlap_what_forward_kept(backend, kept, name):
    x, p = make(shape=(2, C, 2))  # x.size == 4 * C: a dz may lie exactly over the stats
    buf = np.random.default_rng(1).normal(size=x.size).astype(np.float32)
    if kept != "stats":
        p[kept] = buf[:C]
    ctx = ops.forward(x, **p, backend=backend)
    alias = (ctx.stats if kept == "stats" else buf).reshape(x.shape)
    args = dict(z=x, dz=np.ones_like(x))
    args[name] = alias
    raises_unchanged(rf"^{name} shares memory with", lambda: ops.backward(ctx, **args),
                     buf, x, ctx.stats)


# ------------------------------------------ 6, 7: scalars and names, typed and ranged
HUGE = [10**400, -10**400, fractions.Fraction(10**400, 3)]


SCALAR_CASES = [
    *[("eps", v) for v in HUGE + ["1e-5", None, True, [1e-5], 1e39, 1e-40, float("inf")]],
    *[("momentum", v) for v in HUGE + ["0.1", None, False, 1.0 + 1e-9]],
    *[("activation_param", v) for v in HUGE + ["0.1", None, 1e-39, 1e38, float("nan")]],
    ("activation", ["leaky_relu"]), ("activation", None), ("activation", b"elu"),
    ("activation", "ELU"), ("training", 1), ("training", None),
    ("backend", 1), ("backend", object()), ("backend", "gpu"), ("backend", b"numpy"),
]


@pytest.mark.parametrize("kw,value", SCALAR_CASES,
                         ids=[f"{k}-{i}" for i, (k, _) in enumerate(SCALAR_CASES)])
def test_scalars_and_names_are_typed_and_ranged(kw, value):
    x, p = make()
    kwargs = {kw: value}
    raises_unchanged(rf"^{kw} ", lambda: ops.forward(x, **p, **kwargs), x, *p.values())


@pytest.mark.parametrize("kw,value", [("eps", 1e39), ("eps", 1e-40), ("activation_param", 1e-39),
                                      ("activation_param", 1e38)])
def test_range_is_the_accumulator_dtypes(backend, kw, value):
    """float32 accumulators (float16/32/bf16 inputs) refuse what float64 ones accept."""
    x32, p32 = make(np.float32)
    raises_unchanged(rf"^{kw} .*float32", lambda: ops.forward(x32, **p32, **{kw: value}), x32)
    x, p = make(np.float64)
    ctx = ops.forward(x, **p, backend=backend, **{kw: value})
    assert np.isfinite(ctx.stats).all()


def test_a_module_with_an_unhashable_activation_is_refused():
    torch = pytest.importorskip("torch")
    from iabn.torch import InPlaceABN

    with pytest.raises(IABNError, match="^activation must be one of"):
        InPlaceABN(3, activation=["leaky_relu"])
    m = InPlaceABN(3)
    m.eps = 10**400
    x = torch.randn(2, 3, 4)
    raises_unchanged("^eps ", lambda: m(x), x.numpy(), m.running_mean.numpy())


# ------------------------------------- 8: the activation branch follows the sign bit of z
def test_positive_side_is_the_sign_bit_and_nan_is_negative():
    v = np.array([1.0, 0.0, -0.0, -1e-300, np.nan, -np.nan, np.inf, -np.inf])
    assert ref.positive_side(v).tolist() == [True, True, False, False, False, False, True, False]


@pytest.mark.parametrize("act,param", [("leaky_relu", 1e-8), ("elu", 1e-8)])
@pytest.mark.parametrize("pdt", [np.float32, np.float16])
def test_outputs_that_underflow_to_minus_zero_invert_as_negative(backend, act, param, pdt):
    """float16 z = slope * y underflows to -0 for y < 0. Backward must take the branch forward
    took: dbias = sum(dz * act'(y)) then matches the true pre-activation's signs."""
    x, p = make(np.float16, shape=(4, C, 8), pdt=pdt)
    p["bias"][...] = 0
    y_true = ref.affine_act(x.astype(np.float64), *_batch(x), ref.gamma(p["weight"], 1e-5, C),
                            np.zeros(C), "identity", 0.0)
    ctx = ops.forward(x, **p, activation=act, activation_param=param, backend=backend)
    z = x
    assert ((z == 0) & np.signbit(z)).sum() > 10, "the test needs outputs that underflow to -0"
    dz = np.random.default_rng(2).uniform(0.5, 1.5, z.shape).astype(np.float16)
    # (elu' = alpha * exp(y) is below alpha = 1e-8 there: negligible against the 1s, as param)
    want_dbias = (dz.astype(np.float64) * np.where(y_true >= 0, 1.0, param)).sum(axis=(0, 2))
    exp = ref.backward(z, dz, ctx.invstd, ctx.count, p["weight"], p["bias"], training=True,
                       eps=1e-5, activation=act, param=param)
    dx, _, dbias = ops.backward(ctx, z, dz.copy())
    assert ref.rel_error(dbias, want_dbias) <= TOL[np.dtype(pdt).name]
    assert ref.rel_error(dbias, exp["dbias"]) <= TOL[np.dtype(pdt).name]
    assert ref.rel_error(dx, exp["dx"]) <= TOL["float16"]


def _batch(x):
    _, mean, var = ref.batch_stats(x)
    return mean, ref.invstd(var, 1e-5)


# ------------------------------------------- 9: non-finite input, one result everywhere
@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("where", [(0, 0, 0), (1, 0, 3)])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_non_finite_training_input_gives_nan_statistics(backend, bad, where, dtype):
    x, p = make(dtype, shape=(2, C, 5))
    x[where] = bad
    clean = x[:, 1:].copy()
    exp = ref.forward(clean, **{k: v[1:] for k, v in p.items()}, training=True,
                      activation="leaky_relu", param=0.01)
    ctx = ops.forward(x, **p, backend=backend)
    for a in (ctx.mean, ctx.var, p["running_mean"], p["running_var"]):
        assert np.isnan(a[0]) and np.isfinite(a[1:]).all()
    assert np.isnan(x[:, 0]).all()
    assert ref.rel_error(x[:, 1:], exp["z"]) <= TOL[np.dtype(dtype).name]
    assert ref.rel_error(p["running_mean"][1:], exp["running_mean"]) <= TOL["float32"]


@pytest.mark.parametrize("act", ["leaky_relu", "elu", "identity"])
def test_non_finite_eval_input_is_elementwise_ieee(backend, act):
    x, p = make(shape=(2, C, 5))
    x[0, 0, :3] = [np.inf, -np.inf, np.nan]
    expected = ref.forward(x, **p, training=False, activation=act, param=0.5)["z"]
    ops.forward(x, **p, training=False, activation=act, activation_param=0.5, backend=backend)
    assert np.array_equal(np.isnan(x), np.isnan(expected))
    assert np.array_equal(np.isinf(x), np.isinf(expected))
    assert np.array_equal(x[np.isinf(x)], expected[np.isinf(expected)].astype(np.float32))
    finite = np.isfinite(expected)
    assert ref.rel_error(x[finite], expected[finite]) <= TOL["float32"]


def test_nan_output_propagates_through_elu_backward(backend):
    """fmax would turn a NaN z into a finite y and a zero gradient; NaN must stay NaN."""
    x, p = make(shape=(2, C, 5))
    ctx = ops.forward(x, **p, training=False, activation="elu", activation_param=0.5,
                      backend=backend)
    x[0, 1, 2] = np.nan
    dx, _, dbias = ops.backward(ctx, x, np.ones_like(x))
    assert np.isnan(dx[0, 1, 2]) and np.isnan(dbias[1])
    assert np.isfinite(np.delete(dbias, 1)).all()


# ---------------------------------------------------------- emulator build cache
def test_cache_dir_order(monkeypatch, tmp_path):
    monkeypatch.delenv("IABN_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert emu_build.cache_dir() == tmp_path / "xdg" / "iabn" / "emulator"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert emu_build.cache_dir().parent.parent.is_absolute()
    monkeypatch.setenv("IABN_CACHE_DIR", str(tmp_path / "own"))
    assert emu_build.cache_dir() == tmp_path / "own" / "emulator"


def test_threads_compile_a_module_once(monkeypatch, tmp_path):
    monkeypatch.setenv("IABN_CACHE_DIR", str(tmp_path))
    src = "__global__ void once(int* x) { x[threadIdx.x] = %d; }\n" % id(tmp_path)
    n0 = emu_build.compile_count
    paths, start = [], threading.Barrier(4)

    def build():
        start.wait()
        paths.append(emu_build.build_library(src, ["once"], False))

    threads = [threading.Thread(target=build) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(paths)) == 1 and len(paths) == 4
    assert emu_build.compile_count == n0 + 1

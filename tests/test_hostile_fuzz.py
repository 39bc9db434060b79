"""Property-based hostile input for iabn.cupy's forward/backward (NumPy arrays; numpy and emulator
backends). Every array is a view inside a larger byte buffer whose guard bytes must survive.

  * random valid calls agree with the float64 reference (forward stages and backward);
  * random hostile calls (valid calls with one or two things broken) either succeed and agree
    with the reference, or raise IABNError naming an argument with every buffer unchanged.

Bounded for CI: derandomized (reproducible), few small examples on the slow emulator.
"""
from __future__ import annotations

import math
import re
from fractions import Fraction
from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from iabn_core import ops, reference as ref
from iabn_core.dtypes import PAIRS, numpy_dtype
from iabn_core.validate import IABNError
from iabn_core.verify import TOL

ARG_NAMES = ("x", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps",
             "activation", "activation_param", "backend", "z", "dz", "out", "ctx")
NAMES_ARGUMENT = re.compile(r"\b(%s)\b" % "|".join(ARG_NAMES))
GUARD = 32  # bytes of random guard on each side of every view


def fuzz(n):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class Guarded:
    """A view of `shape`/`dtype` (contiguous or channels-last) inside a random byte buffer."""

    def __init__(self, rng, shape, dtype, layout="ncs", shift=0, values=None):
        dt = np.dtype(dtype)
        n = math.prod(shape) * dt.itemsize
        self.buf = rng.integers(0, 256, GUARD + n + GUARD + 16, dtype=np.uint8)
        start = GUARD + shift
        self.span = (start, start + n)
        flat = self.buf[start:start + n].view(dt)
        if layout == "nsc" and len(shape) > 2:
            order = (shape[0],) + tuple(shape[2:]) + (shape[1],)
            nd = len(shape)
            self.a = flat.reshape(order).transpose(0, nd - 1, *range(1, nd - 1))
        else:
            self.a = flat.reshape(shape)
        if values is not None:
            self.a[...] = values
        self.before = self.buf.copy()

    def guards_intact(self) -> bool:
        s0, s1 = self.span
        return (np.array_equal(self.buf[:s0], self.before[:s0])
                and np.array_equal(self.buf[s1:], self.before[s1:]))

    def unchanged(self) -> bool:
        return np.array_equal(self.buf, self.before)


@dataclass
class Call:
    pair: object
    shape: tuple
    layout: str
    training: bool
    activation: str
    param: float
    affine: bool
    running: bool
    momentum: float
    eps: float
    seed: int
    scalars: dict = field(default_factory=dict)  # hostile overrides of scalar arguments


@st.composite
def valid_calls(draw):
    pair = draw(st.sampled_from(PAIRS))
    spatial = tuple(draw(st.lists(st.integers(1, 5), max_size=2)))
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 5))) + spatial
    training = draw(st.booleans())
    if training and shape[0] * math.prod(spatial) < 2:
        shape = (2,) + shape[1:]
    return Call(pair, shape, draw(st.sampled_from(["ncs", "nsc"])), training,
                draw(st.sampled_from(["identity", "leaky_relu", "elu"])),
                draw(st.sampled_from([0.01, 0.3, 1.0, 2.5])), draw(st.booleans()),
                draw(st.booleans()) or not training, draw(st.sampled_from([0.0, 0.1, 1.0])),
                draw(st.sampled_from([1e-5, 1e-3, 0.5])), draw(st.integers(0, 2**20)))


def build(call: Call):
    """Guarded buffers for x and the parameters, from the call's seed."""
    rng = np.random.default_rng(call.seed)
    c = call.shape[1]
    pdt = numpy_dtype(call.pair.param)
    bufs = {"x": Guarded(rng, call.shape, numpy_dtype(call.pair.x), call.layout,
                         values=rng.normal(0.5, 2.0, call.shape))}
    if call.affine:
        w = rng.uniform(0.3, 2.0, c) * rng.choice([-1.0, 1.0], c)
        bufs["weight"] = Guarded(rng, (c,), pdt, values=w)
        bufs["bias"] = Guarded(rng, (c,), pdt, values=rng.normal(size=c))
    if call.running:
        bufs["running_mean"] = Guarded(rng, (c,), pdt, values=rng.normal(size=c))
        bufs["running_var"] = Guarded(rng, (c,), pdt, values=rng.uniform(0.5, 2.0, c))
    return bufs


def args_of(bufs):
    return {k: g.a for k, g in bufs.items()}


def ncs(a):
    """float64 (N, C, S) copy of a logical (N, C, *) array, the reference's layout."""
    a = np.asarray(a, np.float64)
    return a.reshape(a.shape[0], a.shape[1], -1) if a.ndim >= 2 else a


def close(actual, expected, tol, scale=None) -> bool:
    """NaN/Inf where the reference has them, and finite values within tol of `scale` (default
    the expected values' own; quantities that are small because large terms cancel, such as
    dx at N*S = 2, are judged against the size of their terms, as in iabn_core.verify)."""
    a = np.asarray(actual, np.float64)
    e = np.asarray(expected, np.float64)
    if a.shape != e.shape or not np.array_equal(np.isnan(a), np.isnan(e)):
        return False
    inf = np.isinf(e)
    if not np.array_equal(a[inf], e[inf]):
        return False
    fin = np.isfinite(e)
    if scale is None:
        return ref.rel_error(a[fin], e[fin]) <= tol
    return np.max(np.abs(a[fin] - e[fin]), initial=0.0) <= tol * max(scale, 1e-300)


def run_forward(call: Call, bufs, backend):
    """ops.forward on the buffers; on success, compare with the reference and return ctx."""
    args = args_of(bufs)
    kw = dict(training=call.training, momentum=call.momentum, eps=call.eps,
              activation=call.activation, activation_param=call.param, backend=backend)
    kw.update(call.scalars)
    x64 = {k: (np.array(v.real, np.float64) if isinstance(v, np.ndarray) else v)  # copies
           for k, v in args.items()}
    ctx = ops.forward(args.pop("x"), **args, **kw)
    with np.errstate(all="ignore"):
        exp = ref.forward(ncs(x64["x"]), x64.get("weight"), x64.get("bias"), x64.get("running_mean"),
                          x64.get("running_var"), training=kw["training"],
                          momentum=float(kw["momentum"]), eps=float(kw["eps"]),
                          activation=kw["activation"], param=float(kw["activation_param"]))
    xdt, pdt = ctx.prob.x_dtype, ctx.prob.param_dtype
    assert close(ncs(bufs["x"].a), exp["z"], TOL[xdt] * 4), "z"
    if call.training:
        assert close(ctx.mean, exp["mean"], TOL[ctx.prob.acc_dtype] * 4), "mean"
        assert close(ctx.var, exp["var"], max(TOL[ctx.prob.acc_dtype] * 4, 1e-4)), "var"
    for k in ("running_mean", "running_var"):
        if k in bufs and exp[k] is not None:
            assert close(bufs[k].a, exp[k], TOL[pdt] * 4), k
    for name, g in bufs.items():
        if not isinstance(g, Guarded):
            continue
        assert g.guards_intact(), f"guard bytes around {name} changed"
        if name in ("weight", "bias") or (name.startswith("running") and not call.training):
            assert g.unchanged(), f"{name} is read-only here but changed"
    return ctx


def run_backward(call: Call, ctx, bufs, dz, out):
    """ops.backward; on success, compare with the reference (from the same z and dz)."""
    z = bufs["x"].a
    z_before, dz64 = z.copy(), np.array(dz, np.float64)
    w, b = args_of(bufs).get("weight"), args_of(bufs).get("bias")
    dx, dw, db = ops.backward(ctx, z, dz, out=out)
    with np.errstate(all="ignore"):
        exp = ref.backward(ncs(z), ncs(dz64), ctx.invstd, ctx.count, w, b,
                           training=call.training, eps=call.eps, activation=call.activation,
                           param=call.param)
        k = ref.gamma(w, call.eps, call.shape[1]) * ctx.invstd
        terms = np.nanmax(np.abs(exp["dy"] * k.reshape(1, -1, 1)), initial=0.0)
        sum_dy = np.nanmax(np.abs(exp["dy"]).sum(axis=(0, 2)), initial=0.0)
        sum_dy_xhat = np.nanmax(np.abs(exp["dy"] * exp["xhat"]).sum(axis=(0, 2)), initial=0.0)
    assert dx is (dz if out is None else out)
    assert close(ncs(dx), exp["dx"], TOL[ctx.prob.x_dtype] * 4, terms), "dx"
    assert np.array_equal(z, z_before, equal_nan=True), "backward changed z"
    if call.affine:
        ptol = max(TOL[ctx.prob.param_dtype] * 4, 1e-4)
        assert close(db, exp["dbias"], ptol, sum_dy), "dbias"
        assert close(dw, exp["dweight"], ptol, sum_dy_xhat), "dweight"


def check_rejection(err: IABNError, bufs):
    assert NAMES_ARGUMENT.search(str(err)), f"error names no argument: {err}"
    for name, g in bufs.items():
        if isinstance(g, Guarded):
            assert g.unchanged(), f"rejected call changed {name}: {err}"


# ----------------------------------------------------------------------------- valid calls
@pytest.mark.parametrize("backend,n", [("numpy", 40), ("emulator", 8)])
def test_random_valid_calls_match_the_reference(backend, n):
    ran = []

    @fuzz(n)
    @given(call=valid_calls())
    def prop(call):
        ran.append(call)
        bufs = build(call)
        ctx = run_forward(call, bufs, backend)
        rng = np.random.default_rng(call.seed + 1)
        z = bufs["x"].a
        dz = Guarded(rng, call.shape, z.dtype, call.layout, values=rng.normal(size=call.shape))
        out = Guarded(rng, call.shape, z.dtype, call.layout)
        run_backward(call, ctx, bufs, dz.a, out.a)
        assert dz.unchanged() and out.guards_intact()

    prop()
    assert len(ran) >= n // 2 and len({(c.pair, c.layout, c.training) for c in ran}) > 3


# --------------------------------------------------------------------------- hostile calls
# Hostile values, and odd but valid ones (NumPy scalars, ints, Fractions, edges of the range).
HOSTILE_SCALARS = {
    "eps": [0.0, -1e-5, 1e39, 1e-42, float("nan"), 10**400, "1e-5", None, True,
            np.float32(1e-3), Fraction(1, 1000), 1, 1e30],
    "momentum": [-0.1, 1.5, float("nan"), 10**400, "0.1", None, 0, 1, np.float16(0.5)],
    "activation_param": [0.0, -0.1, 1e-40, 1e38, float("inf"), 10**400, [0.1], None, 2,
                         np.float64(0.2), Fraction(1, 3)],
    "activation": ["relu", ["elu"], None, 3, b"elu", "elu", "identity"],
    "training": [1, None, "yes", np.True_],
    "backend": [1, "gpu", object(), b"numpy", "cuda", None],
}
ARRAY_FAULTS = ("byte_order", "misaligned", "dtype", "shape", "read_only", "alias", "not_array",
                "strided", "non_finite", "missing_partner")


class Plain:
    """An argument that is not a guarded buffer of its own (a list, or a view into another
    argument's buffer, whose guards that argument checks)."""

    def __init__(self, a):
        self.a = a


def break_array(draw, bufs, rng):
    name = draw(st.sampled_from(sorted(k for k, g in bufs.items() if isinstance(g, Guarded))))
    fault = draw(st.sampled_from(ARRAY_FAULTS))
    g = bufs[name]
    a = g.a
    if fault == "byte_order":
        bufs[name] = Guarded(rng, a.shape, a.dtype.newbyteorder(">"), values=a)
    elif fault == "misaligned":
        bufs[name] = Guarded(rng, a.shape, a.dtype, shift=1, values=a)
    elif fault == "dtype":
        dt = draw(st.sampled_from(["float16", "float32", "float64", "int32", "complex64"]))
        bufs[name] = Guarded(rng, a.shape, dt, values=a)
    elif fault == "shape":
        bad = (a.shape[0] + 1,) + a.shape[1:] if name != "x" else (a.size,)
        bufs[name] = Guarded(rng, bad, a.dtype)
    elif fault == "read_only":
        a.flags.writeable = False
    elif fault == "alias":
        owners = [k for k, o in bufs.items() if k != name and isinstance(o, Guarded)
                  and o.a.dtype == a.dtype and o.a.size >= a.size]
        if owners and name != "x":
            owner = bufs[draw(st.sampled_from(sorted(owners)))].a
            flat = owner.reshape(-1) if owner.flags.c_contiguous else owner.transpose().reshape(-1)
            bufs[name] = Plain(flat[:a.size])
    elif fault == "not_array":
        bufs[name] = Plain(a.tolist())
    elif fault == "strided" and name == "x" and a.shape[-1] > 1:
        wide = Guarded(rng, a.shape[:-1] + (a.shape[-1] * 2,), a.dtype)
        wide.a = wide.a[..., ::2]
        bufs[name] = wide
    elif fault == "non_finite" and name == "x":
        idx = tuple(draw(st.integers(0, d - 1)) for d in a.shape)
        a[idx] = draw(st.sampled_from([np.inf, -np.inf, np.nan]))
        g.before = g.buf.copy()
    elif fault == "missing_partner" and name.startswith("running"):
        del bufs[name]
    return name, fault


@st.composite
def hostile_calls(draw):
    call = draw(valid_calls())
    bufs = build(call)
    rng = np.random.default_rng(call.seed + 7)
    faults = []
    for _ in range(draw(st.integers(1, 2))):
        if draw(st.booleans()):
            kw = draw(st.sampled_from(sorted(HOSTILE_SCALARS)))
            call.scalars[kw] = draw(st.sampled_from(HOSTILE_SCALARS[kw]))
            faults.append(kw)
        else:
            faults.append(break_array(draw, bufs, rng))
    return call, bufs, faults


@pytest.mark.parametrize("backend,n", [("numpy", 150), ("emulator", 20)])
def test_random_hostile_calls_fail_cleanly_or_compute_correctly(backend, n):
    outcomes = {"accepted": 0, "rejected": 0}

    @fuzz(n)
    @given(case=hostile_calls())
    def prop(case):
        call, bufs, faults = case
        call.scalars.setdefault("backend", backend)
        try:
            run_forward(call, bufs, backend)
            outcomes["accepted"] += 1
        except IABNError as err:
            check_rejection(err, bufs)
            outcomes["rejected"] += 1

    prop()
    # Both outcomes must be exercised, or the property says nothing.
    assert outcomes["accepted"] >= n // 50 and outcomes["rejected"] >= n // 3, outcomes


# ------------------------------------------------------------------- hostile backward calls
BACKWARD_FAULTS = ("byte_order", "misaligned", "dtype", "shape", "layout", "read_only",
                   "not_array", "non_finite", "dz_is_z", "over_weight", "out_over_dz",
                   "out_over_z")


def shaped(flat, shape, layout):
    """`flat`'s first prod(shape) elements as a (N, C, *) array in `layout` (a view)."""
    n = math.prod(shape)
    if layout == "nsc" and len(shape) > 2:
        nd = len(shape)
        return flat[:n].reshape((shape[0],) + shape[2:] + (shape[1],)).transpose(
            0, nd - 1, *range(1, nd - 1))
    return flat[:n].reshape(shape)


@pytest.mark.parametrize("backend,n", [("numpy", 80), ("emulator", 15)])
def test_random_hostile_backward_calls_fail_cleanly_or_compute_correctly(backend, n):
    outcomes = {"accepted": 0, "rejected": 0}

    @fuzz(n)
    @given(call=valid_calls(), fault=st.sampled_from(BACKWARD_FAULTS), use_out=st.booleans(),
           data=st.data())
    def prop(call, fault, use_out, data):
        call.affine = True
        bufs = build(call)
        rng = np.random.default_rng(call.seed + 3)
        x = bufs["x"].a
        # weight lies at the start of a buffer big enough for a dz laid over it
        big = Guarded(rng, (x.size + call.shape[1],), bufs["weight"].a.dtype)
        big.a[:call.shape[1]] = bufs["weight"].a
        big.before = big.buf.copy()
        bufs["weight"] = Plain(big.a[:call.shape[1]])
        ctx = run_forward(call, bufs, backend)
        bufs["x"].before = bufs["x"].buf.copy()  # z, as forward left it
        big.before = big.buf.copy()
        g = {"dz": Guarded(rng, call.shape, x.dtype, call.layout, values=rng.normal(size=x.shape)),
             "out": Guarded(rng, call.shape, x.dtype, call.layout)}
        args = {"z": x, "dz": g["dz"].a, "out": g["out"].a if use_out else None}
        name = data.draw(st.sampled_from(["z", "dz"] + (["out"] if use_out else [])))
        a = args[name]
        if fault == "byte_order":
            args[name] = Guarded(rng, a.shape, a.dtype.newbyteorder(">"), values=a).a
        elif fault == "misaligned":
            args[name] = Guarded(rng, a.shape, a.dtype, call.layout, shift=1, values=a).a
        elif fault == "dtype":
            dt = data.draw(st.sampled_from(["float16", "float32", "float64", "bfloat16"]))
            args[name] = Guarded(rng, a.shape, numpy_dtype(dt), call.layout, values=a).a
        elif fault == "shape":
            args[name] = Guarded(rng, (a.shape[0] + 1,) + a.shape[1:], a.dtype).a
        elif fault == "layout":
            other = "nsc" if ctx.layout == "ncs" else "ncs"
            args[name] = Guarded(rng, a.shape, a.dtype, other, values=a).a
        elif fault == "read_only":
            a.flags.writeable = False
        elif fault == "not_array":
            args[name] = a.tolist()
        elif fault == "non_finite" and name == "dz":
            idx = tuple(data.draw(st.integers(0, d - 1)) for d in a.shape)
            a[idx] = data.draw(st.sampled_from([np.inf, -np.inf, np.nan]))
            g["dz"].before = g["dz"].buf.copy()
        elif fault == "dz_is_z":
            args["dz"] = x
        elif fault == "over_weight":
            args[name if name != "z" else "dz"] = shaped(big.a, x.shape, ctx.layout)
        elif fault == "out_over_dz" and use_out:
            args["out"] = args["dz"]
        elif fault == "out_over_z" and use_out:
            args["out"] = x
        watched = dict(bufs, weight=big, **g)
        try:
            run_backward(call, ctx, bufs, args["dz"], args["out"])
            outcomes["accepted"] += 1
        except IABNError as err:
            check_rejection(err, watched)
            outcomes["rejected"] += 1
        assert big.unchanged(), "backward wrote over the weight"

    prop()
    assert outcomes["accepted"] >= n // 20 and outcomes["rejected"] >= n // 3, outcomes

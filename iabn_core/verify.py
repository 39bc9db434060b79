"""Stage-by-stage verification of a backend against the float64 closed form.

One case = (dtype pair, layout, activation, mode, shape, affine, mean offset). Every stage is
compared with the reference evaluated on exactly the inputs that stage received (the kernel's
own stats, z and sums, cast to float64), so each tolerance only absorbs that stage's rounding.
Used by the test suite (tests/test_kernels.py) and by the correctness runner (iabn.check).
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field

import numpy as np

from . import backends, reference as ref, validate
from .dtypes import PAIRS, Pair, numpy_dtype
from .layout import view3

# Error allowed relative to the output's scale (max |expected|), by the dtype a value is
# stored in. Stats and sums are stored in the accumulator dtype; z and dx in the input dtype;
# running stats and parameter gradients in the parameter dtype.
TOL = {"float64": 1e-12, "float32": 2e-5, "float16": 2e-3, "bfloat16": 1.6e-2}
EPS = 1e-5
MOMENTUM = 0.1
ACT_PARAM = {"identity": 0.0, "leaky_relu": 0.1, "elu": 0.7}


def tol_text(tol: float) -> str:
    """A tolerance as README writes it: the shortest mantissa and a plain exponent
    (1.6e-2, 2e-5, 1e-12), so what the runner prints can be compared with the docs."""
    if not tol or not math.isfinite(tol):
        return "-"
    mantissa, exponent = f"{tol:.6e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def tolerance_text() -> str:
    """The tolerance table in words, e.g. 'float64 1e-12, float32 2e-5, ...'."""
    return ", ".join(f"{dtype} {tol_text(tol)}" for dtype, tol in TOL.items())


@dataclass(frozen=True)
class Case:
    pair: Pair
    layout: str
    activation: str
    training: bool
    shape: tuple
    affine: bool = True
    loc: float = 0.0  # per-channel mean offset in units of the spread (|mean| >> std cases)
    residual: bool = False  # z = act(BN(x) + r) with a residual r like x

    @property
    def name(self) -> str:
        mode = "train" if self.training else "eval"
        aff = "" if self.affine else "-noaffine"
        loc = f"-loc{self.loc:g}" if self.loc else ""
        res = "-residual" if self.residual else ""
        shape = "x".join(map(str, self.shape))
        return f"{self.pair.key}-{self.layout}-{self.activation}-{mode}-{shape}{aff}{loc}{res}"


@dataclass
class Check:
    stage: str
    max_abs: float
    max_rel: float
    tol: float

    @property
    def passed(self) -> bool:
        return self.max_rel <= self.tol


@dataclass
class Result:
    case: Case
    checks: list = field(default_factory=list)
    launches: int = 0

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def worst(self) -> Check:
        return max(self.checks, key=lambda c: c.max_rel / c.tol)


def matrix(quick: bool = False) -> list[Case]:
    """Every pair x layout x activation x mode on a vectorizable and an odd shape, plus the
    awkward shapes (C=1, S=1, N*S=2, primes, 1x1x1023, C > 65535, |mean| >> std)."""
    cases = []
    acts = ("identity", "leaky_relu", "elu")
    main = [((4, 8, 4, 4), True), ((3, 5, 7), False)]
    for pair in PAIRS:
        for layout in ("ncs", "nsc"):
            for act in acts:
                for training in (True, False):
                    for shape, affine in main[:1] if quick else main:
                        cases.append(Case(pair, layout, act, training, shape, affine))
    f32, f16 = PAIRS[0], PAIRS[2]
    if quick:  # the vectorizable shape for everything, plus C=1 and S=1
        return cases + [Case(f32, "ncs", "leaky_relu", True, (8, 1, 33)),
                        Case(f16, "nsc", "elu", True, (7, 3))]
    awkward = [((8, 1, 33), "ncs"), ((7, 3), "nsc"), ((2, 4), "nsc"), ((1, 3, 2), "ncs"),
               ((1, 1, 1023), "ncs"), ((5, 7, 11, 13), "nsc"), ((2, 2, 2048), "ncs"),
               ((2, 65537), "nsc"), ((3, 1031, 2), "nsc")]
    for shape, layout in awkward:
        for pair in (f32, f16, PAIRS[4]):
            cases.append(Case(pair, layout, "leaky_relu", True, shape))
    # C > 65535 channels on grid.x in the per-channel-block layout (slow to emulate: one case)
    cases.append(Case(f32, "ncs", "leaky_relu", True, (1, 65537, 2)))
    for pair in PAIRS:
        cases.append(Case(pair, "ncs", "elu", True, (4, 3, 64), loc=300.0))
        cases.append(Case(pair, "nsc", "leaky_relu", True, (16, 5, 8), loc=1000.0))
    return cases


def residual_matrix(quick: bool = False) -> list[Case]:
    """The residual form z = act(BN(x) + r): every pair x layout x activation x mode on the
    vectorizable shape (and the odd one unless quick), plus a few awkward shapes."""
    cases = []
    shapes = [(4, 8, 4, 4)] if quick else [(4, 8, 4, 4), (3, 5, 7)]
    for pair in PAIRS:
        for layout in ("ncs", "nsc"):
            for act in ("identity", "leaky_relu", "elu"):
                for training in (True, False):
                    for shape in shapes:
                        cases.append(Case(pair, layout, act, training, shape, residual=True))
    if not quick:
        f32, f16 = PAIRS[0], PAIRS[2]
        for shape, layout in (((8, 1, 33), "ncs"), ((7, 3), "nsc"), ((1, 1, 1023), "ncs"),
                              ((3, 1031, 2), "nsc")):
            for pair in (f32, f16):
                cases.append(Case(pair, layout, "leaky_relu", True, shape, residual=True))
        cases.append(Case(f32, "ncs", "elu", True, (4, 3, 64), affine=False, residual=True))
    return cases


def channels_last(a: np.ndarray) -> np.ndarray:
    """Same values, channels-last memory: (N, C, *) view of an (N, *, C) contiguous array."""
    if a.ndim == 2:
        return a.copy()
    moved = np.ascontiguousarray(np.moveaxis(a, 1, -1))
    return np.moveaxis(moved, -1, 1)


class Host:
    """Moves inputs to the backend's memory and results back (identity for CPU backends)."""

    def __init__(self, backend_name: str, xp=None):
        """`xp` stands in for CuPy (tests give a module whose arrays are copies in another
        class), so the device round trip runs on a CPU too."""
        self.gpu = backend_name == "cuda" or xp is not None
        if xp is not None:
            self.cp = xp
        elif self.gpu:
            from .backends.cuda import import_cupy

            self.cp = import_cupy()

    def put(self, a):
        if a is None or not self.gpu:
            return a
        if a.ndim >= 2 and not a.flags.c_contiguous:  # keep channels-last strides on the GPU
            out = self.cp.asarray(np.ascontiguousarray(np.moveaxis(a, 1, -1)))
            return self.cp.moveaxis(out, -1, 1)
        return self.cp.asarray(a)

    def get(self, a) -> np.ndarray:
        """float64 copy in logical (C) order, whatever the memory layout and whichever side
        the array is on (callers pass host originals too: asnumpy takes both, .get() did not,
        and the first GPU run failed every case on it)."""
        if a is None:
            return None
        if self.gpu:
            a = self.cp.asnumpy(a)
        return np.ascontiguousarray(a, dtype=np.float64)


def make_inputs(case: Case, seed: int | None = None):
    if seed is None:  # crc32, not hash(): reproducible across processes
        seed = zlib.crc32(case.name.encode())
    rng = np.random.default_rng(seed)
    n, c = case.shape[:2]
    xdt, pdt = numpy_dtype(case.pair.x), numpy_dtype(case.pair.param)
    loc = case.loc * (1 + np.arange(c) % 3)
    shape_b = (1, c) + (1,) * (len(case.shape) - 2)
    x = (rng.normal(size=case.shape) + loc.reshape(shape_b)).astype(xdt)
    dz = rng.normal(size=case.shape).astype(xdt)
    if case.layout == "nsc":
        x, dz = channels_last(x), channels_last(dz)
    # |w| away from 0: backward reconstructs xhat = (y - b) / (|w| + eps), whose rounding error
    # grows like ulp(b) / |w| in any precision (a property of the method, not of a kernel).
    sign = rng.choice([-1.0, 1.0], size=c)
    w = (sign * rng.uniform(0.5, 1.5, size=c)).astype(pdt) if case.affine else None
    b = rng.normal(size=c).astype(pdt) if case.affine else None
    rm = (loc + rng.normal(size=c)).astype(pdt)
    rv = rng.uniform(0.5, 2.0, size=c).astype(pdt)
    return x, dz, w, b, rm, rv


def make_residual(case: Case, seed: int | None = None):
    """The residual of a residual case (None otherwise): like x, in the case's layout."""
    if not case.residual:
        return None
    if seed is None:
        seed = zlib.crc32(case.name.encode()) + 1
    r = np.random.default_rng(seed).normal(size=case.shape).astype(numpy_dtype(case.pair.x))
    return channels_last(r) if case.layout == "nsc" else r


def _check(result: Result, stage: str, actual, expected, dtype: str, scale=None,
           tol: float | None = None) -> None:
    """Error relative to `scale` (default max |expected|). Quantities that are small because
    large terms cancel (dx at N*S = 2, sums of +-terms) are judged against the size of the terms
    that cancel, which is what their rounding error is proportional to."""
    a = np.asarray(actual, np.float64)
    e = np.asarray(expected, np.float64)
    if a.shape != e.shape:
        result.checks.append(Check(stage, math.inf, math.inf, TOL[dtype]))
        return
    err = np.abs(a - e)
    max_abs = float(np.max(err)) if err.size else 0.0
    if scale is None:
        scale = float(np.max(np.abs(e))) if e.size else 1.0
    rel = max_abs / (scale if scale > 0 else 1.0)
    if not math.isfinite(max_abs):
        max_abs = rel = math.inf
    result.checks.append(Check(stage, max_abs, rel, TOL[dtype] if tol is None else tol))


def run_case(case: Case, backend_name: str, host: Host | None = None) -> Result:
    """Run every stage of `case` on the backend and compare each with the reference."""
    be = backends.get(backend_name)
    host = Host(backend_name) if host is None else host
    x0, dz0, w0, b0, rm0, rv0 = make_inputs(case)
    r0 = make_residual(case)
    x, dz, w, b, rm, rv, r = (host.put(a) for a in (x0, dz0, w0, b0, rm0, rv0, r0))
    # originals as float64 copies: CPU backends write into the very arrays above
    x0, dz0, rm0, rv0 = (a.astype(np.float64) for a in (x0, dz0, rm0, rv0))
    p = case.pair
    act_param = ACT_PARAM[case.activation]
    prob, layout = validate.problem(x, w, b, rm, rv, training=case.training, momentum=MOMENTUM,
                                    eps=EPS, activation=case.activation,
                                    activation_param=act_param)
    assert layout == case.layout, (layout, case.layout)
    res = Result(case)
    launches0 = getattr(be, "launches", 0)
    x3, dz3 = view3(x, layout), view3(dz, layout)
    r3 = None if r is None else view3(r, layout)
    n, c = case.shape[:2]

    def ncs(a):  # logical (N, C, S) float64 copy, whatever the memory layout
        return host.get(a).reshape(n, c, -1)

    x64 = ncs(x0)

    # statistics (+ running update)
    if case.training:
        stats = be.finalize(prob, be.batch_stats(prob, x3), rm, rv, MOMENTUM, True)
        count, mean, var = ref.batch_stats(x64)
        want_rm, want_rv = ref.running_update(rm0, rv0, mean, var, count, MOMENTUM)
        _check(res, "running_mean", host.get(rm), want_rm, p.param)
        _check(res, "running_var", host.get(rv), want_rv, p.param)
    else:
        stats = be.finalize(prob, None, rm, rv, MOMENTUM, False)
        count, mean, var = prob.count, rm0, rv0
        _check(res, "running stats untouched", np.concatenate([host.get(rm), host.get(rv)]),
               np.concatenate([rm0, rv0]), "float64")
    st = host.get(stats)
    _check(res, "count", st[0], np.full(prob.c, count), "float64")
    _check(res, "mean", st[1], mean, p.acc)
    # |mean| >> std makes the variance ill-conditioned in the input itself; the bound asked of
    # the kernels there is a relative variance error of 1e-3.
    _check(res, "var", st[2], var, p.acc, tol=max(TOL[p.acc], 1e-3) if case.loc else None)
    _check(res, "invstd", st[3], ref.invstd(st[2], EPS), p.acc)

    # forward, in place, from the backend's own statistics
    w64 = None if w0 is None else w0.astype(np.float64)
    b64 = None if b0 is None else b0.astype(np.float64)
    gam = ref.gamma(w64, EPS, prob.c)
    r64 = None if r is None else ncs(r)
    want_z = ref.affine_act(x64, st[1], st[3], gam, np.zeros(prob.c) if b64 is None else b64,
                            case.activation, act_param, r64)
    be.forward(prob, x3, stats, w, b, r3)
    z64 = ncs(x)
    _check(res, "forward z", z64, want_z, p.x)

    # backward from the backend's own z
    dz64 = ncs(dz0)
    bwd = ref.backward(z64, dz64, st[3], st[0], w64, b64, training=case.training, eps=EPS,
                       activation=case.activation, param=act_param, residual=r64)
    partial = be.backward_reduce(prob, x3, dz3, stats, w, b, r3)
    sums, dw, db = be.backward_finalize(prob, partial, w, b)
    s = host.get(sums)
    _check(res, "sum_dy", s[0], bwd["sum_dy"], p.acc, np.abs(bwd["dy"]).sum(axis=(0, 2)).max())
    _check(res, "sum_dy_xhat", s[1], bwd["sum_dy_xhat"], p.acc,
           np.abs(bwd["dy"] * bwd["xhat"]).sum(axis=(0, 2)).max())
    if case.affine:
        _check(res, "dweight", host.get(dw), ref.abs_slope(w64) * s[1], p.param)
        _check(res, "dbias", host.get(db), s[0], p.param)
    want_dx = ref.input_grad(bwd["dy"], bwd["xhat"], gam, st[3], st[0], s[0], s[1],
                             case.training)
    dr = dr3 = None
    if r is not None:  # dr is written into a fresh buffer in the case's layout
        dr = np.full(case.shape, np.nan, numpy_dtype(p.x))
        dr = host.put(channels_last(dr) if layout == "nsc" else dr)
        dr3 = view3(dr, layout)
    be.backward_elementwise(prob, x3, dz3, stats, sums, w, b, case.training, None, r3, dr3)
    k = (gam * st[3]).reshape(1, -1, 1)
    _check(res, "backward dx", ncs(dz), want_dx, p.x, np.abs(k * bwd["dy"]).max())
    if r is not None:
        _check(res, "backward dresidual", ncs(dr), bwd["dy"], p.x)
        _check(res, "residual unchanged", ncs(r), r64, "float64")
    _check(res, "z unchanged by backward", ncs(x), z64, "float64")
    res.launches = getattr(be, "launches", 0) - launches0
    return res

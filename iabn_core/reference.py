"""Float64 NumPy closed forms of every InPlace-ABN stage: the ground truth for all backends.

Arrays are 3-D in layout "ncs" (N, C, S); every public function that takes activations also
accepts layout="nsc" (N, S, C) and transposes in and out (see ``to_ncs`` / ``from_ncs``).
Everything is computed in float64 whatever the input dtype, and nothing is modified in place:
the reference is deliberately the simplest readable form, not the in-place one.

Notation, per channel c over the N * S values of the batch (count m = N * S):
  mean mu, biased variance var, invstd = 1 / sqrt(var + eps)
  gamma~ = |w| + eps (1 without weight), b = bias (0 without bias)
  forward:  y = gamma~ * (x - mu) * invstd + b [+ r],   z = act(y)
  backward: y = act^-1(z), dy = dz * act'(z), xhat = (y [- r] - b) / gamma~
            training: dx = gamma~ * invstd * (dy - sum(dy)/m - xhat * sum(dy*xhat)/m)
            eval:     dx = gamma~ * invstd * dy
            dweight = s(w) * sum(dy * xhat), dbias = sum(dy), s(w) = -1 if w < 0 else +1
            with a residual r (a tensor like x, added before the activation): dr = dy
"""
from __future__ import annotations

import numpy as np

ACTIVATIONS = ("identity", "leaky_relu", "elu")
LAYOUTS = ("ncs", "nsc")

# The ELU inverse clamps z/p to -1 + 2^-24 (so y >= log(2^-24) ~ -16.6): a z at (or rounded below)
# the asymptote -p has no preimage, and the clamp makes its inverse finite. The same floor in
# every dtype and backend (it is exact in float32, the kernels' accumulator) keeps them equal.
ELU_INVERSE_FLOOR = -1.0 + 2.0**-24


def positive_side(v) -> np.ndarray:
    """The branch every activation takes: v >= 0 with the sign bit clear. -0 is negative (forward
    makes it from y < 0 when slope*y or alpha*expm1(y) underflows, so backward must invert it on
    that side), and a NaN is negative whatever its sign bit (which IEEE leaves unspecified)."""
    v = np.asarray(v)
    return (v >= 0) & ~np.signbit(v)


def nan_if_non_finite(mean, var):
    """The non-finite rule of batch statistics: a channel whose mean or variance is not finite
    (a NaN or Inf in its batch, or a value past the range of the dtype they are kept in) gets
    NaN for both. (mean, var) are modified in place and returned."""
    bad = ~(np.isfinite(mean) & np.isfinite(var))
    mean[bad] = np.nan
    var[bad] = np.nan
    return mean, var


# ----------------------------------------------------------------------------------- layouts
def to_ncs(x3, layout: str = "ncs") -> np.ndarray:
    """float64 (N, C, S) copy of a 3-D array given in ``layout``."""
    x = np.asarray(x3, dtype=np.float64)
    if layout == "ncs":
        return x.copy()
    if layout == "nsc":
        return np.ascontiguousarray(x.transpose(0, 2, 1))
    raise ValueError(f"unknown layout {layout!r}")


def from_ncs(x: np.ndarray, layout: str = "ncs") -> np.ndarray:
    """Inverse of ``to_ncs``: an (N, C, S) array returned in ``layout``."""
    if layout == "ncs":
        return x
    if layout == "nsc":
        return np.ascontiguousarray(x.transpose(0, 2, 1))
    raise ValueError(f"unknown layout {layout!r}")


def _chan(v) -> np.ndarray:
    """(C,) per-channel vector -> (1, C, 1) for broadcasting against (N, C, S)."""
    return np.asarray(v, dtype=np.float64).reshape(1, -1, 1)


# ------------------------------------------------------------------------------- statistics
def batch_stats(x, layout: str = "ncs"):
    """(count, mean, biased var) per channel: count = N*S, mean = sum(x)/m,
    var = sum((x - mean)^2)/m (two-pass). An empty batch gives count 0, mean 0, var 0."""
    x = to_ncs(x, layout)
    count = x.shape[0] * x.shape[2]
    c = x.shape[1]
    if count == 0:  # no 0/0: an empty piece must drop out of merges, not poison them
        return 0, np.zeros(c), np.zeros(c)
    with np.errstate(invalid="ignore", over="ignore"):
        mean = x.sum(axis=(0, 2)) / count
        var = ((x - _chan(mean)) ** 2).sum(axis=(0, 2)) / count
    return (count,) + nan_if_non_finite(mean, var)


def stats_of_pieces(pieces) -> np.ndarray:
    """(R, 3, C) partials (count, mean, var rows) of a list of (N_i, C, S) arrays."""
    rows = []
    for p in pieces:
        count, mean, var = batch_stats(p)
        rows.append(np.stack([np.full_like(mean, count), mean, var]))
    return np.stack(rows)


def running_update(running_mean, running_var, mean, var, count, momentum: float):
    """New (running_mean, running_var):
    r_mean <- (1 - momentum) * r_mean + momentum * mean
    r_var  <- (1 - momentum) * r_var  + momentum * var * m / (m - 1)   (unbiased)
    For m <= 1 the batch variance is 0, so the correction factor is taken as 1 (no 0/0)."""
    m = np.asarray(count, dtype=np.float64)
    unbias = m / np.maximum(m - 1.0, 1.0)
    rm = (1.0 - momentum) * np.asarray(running_mean, np.float64) + momentum * np.asarray(mean)
    rv = ((1.0 - momentum) * np.asarray(running_var, np.float64)
          + momentum * np.asarray(var, np.float64) * unbias)
    return rm, rv


def invstd(var, eps: float) -> np.ndarray:
    """1 / sqrt(var + eps)."""
    return 1.0 / np.sqrt(np.asarray(var, dtype=np.float64) + eps)


def gamma(weight, eps: float, c: int) -> np.ndarray:
    """Effective scale gamma~ = |w| + eps (positive, so the activation stays invertible);
    all ones without weight."""
    if weight is None:
        return np.ones(c)
    return np.abs(np.asarray(weight, dtype=np.float64)) + eps


def abs_slope(weight) -> np.ndarray:
    """d|w|/dw as used for dweight: -1 where w < 0, else +1. At w = 0 this is the official
    package's convention, not sign(0) = 0: a zero weight (timm zero-initialises the last norm
    of residual blocks) gets the gradient of gamma~ and trains, as a BatchNorm weight would."""
    return np.where(np.asarray(weight, np.float64) < 0, -1.0, 1.0)


def _bias(bias, c: int) -> np.ndarray:
    return np.zeros(c) if bias is None else np.asarray(bias, dtype=np.float64)


# ------------------------------------------------------------------------------ activations
def _check_act(name: str, param: float) -> None:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}")
    if name != "identity" and not param > 0:
        raise ValueError(f"{name} needs a positive parameter, got {param}")


def act_forward(name: str, y, param: float) -> np.ndarray:
    """identity: y; leaky_relu: y if y >= 0 else p*y; elu: y if y >= 0 else p*(exp(y) - 1),
    branching on ``positive_side`` (so z keeps y's sign bit)."""
    _check_act(name, param)
    y = np.asarray(y, dtype=np.float64)
    if name == "identity":
        return y.copy()
    pos = positive_side(y)
    if name == "leaky_relu":
        return np.where(pos, y, param * y)
    return np.where(pos, y, param * np.expm1(np.where(pos, 0.0, y)))


def act_inverse(name: str, z, param: float) -> np.ndarray:
    """y from z. leaky_relu: z if z >= 0 else z/p; elu: z if z >= 0 else log1p(z/p) with
    z/p clamped to ELU_INVERSE_FLOOR (> -1) so every finite z maps to a finite y. The branch
    is ``positive_side(z)``: -0 is inverted as a negative output; NaN stays NaN."""
    _check_act(name, param)
    z = np.asarray(z, dtype=np.float64)
    if name == "identity":
        return z.copy()
    pos = positive_side(z)
    if name == "leaky_relu":
        return np.where(pos, z, z / param)
    t = np.maximum(np.where(pos, 0.0, z) / param, ELU_INVERSE_FLOOR)  # maximum keeps NaN
    return np.where(pos, z, np.log1p(t))


def act_derivative(name: str, z, param: float) -> np.ndarray:
    """dz/dy written in terms of z: identity 1; leaky_relu 1 if z >= 0 else p;
    elu 1 if z >= 0 else max(z + p, 0) (= p*exp(y); a stored z rounded below the asymptote -p
    gives 0, not a slope of the wrong sign). Branch: ``positive_side(z)``."""
    _check_act(name, param)
    z = np.asarray(z, dtype=np.float64)
    if name == "identity":
        return np.ones_like(z)
    pos = positive_side(z)
    if name == "leaky_relu":
        return np.where(pos, 1.0, param)
    return np.where(pos, 1.0, np.maximum(z + param, 0.0))


# --------------------------------------------------------------------------------- forward
def affine_act(x, mean, inv_std, gam, bias, activation: str, param: float,
               residual=None) -> np.ndarray:
    """z = act(gamma~ * (x - mean) * invstd + b [+ r]) on (N, C, S) with given per-channel
    stats; r (N, C, S) is the optional residual."""
    x = np.asarray(x, dtype=np.float64)
    y = _chan(gam) * (x - _chan(mean)) * _chan(inv_std) + _chan(bias)
    if residual is not None:
        y = y + np.asarray(residual, dtype=np.float64)
    return act_forward(activation, y, param)


def forward(x, weight=None, bias=None, running_mean=None, running_var=None, *,
            training: bool, momentum: float = 0.1, eps: float = 1e-5,
            activation: str = "identity", param: float = 0.01, layout: str = "ncs",
            residual=None) -> dict:
    """Full forward (residual: optional, like x, added before the activation). Training: batch stats, running stats updated (when given) by
    ``running_update``; eval: mean/var are the running stats and count = N*S.
    Returns z (in ``layout``), mean, var, count, invstd, running_mean, running_var."""
    x = to_ncs(x, layout)
    c = x.shape[1]
    rm = None if running_mean is None else np.asarray(running_mean, np.float64)
    rv = None if running_var is None else np.asarray(running_var, np.float64)
    if training:
        count, mean, var = batch_stats(x)
        if rm is not None:
            rm, rv = running_update(rm, rv, mean, var, count, momentum)
    else:
        if rm is None or rv is None:
            raise ValueError("eval mode needs running_mean and running_var")
        count, mean, var = x.shape[0] * x.shape[2], rm.copy(), rv.copy()
    inv = invstd(var, eps)
    r = None if residual is None else to_ncs(residual, layout)
    z = affine_act(x, mean, inv, gamma(weight, eps, c), _bias(bias, c), activation, param, r)
    return {"z": from_ncs(z, layout), "mean": mean, "var": var, "count": count, "invstd": inv,
            "running_mean": rm, "running_var": rv}


# -------------------------------------------------------------------------------- backward
def input_grad(dy, xhat, gam, inv_std, count, sum_dy, sum_dy_xhat, training: bool):
    """dx on (N, C, S). training: gamma~*invstd*(dy - sum_dy/m - xhat*sum_dy_xhat/m);
    eval: gamma~*invstd*dy (the statistics are constants)."""
    k = _chan(gam) * _chan(inv_std)
    dy = np.asarray(dy, dtype=np.float64)
    if not training:
        return k * dy
    m = _chan(count)
    return k * (dy - _chan(sum_dy) / m - np.asarray(xhat) * _chan(sum_dy_xhat) / m)


def backward(z, dz, inv_std, count, weight=None, bias=None, *, training: bool,
             eps: float = 1e-5, activation: str = "identity", param: float = 0.01,
             layout: str = "ncs", residual=None) -> dict:
    """Backward from the output z and its gradient dz only (x is never stored), plus the
    forward's residual when it had one.
    Returns y, dy, xhat, dx (in ``layout``), sum_dy, sum_dy_xhat, dweight, dbias
    (dweight = abs_slope(w) * sum(dy*xhat), None without weight; dbias = sum(dy), None without
    bias) and dresidual (= dy, in ``layout``; None without a residual)."""
    z = to_ncs(z, layout)
    dz = to_ncs(dz, layout)
    c = z.shape[1]
    gam = gamma(weight, eps, c)
    y = act_inverse(activation, z, param)
    dy = dz * act_derivative(activation, z, param)
    r = 0.0 if residual is None else to_ncs(residual, layout)
    xhat = (y - r - _chan(_bias(bias, c))) / _chan(gam)
    sum_dy = dy.sum(axis=(0, 2))
    sum_dy_xhat = (dy * xhat).sum(axis=(0, 2))
    count = np.broadcast_to(np.asarray(count, np.float64), (c,))
    dx = input_grad(dy, xhat, gam, inv_std, count, sum_dy, sum_dy_xhat, training)
    dweight = None if weight is None else abs_slope(weight) * sum_dy_xhat
    dbias = None if bias is None else sum_dy.copy()
    return {"y": from_ncs(y, layout), "dy": from_ncs(dy, layout),
            "xhat": from_ncs(xhat, layout), "dx": from_ncs(dx, layout), "sum_dy": sum_dy,
            "sum_dy_xhat": sum_dy_xhat, "dweight": dweight, "dbias": dbias,
            "dresidual": None if residual is None else from_ncs(dy.copy(), layout)}


# ------------------------------------------------------------------------------ comparison
def rel_error(actual, expected) -> float:
    """max |actual - expected| / max |expected| (float64), the 'relative to output scale'
    error every test uses; an all-zero expectation falls back to the absolute error.
    NaN anywhere (or a shape mismatch) counts as an infinite error."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    if a.shape != e.shape:
        return float("inf")
    if a.size == 0:
        return 0.0
    err = np.abs(a - e)
    if not np.all(np.isfinite(err)):
        return float("inf")
    scale = float(np.max(np.abs(e)))
    return float(np.max(err)) / (scale if scale > 0 else 1.0)

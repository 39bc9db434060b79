"""Vectorized NumPy implementation of every stage of the Backend protocol (CPU, any dtype).

Inputs of every dtype are widened to float64 chunk by chunk (over N) so that low-precision
inputs lose nothing beyond their own storage rounding; results are written back through
``x3[...] = ...`` so the caller's buffer is what changes (the in-place contract).
Both layouts are handled by reducing over the right axes of the given view, never by copying
the input into the other layout. Non-finite values follow IEEE arithmetic without warnings, plus
the one rule the kernels apply too (reference.nan_if_non_finite): NaN statistics for a channel
with a NaN or Inf in its batch.
"""
from __future__ import annotations

import functools

import numpy as np

from .. import reference as ref
from ..reference import ELU_INVERSE_FLOOR

from iabn_core.dtypes import numpy_dtype
from iabn_core.merge import merge_partials

from .base import Composites

# Bound float64 temporaries to ~32 MiB each by processing this many elements per chunk.
_CHUNK_ELEMS = 1 << 22
# Same floor as the reference: log1p stays finite in float64 for z/p at or below -1.


def _axes(prob):
    """(reduction axes, broadcast shape of a per-channel vector) for the problem's layout."""
    if prob.layout == "ncs":
        return (0, 2), (1, prob.c, 1)
    if prob.layout == "nsc":
        return (0, 1), (1, 1, prob.c)
    raise ValueError(f"unknown layout {prob.layout!r}")


def _chunks(prob):
    """Slices over N covering the batch, each holding about _CHUNK_ELEMS elements."""
    per_sample = max(1, prob.c * prob.s)
    step = max(1, _CHUNK_ELEMS // per_sample)
    for n0 in range(0, prob.n, step):
        yield slice(n0, min(prob.n, n0 + step))


def _quiet(stage):
    """Run a stage without NumPy's warnings about NaN/Inf: non-finite data is a supported input
    with documented results, not an error (and tests turn warnings into errors)."""
    @functools.wraps(stage)
    def run(*args, **kwargs):
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            return stage(*args, **kwargs)

    return run


def _rows(a, sl):
    return None if a is None else a[sl]


def _f64(a):
    return np.asarray(a, dtype=np.float64)


def _gamma(prob, weight):
    return ref.gamma(weight, prob.eps, prob.c)


def _bias(prob, bias):
    return np.zeros(prob.c) if bias is None else _f64(bias)


def _act_forward(prob, y):
    """Activation applied to float64 y in place."""
    p = prob.activation_param
    if prob.activation == "identity":
        return y
    neg = ~ref.positive_side(y)  # -0 and NaN included, as in the kernels
    if prob.activation == "leaky_relu":
        y[neg] *= p
    elif prob.activation == "elu":
        y[neg] = p * np.expm1(y[neg])
    else:
        raise ValueError(f"unknown activation {prob.activation!r}")
    return y


def _act_inverse_and_slope(prob, z):
    """(y, dz/dy) from float64 z, both fresh arrays; the slope is written from z alone."""
    p = prob.activation_param
    if prob.activation == "identity":
        return z.copy(), None
    neg = ~ref.positive_side(z)  # -0 is a negative output (an underflowed slope * y)
    y = z.copy()
    slope = np.ones_like(z)
    if prob.activation == "leaky_relu":
        y[neg] /= p
        slope[neg] = p
    elif prob.activation == "elu":
        zn = z[neg]
        y[neg] = np.log1p(np.maximum(zn / p, ELU_INVERSE_FLOOR))
        slope[neg] = np.maximum(zn + p, 0.0)  # a z rounded below -p must not flip the sign
    else:
        raise ValueError(f"unknown activation {prob.activation!r}")
    return y, slope


class NumpyBackend(Composites):
    """Reference-quality CPU backend; every stage computes in float64."""

    name = "numpy"

    def prepare(self, prob, filenames) -> None:
        """Nothing to compile."""

    # ------------------------------------------------------------------- statistics
    @_quiet
    def batch_stats(self, prob, x3):
        """(1, 3, C) partials: exact two-pass mean and biased variance in float64."""
        axes, shape = _axes(prob)
        acc = numpy_dtype(prob.acc_dtype)
        m = prob.count
        out = np.zeros((1, 3, prob.c), dtype=acc)
        if m == 0:  # empty piece: count 0 drops out of every merge
            return out
        total = np.zeros(prob.c)
        for sl in _chunks(prob):
            total += _f64(x3[sl]).sum(axis=axes)
        mean = total / m
        sq = np.zeros(prob.c)
        for sl in _chunks(prob):
            d = _f64(x3[sl]) - mean.reshape(shape)
            d *= d
            sq += d.sum(axis=axes)
        out[0, 0] = m
        out[0, 1] = mean
        out[0, 2] = sq / m
        return out

    @_quiet
    def merge_stats(self, prob, partials):
        merged = merge_partials(_f64(partials), xp=np)
        return merged.astype(numpy_dtype(prob.acc_dtype))

    @_quiet
    def finalize(self, prob, partials, running_mean, running_var, momentum, training):
        acc = numpy_dtype(prob.acc_dtype)
        if training:
            count, mean, var = merge_partials(_f64(partials), xp=np)
            # reference.nan_if_non_finite, judged in the accumulator dtype the stats are kept
            # in, as in the kernels: a float32 variance past 3.4e38 is Inf there, so NaN.
            bad = ~(np.isfinite(mean.astype(acc)) & np.isfinite(var.astype(acc)))
            mean, var = np.where(bad, np.nan, mean), np.where(bad, np.nan, var)
            if running_mean is not None:
                # Written through [...] so the caller's arrays (own dtype) are updated.
                running_mean[...] = (1.0 - momentum) * _f64(running_mean) + momentum * mean
            if running_var is not None:
                unbias = count / np.maximum(count - 1.0, 1.0)  # var is 0 when m <= 1
                running_var[...] = ((1.0 - momentum) * _f64(running_var)
                                    + momentum * var * unbias)
        else:
            if running_mean is None or running_var is None:
                raise ValueError("eval mode needs running_mean and running_var")
            count = np.full(prob.c, float(prob.count))
            mean, var = _f64(running_mean), _f64(running_var)
        stats = np.empty((4, prob.c), dtype=acc)
        stats[0] = count
        stats[1] = mean
        stats[2] = var
        stats[3] = 1.0 / np.sqrt(var + prob.eps)
        return stats

    # ---------------------------------------------------------------------- forward
    @_quiet
    def forward(self, prob, x3, stats, weight, bias, residual3=None):
        _, shape = _axes(prob)
        st = _f64(stats)
        scale = (_gamma(prob, weight) * st[3]).reshape(shape)
        mean = st[1].reshape(shape)
        shift = _bias(prob, bias).reshape(shape)
        for sl in _chunks(prob):
            y = _f64(x3[sl]) - mean
            y *= scale
            y += shift
            if residual3 is not None:
                y += _f64(residual3[sl])
            x3[sl] = _act_forward(prob, y)

    # --------------------------------------------------------------------- backward
    def _dy_xhat(self, prob, z, dz, weight, bias, r=None):
        """float64 (dy, xhat) of one chunk, recovered from z, dz and the residual r (if any)."""
        _, shape = _axes(prob)
        y, slope = _act_inverse_and_slope(prob, _f64(z))
        # Always a fresh array: callers update dy in place and must not alias dz3.
        dy = np.array(dz, dtype=np.float64) if slope is None else _f64(dz) * slope
        if r is not None:
            y -= _f64(r)
        y -= _bias(prob, bias).reshape(shape)
        y /= _gamma(prob, weight).reshape(shape)
        return dy, y

    @_quiet
    def backward_reduce(self, prob, z3, dz3, stats, weight, bias, residual3=None):
        """(1, 2, C) partial sums of dy and dy * xhat (stats are not needed: xhat comes
        from y, b and gamma~ alone)."""
        axes, _ = _axes(prob)
        sums = np.zeros((2, prob.c))
        for sl in _chunks(prob):
            dy, xhat = self._dy_xhat(prob, z3[sl], dz3[sl], weight, bias, _rows(residual3, sl))
            sums[0] += dy.sum(axis=axes)
            xhat *= dy
            sums[1] += xhat.sum(axis=axes)
        return sums[None].astype(numpy_dtype(prob.acc_dtype))

    @_quiet
    def backward_finalize(self, prob, partial_sums, weight, bias):
        ps = _f64(partial_sums)
        total = np.zeros((2, prob.c))
        for g in range(ps.shape[0]):  # fixed order, so results are reproducible
            total += ps[g]
        pdt = numpy_dtype(prob.param_dtype)
        dweight = dbias = None
        if prob.has_weight:
            dweight = (ref.abs_slope(weight) * total[1]).astype(pdt)
        if prob.has_bias:
            dbias = total[0].astype(pdt)
        return total.astype(numpy_dtype(prob.acc_dtype)), dweight, dbias

    @_quiet
    def backward_elementwise(self, prob, z3, dz3, stats, sums, weight, bias, training,
                             dx3=None, residual3=None, dresidual3=None):
        dx3 = dz3 if dx3 is None else dx3
        _, shape = _axes(prob)
        st = _f64(stats)
        k = (_gamma(prob, weight) * st[3]).reshape(shape)
        if training:
            s = _f64(sums)
            m = st[0]
            mean_dy = (s[0] / m).reshape(shape)
            mean_dy_xhat = (s[1] / m).reshape(shape)
        for sl in _chunks(prob):
            dy, xhat = self._dy_xhat(prob, z3[sl], dz3[sl], weight, bias, _rows(residual3, sl))
            if dresidual3 is not None:
                dresidual3[sl] = dy  # dr = dy, before dy is turned into dx below
            if training:
                xhat *= mean_dy_xhat
                dy -= mean_dy
                dy -= xhat
            dy *= k
            dx3[sl] = dy

"""The one signature cache: what a call derives from plain values of its arguments is computed
once per signature and looked up by one dict access afterwards (the Triton `JITFunction.run`
pattern).

A signature is a tuple of plain values: every array's kind, device, shape, strides and dtype
(byte order included), which optional arrays are absent, and the scalars training, eps,
activation, activation_param. validate's signature checks are a function of these alone; its
buffer checks (alignment, writability, overlap: validate.check_buffers) and momentum, which
stays out of the key because momentum=None modules change it every step, run on every call,
so a cache hit skips no check.

An entry holds the Problem (and, in `Problem.memo`, the plans, kernel handles and packed scalar
arguments the backends derive from it), the layout, and each buffer's byte extent relative to
its data pointer. Entries are only ever made by a call that passed full validation. Arguments
of unusual types (array subclasses, NumPy scalars, bool-as-int) take the uncached path, which
validates everything each time.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import arrays, validate
from .backends.base import Problem

MAX_ENTRIES = 512  # distinct signatures kept; the cache is emptied when it is full


@dataclass(frozen=True)
class Signature:
    prob: Problem
    layout: str
    key: tuple  # x's own key: backward's buffers must match it
    spans: tuple  # (start, end) of x, then each present parameter, relative to its pointer


_cache: dict[tuple, Signature] = {}


def array_key(a):
    """Plain values fixing every check of `a` that does not depend on its buffer, or None."""
    if type(a) is np.ndarray:
        return (a.shape, a.strides, a.dtype)
    if arrays.kind(a) == "cupy":
        return (a.device.id, a.shape, a.strides, a.dtype)
    return None


def _plain(v) -> bool:
    return type(v) is float or type(v) is int


def _key(x, params, training, eps, activation, activation_param, min_count):
    if not (type(training) is bool and _plain(eps) and _plain(activation_param)
            and type(activation) is str):
        return None
    xk = array_key(x)
    if xk is None:
        return None
    pk = []
    for p in params:
        if p is None:
            pk.append(None)
        else:
            k = array_key(p)
            if k is None:
                return None
            pk.append(k)
    return (xk, *pk, training, eps, activation, activation_param, min_count)


def _relative_spans(x, params: dict):
    out = []
    for a in [x] + [v for v in params.values() if v is not None]:
        p = arrays.data_ptr(a)
        start, end = arrays.byte_span(a)
        out.append((start - p, end - p))
    return tuple(out)


def forward(x, weight, bias, running_mean, running_var, *, training, momentum, eps, activation,
            activation_param, min_count: int = 2) -> Signature:
    """The Signature of a forward call, after every check (validate.problem on a miss; on a
    hit validate.check_momentum and validate.check_buffers); raises IABNError before anything
    is written."""
    params = dict(weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)
    key = _key(x, (weight, bias, running_mean, running_var), training, eps, activation,
               activation_param, min_count)
    sig = _cache.get(key) if key is not None else None
    if sig is not None:
        validate.check_momentum(momentum)
        validate.check_buffers(x, params, training, sig.spans)
        return sig
    prob, layout = validate.problem(x, weight, bias, running_mean, running_var,
                                    training=training, momentum=momentum, eps=eps,
                                    activation=activation, activation_param=activation_param,
                                    min_count=min_count)
    sig = Signature(prob, layout, key[0] if key is not None else None,
                    _relative_spans(x, params))
    if key is not None:
        if len(_cache) >= MAX_ENTRIES:
            _cache.clear()
        _cache[key] = sig
    return sig


def backward(ctx, z, dz, out=None) -> None:
    """Backward's checks: when z, dz (and out) have exactly the forward x's geometry (the
    common case), only the buffer checks run; otherwise all of them."""
    sig = getattr(ctx, "sig", None)
    k = None if sig is None else sig.key
    if k is not None and array_key(z) == k and array_key(dz) == k and (
            out is None or array_key(out) == k):
        validate.backward_buffer_checks(ctx, z, dz, out, sig.spans[0])
    else:
        validate.backward_buffers(ctx, z, dz, out)


def clear() -> None:
    _cache.clear()

"""Argument checks. Every check runs before any kernel writes a byte, and every error names the
argument, so a rejected call leaves the caller's buffers exactly as they were."""
from __future__ import annotations

import math
import numbers

from . import arrays
from .activations import check_activation
from .backends.base import Problem
from .dtypes import ACC, INPUT_DTYPES, allowed_params, default_param, dtype_name, find_pair
from .layout import detect

PARAM_NAMES = ("weight", "bias", "running_mean", "running_var")
MAX_CHANNELS = 2**31 - 1  # gridDim.x limit: the contiguous layout runs a block column per channel


class IABNError(ValueError):
    """Bad input to an iabn operation (raised before anything is written)."""


def _real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _fail(msg: str):
    raise IABNError(msg)


def check_array(name: str, a, like=None):
    k = arrays.kind(a)
    if k is None:
        _fail(f"{name} must be a NumPy or CuPy array, got {type(a).__name__}")
    if like is not None:
        if k != arrays.kind(like):
            _fail(f"{name} is a {k} array but x is a {arrays.kind(like)} array; "
                  "all arrays must live on the same device")
        if arrays.device(a) != arrays.device(like):
            _fail(f"{name} is on {arrays.device(a)} but x is on {arrays.device(like)}")


def check_input(x, name: str = "x") -> tuple[str, str]:
    """(dtype name, layout) of an activation tensor, or an error naming `name`."""
    check_array(name, x)
    if x.ndim < 2:
        _fail(f"{name} must have shape (N, C, *) with at least 2 dims, got shape {tuple(x.shape)}")
    try:
        dt = dtype_name(x.dtype)
    except TypeError:
        dt = str(x.dtype)
    if dt not in INPUT_DTYPES:
        _fail(f"{name} has unsupported dtype {dt}; supported: {', '.join(INPUT_DTYPES)}")
    if x.shape[1] < 1:
        _fail(f"{name} must have at least one channel (dim 1), got shape {tuple(x.shape)}")
    layout = detect(x.shape, x.strides, x.itemsize)
    if layout is None:
        _fail(f"{name} has unsupported strides {tuple(x.strides)} for shape {tuple(x.shape)}: "
              "iabn works in place on contiguous (N, C, *) or channels-last memory and never "
              "copies silently; pass a contiguous or channels-last array")
    if not arrays.writeable(x):
        _fail(f"{name} is read-only; the operation writes its result into {name}")
    return dt, layout


def check_scalars(training, momentum, eps, activation, activation_param):
    if not isinstance(training, bool):
        _fail(f"training must be a bool, got {training!r}")
    if not (_real(eps) and eps > 0):
        _fail(f"eps must be a finite number > 0, got {eps!r}")
    if not (_real(momentum) and 0.0 <= momentum <= 1.0):
        _fail(f"momentum must be in [0, 1], got {momentum!r}")
    check_activation(activation, activation_param, _fail)


def check_params(x, c: int, x_dtype: str, params: dict, training: bool) -> str:
    """Checks weight/bias/running stats; returns the parameter dtype name."""
    present = {k: v for k, v in params.items() if v is not None}
    for name, a in present.items():
        check_array(name, a, like=x)
        if tuple(a.shape) != (c,):
            _fail(f"{name} must have shape ({c},) to match x's {c} channels, got {tuple(a.shape)}")
        if a.strides[0] != a.itemsize and c > 1:
            _fail(f"{name} must be contiguous")
    if (params["running_mean"] is None) != (params["running_var"] is None):
        missing = "running_var" if params["running_var"] is None else "running_mean"
        _fail(f"{missing} is None but its partner is given; pass both running stats or neither")
    if not training and params["running_mean"] is None:
        _fail("running_mean and running_var are required when training=False")
    if training:
        for name in ("running_mean", "running_var"):
            if params[name] is not None and not arrays.writeable(params[name]):
                _fail(f"{name} is read-only but is updated when training=True")
    names = {n: dtype_name(a.dtype) for n, a in present.items()}
    param_dt = next(iter(names.values()), default_param(x_dtype))
    for name, dt in names.items():
        if dt != param_dt:
            first = next(iter(names))
            _fail(f"{name} has dtype {dt} but {first} has {param_dt}; parameters and running "
                  "stats must share one dtype")
    if find_pair(x_dtype, param_dt) is None:
        bad = next(iter(names))
        _fail(f"{bad} has dtype {param_dt}, which does not go with x of dtype {x_dtype}; "
              f"allowed: {', '.join(allowed_params(x_dtype))}")
    return param_dt


def problem(x, weight, bias, running_mean, running_var, *, training, momentum, eps, activation,
            activation_param, min_count: int = 2) -> tuple[Problem, str]:
    """Validate everything for forward; returns (Problem, layout) or raises IABNError.
    Called before any write (and before any kernel is compiled or launched)."""
    x_dtype, layout = check_input(x)
    check_scalars(training, momentum, eps, activation, activation_param)
    n, c = int(x.shape[0]), int(x.shape[1])
    s = math.prod(int(d) for d in x.shape[2:])
    if c > MAX_CHANNELS:
        _fail(f"x has {c} channels; at most {MAX_CHANNELS} are supported (one CUDA grid row "
              "of blocks per channel)")
    params = dict(weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)
    param_dt = check_params(x, c, x_dtype, params, training)
    if n * s == 0 and min_count > 0:
        _fail(f"x has no values per channel (shape {tuple(x.shape)})")
    if training and n * s < min_count:
        _fail(f"Expected more than 1 value per channel when training, got x of shape "
              f"{tuple(x.shape)}")
    # The op writes x (and the running stats) while reading the parameters: any two of these
    # buffers sharing memory would make the result depend on the order of writes.
    named = [("x", x)] + [(k, v) for k, v in params.items() if v is not None]
    for i, (name_a, a) in enumerate(named):
        for name_b, b in named[i + 1:]:
            if arrays.overlaps(a, b):
                _fail(f"{name_b} shares memory with {name_a}; pass separate buffers")
    prob = Problem(n=n, c=c, s=s, layout=layout, x_dtype=x_dtype, param_dtype=param_dt,
                   acc_dtype=ACC[x_dtype], activation=activation,
                   activation_param=float(activation_param), eps=float(eps),
                   has_weight=weight is not None, has_bias=bias is not None)
    return prob, layout


def backward_buffers(ctx, z, dz, out=None):
    """z, dz (and out) must match ctx's forward: same kind, device, shape, dtype, layout."""
    named = (("z", z), ("dz", dz)) + ((("out", out),) if out is not None else ())
    for name, a in named:
        check_array(name, a, like=ctx.like)
        if tuple(a.shape) != ctx.shape:
            _fail(f"{name} has shape {tuple(a.shape)} but the forward saw {ctx.shape}")
        if dtype_name(a.dtype) != ctx.prob.x_dtype:
            _fail(f"{name} has dtype {dtype_name(a.dtype)} but the forward saw {ctx.prob.x_dtype}")
        layout = detect(a.shape, a.strides, a.itemsize)
        if layout != ctx.layout:
            _fail(f"{name} must have the same memory layout as the forward's x ({ctx.layout}), "
                  f"got strides {tuple(a.strides)}; iabn does not copy silently")
    if not arrays.writeable(dz):
        _fail("dz is read-only; backward writes dx into dz's buffer")
    if out is None and arrays.overlaps(z, dz):
        _fail("z and dz share memory; backward writes dx over dz while reading z "
              "(pass out= to write dx elsewhere)")
    if out is not None:
        if not arrays.writeable(out):
            _fail("out is read-only; backward writes dx into it")
        if arrays.overlaps(out, z) or arrays.overlaps(out, dz):
            _fail("out shares memory with z or dz; pass out=None to write dx over dz")

"""Argument checks. Every check runs before any kernel writes a byte, and every error names the
argument, so a rejected call leaves the caller's buffers exactly as they were.

Two kinds of checks, kept apart so that a caller may cache the first kind:
  * signature checks (`signature`, `check_scalars`, `check_input`, `check_params`, `backend`,
    and the first loop of `backward_buffers`): they depend only on the arguments' kinds,
    devices, shapes, strides, dtypes (byte order included), which ones are None, and the scalar
    values, so every call with the same signature gets the same answer;
  * buffer checks (`check_buffers`, `backward_buffer_checks`): they depend on this call's
    memory (pointer alignment, overlap between buffers, writability) and run on every call.
`problem` runs both for forward; `backward_buffers` both for backward. iabn_core.signature
caches the first kind and runs the second (and `check_momentum`, which its key leaves out) on
every call.
"""
from __future__ import annotations

import math

import numpy as np

from . import arrays
from . import backends as _backends
from .activations import NORMAL_RANGE, show, check_activation, check_real
from .backends.base import Problem
from .dtypes import ACC, INPUT_DTYPES, allowed_params, default_param, dtype_name, find_pair
from .layout import detect

PARAM_NAMES = ("weight", "bias", "running_mean", "running_var")
MAX_CHANNELS = 2**31 - 1  # gridDim.x limit: the contiguous layout runs a block column per channel
# What a backend object must provide to be passed as `backend=` (iabn_core.backends.base).
BACKEND_METHODS = ("prepare", "batch_stats", "merge_stats", "finalize", "forward",
                   "backward_reduce", "backward_finalize", "backward_elementwise")


class IABNError(ValueError):
    """Bad input to an iabn operation (raised before anything is written)."""


def _fail(msg: str):
    raise IABNError(msg)


# ------------------------------------------------------------------------ signature checks
def check_array(name: str, a, like=None):
    k = arrays.kind(a)
    if k is None:
        t = type(a)
        if isinstance(a, np.ndarray):  # arrays.kind takes exact ndarrays only
            _fail(f"{name} is a {t.__module__}.{t.__qualname__}, an ndarray subclass whose "
                  f"indexing or reductions may differ from an ndarray's; pass "
                  f"np.asarray({name}), a plain ndarray over the same memory")
        _fail(f"{name} must be a NumPy or CuPy array, got {t.__name__}")
    if like is not None:
        if k != arrays.kind(like):
            _fail(f"{name} is a {k} array but x is a {arrays.kind(like)} array; "
                  "all arrays must live on the same device")
        if arrays.device(a) != arrays.device(like):
            _fail(f"{name} is on {arrays.device(a)} but x is on {arrays.device(like)}")


def array_dtype(name: str, a) -> str:
    """Canonical dtype name of an array, which must be in native byte order (the kernels and
    the emulator read raw memory; a byte-swapped float is a different number)."""
    if not a.dtype.isnative:
        _fail(f"{name} has non-native byte order (dtype {a.dtype.str!r}); convert it with "
              f"{name}.astype({name}.dtype.newbyteorder('='))")
    try:
        return dtype_name(a.dtype)
    except TypeError:
        return str(a.dtype)


def check_input(x, name: str = "x") -> tuple[str, str]:
    """(dtype name, layout) of an activation tensor, or an error naming `name`."""
    check_array(name, x)
    if x.ndim < 2:
        _fail(f"{name} must have shape (N, C, *) with at least 2 dims, got shape {tuple(x.shape)}")
    dt = array_dtype(name, x)
    if dt not in INPUT_DTYPES:
        _fail(f"{name} has unsupported dtype {dt}; supported: {', '.join(INPUT_DTYPES)}")
    if x.shape[1] < 1:
        _fail(f"{name} must have at least one channel (dim 1), got shape {tuple(x.shape)}")
    layout = detect(x.shape, x.strides, x.itemsize)
    if layout is None:
        _fail(f"{name} has unsupported strides {tuple(x.strides)} for shape {tuple(x.shape)}: "
              "iabn works in place on contiguous (N, C, *) or channels-last memory and never "
              "copies silently; pass a contiguous or channels-last array")
    return dt, layout


def check_scalars(training, momentum, eps, activation, activation_param, *, acc_dtype: str):
    """Type and range of every scalar, judged in the accumulator dtype the kernels use
    (a value that is finite in Python can be Inf, or a flushed subnormal, there)."""
    if not isinstance(training, bool):
        _fail(f"training must be a bool, got {training!r}")
    tiny, big = NORMAL_RANGE[acc_dtype]
    e = check_real("eps", eps, _fail)
    if not tiny <= e <= big:
        _fail(f"eps must be a finite number > 0 that is a normal {acc_dtype} (the accumulator "
              f"dtype; the GPU flushes subnormals to 0): in [{tiny:.4g}, {big:.4g}], "
              f"got {show(eps)}")
    check_momentum(momentum)
    check_activation(activation, activation_param, _fail, acc_dtype=acc_dtype)


def check_momentum(momentum) -> None:
    """The one scalar a signature (iabn_core.signature) leaves out: momentum=None modules
    change it every step, so it is checked on every call."""
    if type(momentum) is float and 0.0 <= momentum <= 1.0:  # the usual case, decided fast
        return
    m = check_real("momentum", momentum, _fail)
    if not 0.0 <= m <= 1.0:
        _fail(f"momentum must be in [0, 1], got {show(momentum)}")


def check_params(x, c: int, x_dtype: str, params: dict) -> str:
    """Checks weight/bias/running stats; returns the parameter dtype name."""
    present = {k: v for k, v in params.items() if v is not None}
    names = {}
    for name, a in present.items():
        check_array(name, a, like=x)
        names[name] = array_dtype(name, a)
        if tuple(a.shape) != (c,):
            _fail(f"{name} must have shape ({c},) to match x's {c} channels, got {tuple(a.shape)}")
        if a.strides[0] != a.itemsize and c > 1:
            _fail(f"{name} must be contiguous")
    if (params["running_mean"] is None) != (params["running_var"] is None):
        missing = "running_var" if params["running_var"] is None else "running_mean"
        _fail(f"{missing} is None but its partner is given; pass both running stats or neither")
    # A dtype no kernel takes is reported on its own argument first (an int32 weight beside
    # a float32 bias is the weight's problem, not the bias's); only then must they agree.
    for name, dt in names.items():
        if find_pair(x_dtype, dt) is None:
            _fail(f"{name} has dtype {dt}, which does not go with x of dtype {x_dtype}; "
                  f"allowed: {', '.join(allowed_params(x_dtype))}")
    param_dt = next(iter(names.values()), default_param(x_dtype))
    for name, dt in names.items():
        if dt != param_dt:
            first = next(iter(names))
            _fail(f"{name} has dtype {dt} but {first} has {param_dt}; parameters and running "
                  "stats must share one dtype")
    return param_dt


def signature(x, weight, bias, running_mean, running_var, *, training, momentum, eps,
              activation, activation_param, min_count: int = 2) -> tuple[Problem, str]:
    """The signature checks of forward; returns (Problem, layout)."""
    x_dtype, layout = check_input(x)
    check_scalars(training, momentum, eps, activation, activation_param, acc_dtype=ACC[x_dtype])
    n, c = int(x.shape[0]), int(x.shape[1])
    s = math.prod(int(d) for d in x.shape[2:])
    if c > MAX_CHANNELS:
        _fail(f"x has {c} channels; at most {MAX_CHANNELS} are supported (one CUDA grid row "
              "of blocks per channel)")
    params = dict(weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)
    param_dt = check_params(x, c, x_dtype, params)
    if not training and running_mean is None:
        _fail("running_mean and running_var are required when training=False")
    # No values at all is an empty batch (a detection head without instances): like
    # torch.nn.BatchNorm it gives an empty output and leaves the running stats. One value
    # per channel cannot give a variance.
    if training and 0 < n * s < min_count:
        _fail(f"Expected more than 1 value per channel when training, got x of shape "
              f"{tuple(x.shape)}")
    prob = Problem(n=n, c=c, s=s, layout=layout, x_dtype=x_dtype, param_dtype=param_dt,
                   acc_dtype=ACC[x_dtype], activation=activation,
                   activation_param=float(activation_param), eps=float(eps),
                   has_weight=weight is not None, has_bias=bias is not None)
    return prob, layout


def backend(x, requested):
    """The backend object for x: `requested` is None, a backend name, or a backend object."""
    if requested is not None and not isinstance(requested, str):
        if not all(callable(getattr(requested, m, None)) for m in BACKEND_METHODS):
            _fail(f"backend must be None, 'numpy', 'emulator', 'cuda' or a backend object "
                  f"(with {', '.join(BACKEND_METHODS)}), got {requested!r}")
        return requested
    try:
        return _backends.select(x, requested)
    except ValueError as e:  # an unknown name, or one that cannot run x's kind of array
        raise IABNError(str(e)) from None


# --------------------------------------------------------------------------- buffer checks
# Each takes every buffer's data pointer once (NumPy's costs about a microsecond); callers that
# know the buffers' geometry from a cached signature pass their byte extents relative to the
# pointer (`spans`), so no extent is recomputed either.
def _aligned(name: str, a, ptr: int | None = None) -> None:
    # Kernels load and store whole elements: a misaligned one faults on a GPU (and is trapped
    # by the emulator), so it is refused here on every backend alike.
    if ptr is None:
        ptr = arrays.data_ptr(a)
    if a.size and ptr % a.itemsize:
        _fail(f"{name} is not aligned to its {a.itemsize}-byte elements (address "
              f"{ptr:#x}); pass an aligned array, e.g. a copy")


def _overlap(a, b) -> bool:
    """Whether byte ranges [a0, a1) and [b0, b1) share a byte (empty ranges share none)."""
    return a[0] < b[1] and b[0] < a[1] and a[1] > a[0] and b[1] > b[0]


def _extents(named, ptrs, spans):
    if spans is None:
        return [arrays.byte_span(a) for _, a in named]
    return [(p + lo, p + hi) for p, (lo, hi) in zip(ptrs, spans)]


def _disjoint(names, extents) -> None:
    live = sorted(e for e in extents if e[1] > e[0])
    if all(a[1] <= b[0] for a, b in zip(live, live[1:])):
        return  # sorted by start, none reaches into the next: all disjoint
    for i, name_a in enumerate(names):  # find the first pair, in argument order, to name it
        for j in range(i + 1, len(names)):
            if _overlap(extents[i], extents[j]):
                _fail(f"{names[j]} shares memory with {name_a}; pass separate buffers")


def check_buffers(x, params: dict, training: bool, spans=None) -> None:
    """Alignment, writability and overlap of forward's buffers. Writable must be what the call
    writes: x always, the running stats only when training (eval only reads them).
    `spans`: (start, end) of x and each present parameter, relative to its data pointer."""
    named = [("x", x)] + [(k, v) for k, v in params.items() if v is not None]
    ptrs = [arrays.data_ptr(a) for _, a in named]
    for (name, a), p in zip(named, ptrs):
        _aligned(name, a, p)
    written = ["x"] + (["running_mean", "running_var"] if training else [])
    for name, a in named:
        if name in written and not arrays.writeable(a):
            what = ("the operation writes its result into x" if name == "x"
                    else "it is updated when training=True")
            _fail(f"{name} is read-only; {what}")
    # The op writes x (and the running stats) while reading the parameters: any two of these
    # buffers sharing memory would make the result depend on the order of writes.
    _disjoint([name for name, _ in named], _extents(named, ptrs, spans))


def problem(x, weight, bias, running_mean, running_var, *, training, momentum, eps, activation,
            activation_param, min_count: int = 2) -> tuple[Problem, str]:
    """Validate everything for forward; returns (Problem, layout) or raises IABNError.
    Called before any write (and before any kernel is compiled or launched)."""
    prob, layout = signature(x, weight, bias, running_mean, running_var, training=training,
                             momentum=momentum, eps=eps, activation=activation,
                             activation_param=activation_param, min_count=min_count)
    check_buffers(x, dict(weight=weight, bias=bias, running_mean=running_mean,
                          running_var=running_var), training)
    return prob, layout


def backward_buffers(ctx, z, dz, out=None):
    """z, dz (and out) must match ctx's forward: same kind, device, shape, dtype, layout
    (signature checks); then aligned, writable where written, and not sharing memory with each
    other or with what forward kept (weight, bias, stats), which backward reads (buffer checks)."""
    named = (("z", z), ("dz", dz)) + ((("out", out),) if out is not None else ())
    for name, a in named:
        check_array(name, a, like=ctx.like)
        if tuple(a.shape) != ctx.shape:
            _fail(f"{name} has shape {tuple(a.shape)} but the forward saw {ctx.shape}")
        if array_dtype(name, a) != ctx.prob.x_dtype:
            _fail(f"{name} has dtype {dtype_name(a.dtype)} but the forward saw {ctx.prob.x_dtype}")
        layout = detect(a.shape, a.strides, a.itemsize)
        if layout != ctx.layout:
            _fail(f"{name} must have the same memory layout as the forward's x ({ctx.layout}), "
                  f"got strides {tuple(a.strides)}; iabn does not copy silently")
    backward_buffer_checks(ctx, z, dz, out)


def backward_buffer_checks(ctx, z, dz, out=None, span=None) -> None:
    """The buffer checks of backward_buffers, for buffers whose geometry already passed.
    `span`: the (start, end) extent z, dz and out share relative to their data pointers, when
    the caller knows it (they have the forward x's geometry)."""
    named = (("z", z), ("dz", dz)) + ((("out", out),) if out is not None else ())
    ptrs = [arrays.data_ptr(a) for _, a in named]
    for (name, a), p in zip(named, ptrs):
        _aligned(name, a, p)
    if out is None and not arrays.writeable(dz):  # with out=, dz is only read
        _fail("dz is read-only; backward writes dx into dz's buffer (pass out= to write "
              "dx elsewhere)")
    ext = _extents(named, ptrs, None if span is None else [span] * len(named))
    if out is None and _overlap(ext[0], ext[1]):
        _fail("z and dz share memory; backward writes dx over dz while reading z "
              "(pass out= to write dx elsewhere)")
    if out is not None:
        if not arrays.writeable(out):
            _fail("out is read-only; backward writes dx into it")
        if _overlap(ext[2], ext[0]) or _overlap(ext[2], ext[1]):
            _fail("out shares memory with z or dz; pass out=None to write dx over dz")
    kept = [("weight", ctx.weight), ("bias", ctx.bias), ("the forward's statistics", ctx.stats)]
    kept = [(kname, arrays.byte_span(k)) for kname, k in kept
            if k is not None and arrays.kind(k) == arrays.kind(z)]
    for (name, _), e in zip(named[1:], ext[1:]):
        for kept_name, ke in kept:
            if _overlap(e, ke):
                _fail(f"{name} shares memory with {kept_name}, which backward reads while "
                      f"writing dx; pass a separate {name}")


def _like_x(name: str, a, like, shape, x_dtype: str, layout: str):
    """`a` has the kind, device, shape, dtype and memory layout of the op's x."""
    check_array(name, a, like=like)
    if tuple(a.shape) != tuple(shape):
        _fail(f"{name} has shape {tuple(a.shape)} but x has {tuple(shape)}; it must match x")
    dt = array_dtype(name, a)
    if dt != x_dtype:
        _fail(f"{name} has dtype {dt} but x has {x_dtype}; it must match x")
    if detect(a.shape, a.strides, a.itemsize) != layout:
        _fail(f"{name} must have x's memory layout ({layout}), got strides {tuple(a.strides)} "
              f"for shape {tuple(a.shape)}; iabn does not copy silently")
    _aligned(name, a)


def forward_residual(residual, x, prob, layout: str, running_mean, running_var) -> None:
    """The forward's residual r (z = act(BN(x) + r)): like x, only read, and sharing no memory
    with the buffers the op writes (x, running stats)."""
    if residual is None:
        return
    _like_x("residual", residual, x, x.shape, prob.x_dtype, layout)
    for name, a in (("x", x), ("running_mean", running_mean), ("running_var", running_var)):
        if a is not None and arrays.overlaps(residual, a):
            _fail(f"residual shares memory with {name}, which the op overwrites; pass a "
                  "separate buffer")


def backward_residual(ctx, z, dz, out, residual, residual_out) -> None:
    """Backward needs the forward's residual again exactly when forward had one; its gradient
    goes to `residual_out` (or a new buffer). Neither may share memory with what is written."""
    if ctx.has_residual and residual is None:
        _fail("residual is required: the forward was given a residual, and backward reads it "
              "again to recover BN's output")
    if not ctx.has_residual and residual is not None:
        _fail("residual was given to backward, but the forward had none")
    if not ctx.has_residual and residual_out is not None:
        _fail("residual_out was given, but the forward had no residual")
    if residual is None:
        return
    _like_x("residual", residual, ctx.like, ctx.shape, ctx.prob.x_dtype, ctx.layout)
    dx = dz if out is None else out
    written = (("dz" if out is None else "out", dx),)
    if residual_out is not None:
        _like_x("residual_out", residual_out, ctx.like, ctx.shape, ctx.prob.x_dtype, ctx.layout)
        if not arrays.writeable(residual_out):
            _fail("residual_out is read-only; backward writes the residual's gradient into it")
        for name, a in (("z", z), ("dz", dz), ("out", out), ("residual", residual),
                        ("weight", ctx.weight), ("bias", ctx.bias),
                        ("the forward's statistics", ctx.stats)):
            if (a is not None and arrays.kind(a) == arrays.kind(residual_out)
                    and arrays.overlaps(residual_out, a)):
                _fail(f"residual_out shares memory with {name}; pass a separate buffer")
    for name, a in written:
        if arrays.overlaps(residual, a):
            _fail(f"residual shares memory with {name}, which backward overwrites with dx")

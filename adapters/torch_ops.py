"""PyTorch ops for InPlace-ABN: the custom ops, the autograd Function and the functional API
(re-exported by iabn.torch); tensor <-> core-array bridging lives in torch_bridge.

Three tiers, as in iabn_core:
  * `iabn::inplace_abn_forward` / `iabn::inplace_abn_backward`: opaque custom ops registered
    with torch.library. They mutate their buffers (declared in `mutates_args`), so
    torch.compile/AOTAutograd functionalize around them instead of tracing into NumPy/CuPy,
    and their fake implementations never touch data (no FakeTensor data-pointer errors).
  * `_InPlaceABN`: a small autograd.Function; x is marked dirty and returned, and only the
    output and per-channel tensors are saved (the point of InPlace-ABN).
  * `inplace_abn` / `inplace_abn_sync`: argument checks that must happen before any write,
    then the Function.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch

from iabn_core import backends as _backends
from iabn_core import layout as _layout
from iabn_core import ops as _ops
from iabn_core import signature as _signature
from iabn_core import validate as _validate
from iabn_core.validate import IABNError

# Re-exported: tests and benchmarks reach the bridge through this module too.
from . import torch_fast as _fast
from .torch_bridge import (TORCH_DTYPES, _SUPPORTED, _acc_dtype, _backend_for,  # noqa: F401
                           _comm, _device_scope, _null_backend, from_core, to_core)
from .torch_checks import _check_tensors
from .torch_grad import closed_form_backward

__all__ = ["inplace_abn", "inplace_abn_sync", "IABNError"]

# ------------------------------------------------------------------------------------------
# Custom ops
# ------------------------------------------------------------------------------------------
def _forward_impl(x, weight, bias, running_mean, running_var, training, momentum, eps,
                  activation, activation_param, group_name, residual=None):
    """The forward op's body: x <- z in place; returns (stats tensor, signature.Signature)."""
    if x.device.type != "cuda":
        return _forward_core(x, weight, bias, running_mean, running_var, training, momentum,
                             eps, activation, activation_param, group_name, residual)
    with _device_scope(x):
        return _forward_core(x, weight, bias, running_mean, running_var, training, momentum,
                             eps, activation, activation_param, group_name, residual)


def _forward_core(x, weight, bias, running_mean, running_var, training, momentum, eps,
                  activation, activation_param, group_name, residual):
    ctx = _ops.forward(to_core(x), to_core(weight), to_core(bias), to_core(running_mean),
                       to_core(running_var), training=training, momentum=momentum, eps=eps,
                       activation=activation, activation_param=activation_param,
                       backend=_backend_for(x), comm=_comm(group_name),
                       residual=to_core(residual))
    _fast.remember(ctx.sig, ctx.backend)
    return from_core(ctx.stats), ctx.sig


@torch.library.custom_op("iabn::inplace_abn_forward",
                         mutates_args=("x", "running_mean", "running_var"))
def _forward_op(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                training: bool, momentum: float, eps: float, activation: str,
                activation_param: float, group_name: str = "",
                residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x <- act(BN(x) [+ residual]) in place (running stats updated in place when training);
    returns the per-channel stats (4, C): count, mean, biased var, inverse std. A non-empty
    group_name synchronises the statistics over that torch.distributed group (see _comm)."""
    if not group_name:  # a signature seen before: the programs over pointers (torch_fast)
        stats = _fast.op_forward(x, weight, bias, running_mean, running_var, residual, training,
                                 momentum, eps, activation, activation_param)
        if stats is not None:
            return stats
    stats = _forward_impl(x, weight, bias, running_mean, running_var, training, momentum, eps,
                          activation, activation_param, group_name, residual)[0]
    if not group_name:
        _fast.register(_fast.key(x, weight, bias, running_mean, running_var, residual, training,
                                 eps, activation, activation_param), x, weight, bias,
                       running_mean, running_var, residual, training, eps, activation,
                       activation_param)
    return stats


@_forward_op.register_fake
def _forward_fake(x, weight, bias, running_mean, running_var, training, momentum, eps,
                  activation, activation_param, group_name="", residual=None):
    # Only torch.compile / torch.export reach this fake kernel, and the ONNX dynamo exporter
    # captures through torch.export: refuse there, naming the fix (eager never gets here).
    if torch.onnx.is_in_onnx_export():
        from .torch_revert import _FIX  # here: torch_revert imports the modules, which import us

        raise IABNError(_FIX.format(tool="the ONNX exporter"))
    return x.new_empty((4, x.shape[1]), dtype=_acc_dtype(x.dtype))


def _param_grad_like(p: Optional[torch.Tensor], stats: torch.Tensor) -> torch.Tensor:
    # Custom ops cannot return None: an absent parameter gets an empty placeholder.
    return stats.new_empty((0,)) if p is None else torch.empty_like(p)


def _backward_impl(z, dz, dx, stats, weight, bias, training, eps, activation, activation_param,
                   group_name, residual=None, dresidual=None, sig=None):
    """The backward op's body: dx <- input gradient (and dresidual <- the residual's gradient);
    returns (dweight, dbias) tensors or None. `sig` is the forward's signature when the caller
    kept it (the eager path); without it (the custom op: Python objects cannot cross the op
    boundary) it is looked up again from z, which has the forward x's shape, dtype and layout;
    running stats play no part here."""
    if z.device.type != "cuda":
        return _backward_core(z, dz, dx, stats, weight, bias, training, eps, activation,
                              activation_param, group_name, residual, dresidual, sig)
    with _device_scope(z):
        return _backward_core(z, dz, dx, stats, weight, bias, training, eps, activation,
                              activation_param, group_name, residual, dresidual, sig)


def _backward_core(z, dz, dx, stats, weight, bias, training, eps, activation, activation_param,
                   group_name, residual, dresidual, sig):
    same = dx.data_ptr() == dz.data_ptr()
    zc, dxc = to_core(z), to_core(dx)
    dzc = dxc if same else to_core(dz)  # each tensor crosses into the core once
    wc, bc = to_core(weight), to_core(bias)
    if sig is None:
        sig = _signature.forward(zc, wc, bc, None, None, training=True, momentum=0.0, eps=eps,
                                 activation=activation, activation_param=activation_param,
                                 min_count=0)
    backend = _backends.select(zc, _backend_for(z))
    ctx = _ops.Context(sig.prob, sig.layout, tuple(zc.shape), backend, to_core(stats), wc, bc,
                       training, zc, _comm(group_name), residual is not None, sig)
    _, dw, db, *_ = _ops.backward(ctx, zc, dzc, out=None if same else dxc,
                                  residual=to_core(residual), residual_out=to_core(dresidual))
    _fast.remember(sig, backend)
    return (None if dw is None else from_core(dw)), (None if db is None else from_core(db))


@torch.library.custom_op("iabn::inplace_abn_backward", mutates_args=("dx", "dresidual"))
def _backward_op(z: torch.Tensor, dz: torch.Tensor, dx: torch.Tensor, stats: torch.Tensor,
                 weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], training: bool,
                 eps: float, activation: str, activation_param: float, group_name: str,
                 residual: Optional[torch.Tensor],
                 dresidual: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """dx <- input gradient (z and dz are only read, unless dx is dz itself: then in place),
    and dresidual <- the residual's gradient when forward had a residual; returns (dweight,
    dbias), empty for absent ones.

    No argument has a default: torch's boxed calls drop trailing arguments equal to their
    defaults, and torch 2.11's in-place bookkeeping then indexes the mutated `dresidual`
    past the end (IndexError in opcheck and torch.compile on the first H200 run)."""
    grads = None
    if not group_name:  # a signature seen before: the programs over pointers (torch_fast)
        grads = _fast.op_backward(z, dz, dx, stats, weight, bias, residual, dresidual, training,
                                  eps, activation, activation_param)
    if grads is None:
        grads = _backward_impl(z, dz, dx, stats, weight, bias, training, eps, activation,
                               activation_param, group_name, residual, dresidual)
        if not group_name:
            _fast.register_backward(z, weight, bias, residual, training, eps, activation,
                                    activation_param)
    dweight, dbias = grads
    return (_param_grad_like(None, stats) if dweight is None else dweight,
            _param_grad_like(None, stats) if dbias is None else dbias)


@_backward_op.register_fake
def _backward_fake(z, dz, dx, stats, weight, bias, training, eps, activation, activation_param,
                   group_name, residual, dresidual):
    return _param_grad_like(weight, stats), _param_grad_like(bias, stats)


# ------------------------------------------------------------------------------------------
# Autograd
# ------------------------------------------------------------------------------------------
def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True if the kernels can read `a` with `b`'s layout (same shape, dtype, memory order)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.stride() == b.stride():  # the usual case: same strides, same order
        return True
    la = _layout.detect(tuple(a.shape), tuple(s * a.element_size() for s in a.stride()),
                        a.element_size())
    lb = _layout.detect(tuple(b.shape), tuple(s * b.element_size() for s in b.stride()),
                        b.element_size())
    return la is not None and la == lb


try:
    _dispatch_modes = torch._C._len_torch_dispatch_stack
except AttributeError:  # pragma: no cover - older torch: always take the custom ops
    def _dispatch_modes():
        return 1


# Gates the eager path: False in eager, and constant True inside a torch.compile trace (one
# Python frame; torch.compiler.is_compiling costs two).
_compiling = torch.compiler.is_dynamo_compiling


def _eager(x: torch.Tensor) -> bool:
    """True when the Function may run the op bodies directly: a plain tensor, no compiler
    tracing, no dispatch mode (FakeTensorMode, make_fx, ...) watching. Otherwise it calls
    the custom ops, which torch.compile, export and the dispatch modes understand.

    The direct call saves the custom ops' dispatch (most of the Python cost of a layer). What
    the ops' ADInplaceOrView kernels did, bumping the version counters of what they write, is
    done here by hand (x by mark_dirty), so autograd's in-place checks see every write."""
    return type(x) is torch.Tensor and not torch.compiler.is_compiling() and not _dispatch_modes()


class _InPlaceABN(torch.autograd.Function):
    """The general path's autograd node (a signature's first call, torch.compile / export,
    dispatch modes, synchronized BN, the NumPy backend); torch_fast.FastInPlaceABN is the
    eager path's. Returns (x, stats): the stats output lets a double backward reach the batch
    statistics (torch_grad), and first-order backward ignores it."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, momentum, eps,
                activation, activation_param, group_name, residual):
        if _eager(x):
            stats, ctx.sig = _forward_impl(x, weight, bias, running_mean, running_var,
                                           training, momentum, eps, activation,
                                           activation_param, group_name, residual)
            written = [t for t in (running_mean, running_var) if t is not None]
            if written:
                torch.autograd.graph.increment_version(written)
        else:
            stats = torch.ops.iabn.inplace_abn_forward(x, weight, bias, running_mean,
                                                       running_var, training, momentum, eps,
                                                       activation, activation_param,
                                                       group_name, residual)
            ctx.sig = None
        ctx.mark_dirty(x)  # also bumps x's version counter
        ctx.set_materialize_grads(False)
        # Only the output z (x's buffer) and per-channel tensors: backward inverts the
        # activation and the affine map to recover what standard BN would have saved. A
        # residual is saved as it is (no copy): in a residual block it is the block's input,
        # which the block's first conv keeps anyway, so its storage is counted once.
        # ctx.sig (plain Python: the problem, plans, kernel handles) holds no tensor memory.
        ctx.save_for_backward(x, stats, weight, bias, residual)
        ctx.cfg = (training, eps, activation, activation_param, group_name)
        return x, stats

    @staticmethod
    def backward(ctx, dz, dstats):
        z, stats, weight, bias, residual = ctx.saved_tensors
        training, eps, activation, activation_param, group_name = ctx.cfg
        needs = ctx.needs_input_grad
        if not torch.compiler.is_compiling() and (
                dstats is not None or dz is None or torch.is_grad_enabled()):
            # A graph of the backward is asked for (create_graph=True), or the second pass of
            # a double backward: the differentiable closed form (torch_grad). A compiled
            # graph keeps the custom op: AOTAutograd's backward refuses double backward
            # itself, and it hands this one zeros for the stats output.
            if group_name and training:
                raise RuntimeError(
                    "inplace_abn_sync does not support double backward (create_graph=True, "
                    "gradient penalties): its statistics span several processes. Use "
                    "InPlaceABN / ABN for that part of the model")
            dinv = None if dstats is None or not training else dstats[3]
            dx, dweight, dbias, dr = closed_form_backward(
                z, dz, stats[3], weight, bias, residual, training, eps, activation,
                activation_param, dinv)
        else:
            dx, dweight, dbias, dr = _first_order_backward(ctx, z, dz, stats, weight, bias,
                                                           residual)
        return (dx,
                dweight if weight is not None and needs[1] else None,
                dbias if bias is not None and needs[2] else None,
                None, None, None, None, None, None, None, None,
                dr if needs[11] else None)


def _first_order_backward(ctx, z, dz, stats, weight, bias, residual):
    training, eps, activation, activation_param, group_name = ctx.cfg
    # The gradient autograd hands us is not ours to overwrite: it may be aliased (an add's
    # backward passes the same tensor to both branches; `z.backward(g)` passes the user's
    # g). So dx is always a new buffer in z's layout (the grad_input standard BN allocates
    # too), and the kernels read dz and write dx in one pass. Only a dz whose memory
    # layout differs from z's (a contiguous grad for a channels-last z, or the stride-0
    # grad of .sum()) is first copied into dx, explicitly, and then processed in place:
    # this copies the gradient, never the user's input, so the in-place contract holds.
    dx = torch.empty_like(z, memory_format=torch.preserve_format)
    if not _same_layout(dz, z):
        dx.copy_(dz)
        dz = dx
    # dr = dy is a gradient of its own (not dx's buffer): a new tensor in z's layout.
    dr = None if residual is None else torch.empty_like(z, memory_format=torch.preserve_format)
    if ctx.sig is not None and _eager(z):
        dweight, dbias = _backward_impl(z, dz, dx, stats, weight, bias, training, eps,
                                        activation, activation_param, group_name, residual,
                                        dr, ctx.sig)
        torch.autograd.graph.increment_version([dx] if dr is None else [dx, dr])
    else:
        # The custom op bumps dx's version counter itself (torch.library registers an
        # ADInplaceOrView kernel for every argument in mutates_args).
        dweight, dbias = torch.ops.iabn.inplace_abn_backward(z, dz, dx, stats, weight,
                                                             bias, training, eps,
                                                             activation, activation_param,
                                                             group_name, residual, dr)
    return dx, dweight, dbias, dr


# ------------------------------------------------------------------------------------------
# Functional API
# ------------------------------------------------------------------------------------------
def inplace_abn(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                training: bool = True, momentum: float = 0.1, eps: float = 1e-5,
                activation: str = "leaky_relu", activation_param: float = 0.01,
                residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """In-place activated batch norm: x is overwritten with
    act(gamma * (x - mean) / sqrt(var + eps) + bias), gamma = |weight| + eps, and returned.

    x: (N, C) or (N, C, *), contiguous or channels-last, float32/float64/float16/bfloat16.
    weight/bias/running_mean/running_var: (C,) or None; float32, or x's dtype.
    training=True uses batch statistics and updates the running stats in place:
    r <- (1 - momentum) * r + momentum * batch_stat (the variance unbiased).
    activation: "leaky_relu", "elu" (activation_param is the slope / alpha, > 0) or
    "identity". Bad arguments raise IABNError before anything is written.
    residual: optional tensor like x (same shape, dtype, memory layout), added before the
    activation: x <- act(BN(x) + residual). It is only read, and saved for backward (no copy),
    which gives it the gradient dy; modifying it in place before backward is an error there.
    """
    return _apply(x, weight, bias, running_mean, running_var, training, momentum, eps,
                  activation, activation_param, "", residual)


def _apply(x, weight, bias, running_mean, running_var, training, momentum, eps, activation,
           activation_param, group_name, residual=None, counter=None):
    """The functional forms' body, and the modules': `counter` is the module's
    num_batches_tracked to increment when the call succeeds (the fast path's forward kernel
    increments it, saving a launch), or None."""
    k = None
    if not group_name and not _compiling() and not _dispatch_modes():
        # A signature seen before: the eager path over pointers (torch_fast).
        k = _fast.key(x, weight, bias, running_mean, running_var, residual, training, eps,
                      activation, activation_param)
        entry = _fast._entries.get(k)
        if entry is not None:
            call = _fast.admit(entry, x, weight, bias, running_mean, running_var, residual,
                               momentum, counter)
            if call is not None:
                if call[7]:  # autograd records this call
                    return _fast.apply(x, weight, bias, residual, call)[0]
                return _fast.run_unrecorded(x, call)
    _check_tensors(x, weight, bias, running_mean, running_var, training, residual)
    _validate.check_scalars(training, momentum, eps, activation, activation_param,
                            acc_dtype="float64" if x.dtype == torch.float64 else "float32")
    z = _InPlaceABN.apply(x, weight, bias, running_mean, running_var, training,
                          float(momentum), float(eps), activation, float(activation_param),
                          group_name, residual)[0]
    if counter is not None:  # only once the op has succeeded: a rejected call changes nothing
        counter.add_(1)
    if k is not None:  # passed every check and ran: later calls like it take the fast path
        _fast.register(k, x, weight, bias, running_mean, running_var, residual, training,
                       eps, activation, activation_param)
    return z


class SyncFallbackWarning(UserWarning, RuntimeWarning):
    """inplace_abn_sync ran unsynchronised because torch.distributed is not initialised.
    A RuntimeWarning too, the category the official package warns with, so filters written
    for it still apply."""


def inplace_abn_sync(x: torch.Tensor, weight: Optional[torch.Tensor],
                     bias: Optional[torch.Tensor], running_mean: Optional[torch.Tensor],
                     running_var: Optional[torch.Tensor], training: bool = True,
                     momentum: float = 0.1, eps: float = 1e-5, activation: str = "leaky_relu",
                     activation_param: float = 0.01, group: Optional[object] = None,
                     residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Like `inplace_abn`, with batch statistics synchronised over `group` (None: the default
    group) when training: every rank gets the statistics of the whole global batch, and
    backward all-reduces [sum dy, sum dy*xhat]; dweight/dbias stay local (DDP averages
    them). Ranks may hold different batch sizes, including none. Without an initialised
    torch.distributed it runs the local version and warns (SyncFallbackWarning, in training
    and eval), as the official package does."""
    return _apply(x, weight, bias, running_mean, running_var, training, momentum, eps,
                  activation, activation_param, _sync_group_name(group, training, 3), residual)


def _sync_group_name(group, training: bool, stacklevel: int) -> str:
    """The name of the process group to synchronise over; "" runs unsynchronised (a group of
    one rank, or no torch.distributed: that warns, `stacklevel` frames up from here)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        # in eval too, as officially: a sync layer without a group is suspect
        warnings.warn("inplace_abn_sync: torch.distributed is not initialised; running "
                      "unsynchronised" + (" (per-process batch statistics)" if training else ""),
                      SyncFallbackWarning, stacklevel=stacklevel)
        return ""
    if dist.get_rank(group) < 0:
        raise IABNError("inplace_abn_sync: this process is not a member of `group`")
    if dist.get_world_size(group) > 1:
        pg = group if group is not None else dist.distributed_c10d._get_default_group()
        return pg.group_name
    return ""

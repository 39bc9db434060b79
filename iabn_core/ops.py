"""Buffer-level InPlace-ABN: validates, picks the backend, runs the stages in order.

The adapters (iabn.cupy, iabn.torch) are thin wrappers over `forward` and `backward` here.
Synchronized BN passes a communicator `comm` (iabn_core.comm) with
  exchange_header((status, C, count)) -> R rows  host-side agreement check, before the stats
  all_gather(array (3, C)) -> array (R, 3, C)    replicas' (count, mean, var), in rank order
  all_reduce(array (2, C)) -> array (2, C)       summed over replicas
Every rank merges the gathered rows with the same kernel in rank order, so all ranks hold
bitwise-identical statistics. Eval mode uses the running stats and exchanges nothing.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from . import arrays
from . import comm as _comm
from . import signature, validate
from .backends.base import Composites, Problem
from .layout import view3


@dataclass
class Context:
    """What backward needs from forward: per-channel state only (the output is passed back in).

    stats rows: count, mean, biased var, inverse std, in the accumulator dtype.
    """

    prob: Problem
    layout: str
    shape: tuple
    backend: Any
    stats: Any
    weight: Any
    bias: Any
    training: bool
    like: Any  # an array of the forward's kind/device, for backward's checks
    comm: Any = None
    has_residual: bool = False  # forward computed z = act(BN(x) + r): backward needs r again
    sig: Any = None  # the forward's signature.Signature (backward's checks start from it)

    @property
    def mean(self):
        return self.stats[1]

    @property
    def var(self):
        return self.stats[2]

    @property
    def invstd(self):
        return self.stats[3]

    @property
    def count(self) -> int:
        """Values per channel the statistics were computed over (all replicas when synced;
        reading it then copies one number from the device)."""
        if self.comm is None or not self.training:
            return self.prob.count
        row = self.stats[0]
        return int(round(float(row[0].get() if hasattr(row, "get") else row[0])))


def forward(x, weight=None, bias=None, running_mean=None, running_var=None, *, training=True,
            momentum=0.1, eps=1e-5, activation="leaky_relu", activation_param=0.01,
            backend=None, comm=None, residual=None) -> Context:
    """Validates everything, then x <- z = act(BN(x) [+ residual]) in place; returns the
    Context backward needs. `residual` (like x, only read) is added before the activation."""
    with arrays.device_scope(x):
        return _forward(x, weight, bias, running_mean, running_var, training, momentum, eps,
                        activation, activation_param, backend, comm, residual)


def _forward(x, weight, bias, running_mean, running_var, training, momentum, eps, activation,
             activation_param, backend, comm, residual=None) -> Context:
    synced = comm is not None and training is True  # eval uses running stats: no collectives
    try:
        # Synced, a rank may hold no samples; the count is judged globally in comm.agree.
        sig = signature.forward(
            x, weight, bias, running_mean, running_var, training=training, momentum=momentum,
            eps=eps, activation=activation, activation_param=activation_param,
            min_count=0 if comm is not None else 2)
        prob, layout = sig.prob, sig.layout
        validate.forward_residual(residual, x, prob, layout, running_mean, running_var)
        be = validate.backend(x, backend)
    except ValueError:  # IABNError
        if synced:  # still join the header exchange, so the peers raise instead of waiting
            _comm.agree(comm, None, None, x, failed=True)
        raise
    total = None
    if synced:
        # Same C everywhere and a global count of 0 or >= 2, checked on every rank before the
        # stats all-gather (whose sizes must match on all ranks); see iabn_core/comm.py.
        total = _comm.agree(comm, prob.c, prob.count, x)
    if (not prob.count and not synced) or total == 0:
        # An empty batch (on every rank, when synced: all of them see total 0 and none joins
        # a collective, here or in backward): nothing to normalise or to learn.
        return Context(prob, layout, tuple(x.shape), be, _empty_stats(x, prob), weight, bias,
                       training, x, None, residual is not None, sig)
    # Compile/load every kernel this call needs before the first write: a compiler or loader
    # failure must not leave running stats updated and x untouched.
    be.prepare(prob, ("stats.cu", "forward.cu"))
    x3 = view3(x, layout)
    r3 = None if residual is None else view3(residual, layout)
    if synced:  # the stages one by one, the all-gather between them
        stats = Composites.forward_all(be, prob, x3, running_mean, running_var, momentum, True,
                                       weight, bias, r3, gather=comm.all_gather)
    else:  # the stages as one call: a backend may fuse them and share one workspace
        stats = _composite(be, "forward_all")(prob, x3, running_mean, running_var, momentum,
                                               training, weight, bias, r3)
    return Context(prob, layout, tuple(x.shape), be, stats, weight, bias, training, x, comm,
                   residual is not None, sig)


def _composite(be, name):
    """be's forward_all/backward_all; a backend object that has only the stages (all that
    validate.backend asks of one) gets the generic sequence."""
    fn = getattr(be, name, None)
    return fn if fn is not None else functools.partial(getattr(Composites, name), be)


def backward(ctx: Context, z, dz, out=None, residual=None, *, residual_out=None):
    """Returns (dx, dweight, dbias), or (dx, dweight, dbias, dresidual) when the forward had
    a residual. dx is written over dz (default) or into `out`, a buffer like z that overlaps
    neither z nor dz (then dz is only read). z is left unchanged.

    `residual` must be the forward's residual, unchanged, exactly when forward had one; its
    gradient (= dy) goes into `residual_out` (a buffer like z that overlaps no other
    argument) or a new array in z's layout."""
    if not isinstance(ctx, Context):
        raise validate.IABNError(f"ctx must be the Context returned by forward, got "
                                 f"{type(ctx).__name__}")
    signature.backward(ctx, z, dz, out)
    validate.backward_residual(ctx, z, dz, out, residual, residual_out)
    with arrays.device_scope(z):
        return _backward(ctx, z, dz, out, residual, residual_out)


def _empty_stats(like, prob):
    """The stats of an empty batch: count 0, mean 0, var 0, invstd 1/sqrt(eps)."""
    stats = arrays.zeros(like, (4, prob.c), prob.acc_dtype)
    stats[3] = prob.eps ** -0.5
    return stats


def _backward(ctx: Context, z, dz, out, residual=None, residual_out=None):
    prob, be = ctx.prob, ctx.backend
    if not prob.count and not (ctx.comm is not None and ctx.training):
        # An empty batch (see _forward): zero parameter gradients, nothing else to write.
        grads = [arrays.zeros(z, (prob.c,), prob.param_dtype) if present else None
                 for present in (prob.has_weight, prob.has_bias)]
        dx = dz if out is None else out
        if residual is None:
            return (dx, *grads)
        return (dx, *grads, arrays.empty_like(z) if residual_out is None else residual_out)
    be.prepare(prob, ("backward.cu",))
    z3, dz3 = view3(z, ctx.layout), view3(dz, ctx.layout)
    dx3 = dz3 if out is None else view3(out, ctx.layout)
    r3 = dr3 = None
    if residual is not None:
        if residual_out is None:  # a new output in z's memory order (order="K" keeps it)
            residual_out = arrays.empty_like(z)
        r3, dr3 = view3(residual, ctx.layout), view3(residual_out, ctx.layout)
    if ctx.comm is not None and ctx.training:  # the stages one by one, the all-reduce between
        dweight, dbias = Composites.backward_all(be, prob, z3, dz3, ctx.stats, ctx.weight,
                                                 ctx.bias, True, dx3, r3, dr3,
                                                 all_reduce=ctx.comm.all_reduce)
    else:  # the stages as one call: a backend may fuse them and share one workspace
        dweight, dbias = _composite(be, "backward_all")(prob, z3, dz3, ctx.stats, ctx.weight,
                                                        ctx.bias, ctx.training, dx3, r3, dr3)
    dx = dz if out is None else out
    if residual is None:
        return dx, dweight, dbias
    return dx, dweight, dbias, residual_out

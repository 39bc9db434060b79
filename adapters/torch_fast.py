"""iabn.torch's eager path over raw pointers: the per-call route of a layer once its call
signature has been seen.

A signature's first call takes the general path (torch_ops: DLPack views, full validation in
iabn_core). When it succeeds on a kernel backend (CUDA tensors; CPU tensors with
IABN_BACKEND=null or emulator), the call's key (every tensor's type, shape, strides, dtype,
device and negative bit, which are absent, and the scalars) is mapped to an `Entry`: the
core's ForwardCall (programs, workspace size, integer checks) and what torch needs to
allocate. A later call with that key does only what depends on this call:

  * the autograd-state checks that must precede any write (leaf, view, inference tensors,
    running stats that require grad): any doubt sends the call to the general path, whose
    checks raise the error that names the argument;
  * the pointers, and the core's alignment and overlap checks on them;
  * one workspace allocation from torch's allocator (the stats live at its head);
  * on CUDA, torch's current raw stream of the tensor's device (a device switch only when the
    tensor is not on the current device); then the program: one pack, one native call per
    launch.

No DLPack, no CuPy array, no CuPy device or stream context. A CUDA tensor that is not on the
current device takes the general path (kernels are loaded per device). The Function returns the
workspace as a second output so that a double backward can reach the batch statistics
(torch_grad); first-order backward ignores it.
"""
from __future__ import annotations

import os
import threading

import torch

from iabn_core.calls import BackwardCall, ForwardCall, disjoint_writes

from .torch_bridge import TORCH_DTYPES
from .torch_grad import closed_form_backward

MAX_ENTRIES = 512
_entries: dict = {}
_pending = threading.local()  # the general path's (signature, backend) of this thread's call
_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)
_KERNEL_CPU = ("null", "emulator")  # CPU backends that run the kernel programs

_grad_enabled = torch.is_grad_enabled
_functorch_active = torch._C._are_functorch_transforms_active
_forward_ad = torch.autograd.forward_ad
_inference_mode = torch.is_inference_mode_enabled
_increment_version = torch._C._increment_version
_empty_like = torch.empty_like
if torch.cuda.is_available():  # pragma: no cover - GPU machines
    _raw_stream = torch._C._cuda_getCurrentRawStream
    _current_device = torch._C._cuda_getDevice
else:
    _raw_stream = _current_device = None


_ENV = os.environ._data  # the encoded environment dict os.environ keeps: a C-level lookup
_ENV_KEY = os.environ.encodekey("IABN_BACKEND")
_KERNEL_CPU_ENV = tuple(os.environ.encodevalue(v) for v in _KERNEL_CPU)


def key(x, weight, bias, running_mean, running_var, residual, training, eps, activation,
        activation_param):
    """The call's key, or None when it cannot take the fast path at all. Written out flat:
    it runs on every call, and a helper per tensor would be a Python frame each."""
    if type(x) is not torch.Tensor or type(training) is not bool:
        return None
    dev = x.get_device()
    if dev < 0:
        backend = _ENV.get(_ENV_KEY)
        if backend not in _KERNEL_CPU_ENV:
            return None
    else:
        backend = "cuda"
    w, b, m, v, r = weight, bias, running_mean, running_var, residual
    try:
        if not (type(w) in _TENSOR_TYPES or w is None) or not (
                type(b) in _TENSOR_TYPES or b is None) or not (
                type(m) in _TENSOR_TYPES or m is None) or not (
                type(v) in _TENSOR_TYPES or v is None) or not (
                type(r) is torch.Tensor or r is None):
            return None
        return (x.shape, x.stride(), x.dtype, dev, x.is_neg(), backend,
                None if w is None else (w.shape, w.stride(), w.dtype, w.get_device(), w.is_neg()),
                None if b is None else (b.shape, b.stride(), b.dtype, b.get_device(), b.is_neg()),
                None if m is None else (m.shape, m.stride(), m.dtype, m.get_device(), m.is_neg()),
                None if v is None else (v.shape, v.stride(), v.dtype, v.get_device(), v.is_neg()),
                None if r is None else (r.shape, r.stride(), r.dtype, r.get_device(), r.is_neg()),
                training, eps, activation, activation_param)
    except (TypeError, RuntimeError, AttributeError):  # not a plain dense tensor
        return None


class Entry:
    """One signature's fast path: the core's forward/backward calls and torch's allocation
    facts. `ws_elems`: the forward workspace, sized for the forward's own use and for the
    backward's scratch behind the stats (`stats_bytes`), whatever the alignment classes."""

    __slots__ = ("fwd", "bwd", "index", "acc", "cfg", "c", "ws_elems", "stats_bytes", "proto")

    def __init__(self, sig, backend, x, training, eps, activation, activation_param,
                 has_residual, params):
        present = tuple(i + 1 for i, p in enumerate(params) if p is not None)
        fwd = self.fwd = ForwardCall(sig, backend, training, has_residual, present)
        self.bwd = BackwardCall(fwd)
        self.index = x.get_device()
        self.acc = TORCH_DTYPES[sig.prob.acc_dtype]
        self.c = sig.prob.c
        self.cfg = (training, eps, activation, activation_param)
        self.proto = torch.empty(0, dtype=self.acc, device=x.device)  # for new_empty
        self.stats_bytes = fwd.stats_bytes
        self.ws_elems = max(fwd.max_ws_elems(),
                            fwd.stats_bytes // fwd.acc_size + self.bwd.max_ws_elems())


def remember(sig, backend) -> None:
    """Called by the general path's eager forward body after it succeeded."""
    _pending.last = (sig, backend)


def register(k, x, weight, bias, running_mean, running_var, residual, training, eps,
             activation, activation_param, table=None) -> None:
    """After a general-path call of key `k` succeeded (the forward's; the backward op's with
    `table=_bwd_entries`, x being z): make its entry from what `remember` kept."""
    last = getattr(_pending, "last", None)
    _pending.last = None
    if last is None or k is None:
        return
    sig, backend = last
    if not sig.prob.count or getattr(backend, "program", None) is None:
        return  # empty batches and the NumPy backend stay on the general path
    index = x.get_device()
    if index >= 0 and _current_device() != index:
        return  # programs are recorded for the current device (admit checks it too)
    table = _entries if table is None else table
    if len(table) >= MAX_ENTRIES:
        table.clear()
    table[k] = Entry(sig, backend, x, training, eps, activation, activation_param,
                     residual is not None, (weight, bias, running_mean, running_var))


def clear() -> None:
    _entries.clear()
    _bwd_entries.clear()


def admit(entry, x, weight, bias, running_mean, running_var, residual, momentum, counter):
    """The call (entry, program, pointers, running stats, counter, momentum) when it may take
    the fast path; None sends it to the general path (which then either runs it or raises
    the error naming the argument)."""
    if (type(momentum) is not float or not 0.0 <= momentum <= 1.0 or _functorch_active()
            or _forward_ad._current_level >= 0):  # forward-mode AD: the general path refuses
        return None
    if entry.index >= 0 and _current_device() != entry.index:
        return None  # kernels and programs are per device: the general path switches
    if running_mean is not None and (running_mean.requires_grad or running_var.requires_grad):
        return None
    x_grad = x.requires_grad
    w_grad = weight is not None and weight.requires_grad
    b_grad = bias is not None and bias.requires_grad
    r_grad = residual is not None and residual.requires_grad
    recording = (x_grad or w_grad or b_grad or r_grad) and _grad_enabled()
    if recording and (x._is_view() or (x_grad and x.is_leaf)):
        return None  # a leaf (or a view) autograd may not see overwritten
    if not _inference_mode():
        # A tensor that requires grad is never an inference tensor: only the others are asked.
        if not x_grad and x.is_inference():
            return None
        if entry.fwd.training and running_mean is not None and (
                running_mean.is_inference() or running_var.is_inference()):
            return None
        if recording and ((weight is not None and not w_grad and weight.is_inference()) or (
                bias is not None and not b_grad and bias.is_inference()) or (
                residual is not None and not r_grad and residual.is_inference())):
            return None
    ptrs = (x.data_ptr(), 0 if weight is None else weight.data_ptr(),
            0 if bias is None else bias.data_ptr(),
            0 if running_mean is None else running_mean.data_ptr(),
            0 if running_var is None else running_var.data_ptr(),
            0 if residual is None else residual.data_ptr(),
            0 if counter is None else counter.data_ptr())
    prog = entry.fwd.program(ptrs)
    if prog is None:
        return None
    return (entry, prog, ptrs, running_mean, running_var, counter, momentum, recording)


class FastInPlaceABN(torch.autograd.Function):
    """The layer's autograd node on the fast path: x is marked dirty and returned with the
    workspace (stats at its head); only z, the workspace and the parameters are saved.

    Called through `apply` below, the C-level apply itself: Function.apply's Python wrapper
    only binds defaults for a setup_context (none here) and unwraps dead functorch wrappers
    (admit sends calls under functorch transforms to the general path). The ctx attributes
    are set directly, as mark_dirty / set_materialize_grads / save_for_backward do."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, call):
        # `call` is admit's tuple: one argument instead of seven for the C-level apply
        ws = _launch(x, call)
        ctx.dirty_tensors = (x,)
        ctx.materialize_grads = False
        ctx.to_save = (x, ws, weight, bias, residual)
        ctx.entry = call[0]
        return x, ws

    @staticmethod
    def backward(ctx, dz, dws):
        z, ws, weight, bias, residual = ctx.saved_tensors
        entry = ctx.entry
        if dws is not None or dz is None or _grad_enabled():
            return _closed_form(entry, z, dz, ws, weight, bias, residual, dws, ctx)
        dx = _empty_like(z)  # preserve_format is empty_like's default
        inplace = dz.stride() != z.stride()
        if inplace:  # a gradient in another layout: copied (never the input), then in place
            dx.copy_(dz)
            dz = dx
        dr = None if residual is None else _empty_like(z)
        # new_empty of a (C,) parameter: its dtype and device, no keyword parsing
        dw = None if weight is None else weight.new_empty(entry.c)
        db = None if bias is None else bias.new_empty(entry.c)
        ptrs = (z.data_ptr(), dz.data_ptr(), dx.data_ptr(), ws.data_ptr(),
                0 if weight is None else weight.data_ptr(), 0 if bias is None else bias.data_ptr(),
                0 if residual is None else residual.data_ptr(), 0 if dr is None else dr.data_ptr(),
                0 if dw is None else dw.data_ptr(), 0 if db is None else db.data_ptr())
        index = entry.index
        if index < 0 or _current_device() == index:  # autograd's device thread: the usual case
            prog = entry.bwd.program(ptrs, inplace)
            if prog is not None:  # scratch: see _backward_program
                prog.run(ptrs, ptrs[3] + entry.stats_bytes, 0.0,
                         0 if index < 0 else _raw_stream(index))
        else:
            with torch.cuda.device(index):
                prog = _backward_program(entry, ptrs, inplace)
        if prog is None:  # a misaligned gradient: the torch closed form handles any memory
            return _closed_form(entry, z, dz, ws, weight, bias, residual, None, ctx)
        needs = ctx.needs_input_grad
        return (dx, dw if needs[1] else None, db if needs[2] else None,
                dr if needs[3] else None, None)


def _run(entry, prog, ptrs, ws: int, momentum: float) -> None:
    """A program on torch's current stream of the entry's device (the custom ops' bodies and
    an off-device backward; the eager forward and backward write it out inline)."""
    index = entry.index
    prog.run(ptrs, ws, momentum, 0 if index < 0 else _raw_stream(index))


def _backward_program(entry, ptrs, inplace):
    """Runs the backward program (None when a buffer check fails): backward's scratch
    (partials, sums) is the forward workspace behind the stats, whose partials are dead by
    now and which Entry sized for both (no allocation)."""
    prog = entry.bwd.program(ptrs, inplace)
    if prog is not None:
        _run(entry, prog, ptrs, ptrs[3] + entry.stats_bytes, 0.0)
    return prog


apply = super(torch.autograd.Function, FastInPlaceABN).apply  # the C-level apply


def _launch(x, call):
    """The forward's launches; returns the workspace (stats at its head)."""
    entry, prog, ptrs, running_mean, running_var, counter, momentum, _ = call
    ws = entry.proto.new_empty(entry.ws_elems)
    index = entry.index  # admit made sure a CUDA tensor's device is the current one
    prog.run(ptrs, ws.data_ptr(), momentum, 0 if index < 0 else _raw_stream(index))
    if running_mean is not None and entry.fwd.training:  # what the kernels wrote
        _increment_version((running_mean, running_var) if counter is None else
                           (running_mean, running_var, counter))
    elif counter is not None:
        _increment_version((counter,))
    return ws


def run_unrecorded(x, call):
    """A call autograd does not record (no_grad, or nothing requires grad: inference, running
    statistics recalibration): the launches without an autograd node."""
    _launch(x, call)
    if not x.is_inference():  # inference tensors keep no version counter
        _increment_version((x,))
    return x


def _closed_form(entry, z, dz, ws, weight, bias, residual, dws, ctx):
    training, eps, activation, param = entry.cfg
    c = entry.c
    dinv = None if dws is None or not training else dws[3 * c:4 * c]
    dx, dw, db, dr = closed_form_backward(z, dz, ws[3 * c:4 * c], weight, bias, residual,
                                          training, eps, activation, param, dinv)
    needs = ctx.needs_input_grad
    return (dx, dw if needs[1] else None, db if needs[2] else None, dr if needs[3] else None,
            None)


# ------------------------------------------------------------------------------------------
# The custom ops' bodies (torch.compile, torch.export and the general path's backward call
# them with real tensors at run time): the same programs, with the checks a body needs.
# Autograd and tracing are outside the op, so only the buffers are checked; what the op is
# handed to write (dx, dresidual) is checked against everything else.
# ------------------------------------------------------------------------------------------
_bwd_entries: dict = {}


def op_forward(x, weight, bias, running_mean, running_var, residual, training, momentum, eps,
               activation, activation_param):
    """The forward op on a known signature: x <- z and the stats (4, C), or None (the
    general path then runs it, and registers the signature)."""
    k = key(x, weight, bias, running_mean, running_var, residual, training, eps, activation,
            activation_param)
    entry = _entries.get(k)
    if entry is None or (entry.index >= 0 and _current_device() != entry.index):
        return None
    ptrs = (x.data_ptr(), 0 if weight is None else weight.data_ptr(),
            0 if bias is None else bias.data_ptr(),
            0 if running_mean is None else running_mean.data_ptr(),
            0 if running_var is None else running_var.data_ptr(),
            0 if residual is None else residual.data_ptr(), 0)
    prog = entry.fwd.program(ptrs)
    if prog is None:
        return None
    ws = entry.proto.new_empty(entry.ws_elems)
    _run(entry, prog, ptrs, ws.data_ptr(), momentum)
    return ws[:4 * entry.c].view(4, entry.c)


def _like(t, z) -> bool:
    return (t is None or (type(t) is torch.Tensor and t.shape == z.shape and t.dtype == z.dtype
                          and t.stride() == z.stride() and t.get_device() == z.get_device()
                          and not t.is_neg()))


def op_backward(z, dz, dx, stats, weight, bias, residual, dresidual, training, eps, activation,
                activation_param):
    """The backward op on a known signature: dx (and dresidual) written, (dweight, dbias)
    returned; None when the general path must run it."""
    k = key(z, weight, bias, None, None, residual, training, eps, activation, activation_param)
    entry = _bwd_entries.get(k)
    if entry is None or (entry.index >= 0 and _current_device() != entry.index):
        return None
    c = entry.c
    if not (_like(dz, z) and _like(dx, z) and _like(dresidual, z)
            and (dresidual is None) == (residual is None) and type(stats) is torch.Tensor
            and stats.shape == (4, c) and stats.dtype == entry.acc and stats.is_contiguous()
            and stats.get_device() == entry.index):
        return None
    dw = None if weight is None else weight.new_empty(c)
    db = None if bias is None else bias.new_empty(c)
    zp, dzp, dxp = z.data_ptr(), dz.data_ptr(), dx.data_ptr()
    inplace = dxp == dzp
    ptrs = (zp, dzp, dxp, stats.data_ptr(), 0 if weight is None else weight.data_ptr(),
            0 if bias is None else bias.data_ptr(),
            0 if residual is None else residual.data_ptr(),
            0 if dresidual is None else dresidual.data_ptr(),
            0 if dw is None else dw.data_ptr(), 0 if db is None else db.data_ptr())
    pb = entry.fwd.param_bytes
    small = tuple((p, p + n) for p, n in ((ptrs[3], entry.stats_bytes), (ptrs[4], pb),
                                          (ptrs[5], pb)) if p)
    # dx and dresidual are written; dx may be dz itself (in place), else it must not touch it
    read = (zp, ptrs[6]) if inplace else (zp, dzp, ptrs[6])
    if not disjoint_writes(entry.fwd.spans[0], (dxp, ptrs[7]), read, small):
        return None
    prog = entry.bwd.program(ptrs, inplace)
    if prog is None:
        return None
    scratch = entry.proto.new_empty(entry.ws_elems)  # held until the launches are queued
    _run(entry, prog, ptrs, scratch.data_ptr(), 0.0)
    return dw, db


def register_backward(z, weight, bias, residual, training, eps, activation,
                      activation_param) -> None:
    """After the backward op's general path succeeded: make its signature's entry."""
    register(key(z, weight, bias, None, None, residual, training, eps, activation,
                 activation_param), z, weight, bias, None, None, residual, training, eps,
             activation, activation_param, _bwd_entries)

"""Torch-level argument checks of iabn.torch's general path: what the core cannot judge (it
sees only arrays), all made before any write. They include what PyTorch itself would refuse
only after the kernels had written: in-place updates of inference tensors outside inference
mode and, when autograd records the call, of views it cannot rebase, inference tensors saved
for backward, and forward-mode AD tangents. The eager fast path (torch_fast.admit) sends any
call these could refuse here."""
from __future__ import annotations

import math
import numbers

import torch

from iabn_core.activations import check_real
from iabn_core.validate import IABNError

from .torch_bridge import TORCH_DTYPES, _SUPPORTED


def _check_tensors(x, weight, bias, running_mean, running_var, training=True,
                   residual=None):
    """The general path's torch-level checks (the module docstring lists them), each raising
    IABNError naming the argument, all before any write."""
    named = dict(x=x, weight=weight, bias=bias, running_mean=running_mean,
                 running_var=running_var, residual=residual)
    for name, t in named.items():
        if t is None and name != "x":
            continue
        if not isinstance(t, torch.Tensor):
            raise IABNError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
        if t.dtype not in _SUPPORTED:
            raise IABNError(f"{name} has unsupported dtype {t.dtype}; supported: "
                            f"{', '.join(map(str, TORCH_DTYPES.values()))}")
        if t.device != x.device:
            raise IABNError(f"{name} is on {t.device} but x is on {x.device}; all tensors "
                            "must be on the same device")
    for name in ("running_mean", "running_var"):
        if named[name] is not None and named[name].requires_grad:
            raise IABNError(f"{name} must not require grad (it is a buffer updated in place)")
    if x.requires_grad and torch.is_grad_enabled():
        base = x if x._base is None else x._base
        if base.is_leaf:
            what = "x is a leaf tensor" if base is x else "x is a view of a leaf tensor"
            raise IABNError(
                f"{what} that requires grad, and inplace_abn overwrites x with its output. "
                "Pass a non-leaf tensor instead, e.g. inplace_abn(x.clone(), ...), or use "
                "iabn.torch.ABN, which does not work in place.")
    if torch.compiler.is_compiling():
        return  # FakeTensors: functionalization handles views; nothing is written while tracing
    fwad = torch.autograd.forward_ad
    if fwad._current_level >= 0:  # a dual-number level is open: tangents would be dropped
        for name, t in named.items():
            if t is not None and fwad.unpack_dual(t).tangent is not None:
                raise IABNError(
                    f"{name} carries a forward-mode AD tangent; inplace_abn has no forward-mode "
                    "derivative (it overwrites its input). Use iabn.torch.ABN, or nn.BatchNorm "
                    "followed by the activation, where forward-mode AD is needed")
    for name, t in named.items():
        if t is not None and t.layout != torch.strided:
            raise IABNError(f"{name} has layout {t.layout}; iabn needs dense (strided) tensors")
        if t is not None and (t.is_neg() or t.is_conj()):  # the memory holds other values
            raise IABNError(f"{name} has its negative or conjugate bit set; pass "
                            f"{name}.resolve_neg().resolve_conj()")
    written = ("x", "running_mean", "running_var") if training is True else ("x",)
    for name in written if not torch.is_inference_mode_enabled() else ():
        if named[name] is not None and named[name].is_inference():
            raise IABNError(
                f"{name} is an inference tensor (created under torch.inference_mode) and "
                f"inplace_abn would update it in place outside inference mode, which PyTorch "
                f"forbids; pass {name}.clone(), or call inside torch.inference_mode()")
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                            for t in (x, weight, bias, residual))):
        return  # autograd records nothing: no view rebase, nothing saved
    for name in ("weight", "bias", "residual"):
        if named[name] is not None and named[name].is_inference():
            raise IABNError(f"{name} is an inference tensor, and autograd would have to save it "
                            f"for backward, which PyTorch forbids; pass {name}.clone()")
    why = _unrebasable_view(x)
    if why:
        raise IABNError(f"x is a view {why}, and autograd cannot record an in-place update of "
                        "it; pass x.clone(), or make the view differently")


def _unrebasable_view(x) -> str:
    """Why autograd would refuse an in-place update of view x ('' if it would not): views from
    functions returning several views (split, chunk, unbind), or made under no_grad or
    inference mode. PyTorch keeps this in the view's creation meta (a private accessor, so a
    missing one just skips the check)."""
    if not x._is_view():
        return ""
    try:
        from torch._C._autograd import CreationMeta, _get_creation_meta

        meta = _get_creation_meta(x)
    except (ImportError, AttributeError, RuntimeError):
        return ""
    return {CreationMeta.MULTI_OUTPUT_NODE: "returned by a function that returns several views "
                                            "(e.g. split, chunk, unbind)",
            CreationMeta.NO_GRAD_MODE: "created under torch.no_grad",
            CreationMeta.INFERENCE_MODE: "created under torch.inference_mode",
            CreationMeta.IN_CUSTOM_FUNCTION: "created inside a custom autograd Function",
            }.get(meta, "")


# ------------------------------------------------------------------------------------------
# The modules' checks (torch_modules)
# ------------------------------------------------------------------------------------------
def _fail(msg: str):
    raise IABNError(msg)


def _check_hyperparameters(num_features, eps, momentum) -> None:
    """Refused at construction, naming the argument, rather than at the first forward (the
    in-place modules) or never (ABN, whose momentum 2 trained to a negative running_var)."""
    if not isinstance(num_features, numbers.Integral) or isinstance(num_features, bool) \
            or num_features < 1:
        _fail(f"num_features must be an int >= 1, got {num_features!r}")
    e = check_real("eps", eps, _fail)
    if not (math.isfinite(e) and e > 0):
        _fail(f"eps must be a finite number > 0, got {eps!r}")
    if momentum is not None:
        m = check_real("momentum", momentum, _fail)
        if not 0.0 <= m <= 1.0:  # NaN fails too
            _fail(f"momentum must be in [0, 1] (or None for a cumulative average), got "
                  f"{momentum!r}")


def _check_residual(x: torch.Tensor, residual: torch.Tensor) -> None:
    """ABN adds the residual after batch_norm has updated the running stats, so every way
    that add could refuse (or broadcast) is checked first: a refused call changes nothing.
    Written for TorchScript too (ABN scripts)."""
    if residual.shape != x.shape or residual.device != x.device:
        raise IABNError(f"residual must be a tensor like x (shape {x.shape} on {x.device}), "
                        f"got shape {residual.shape} on {residual.device}")
    if not torch.can_cast(torch.promote_types(x.dtype, residual.dtype), x.dtype):
        raise IABNError(f"residual has dtype {residual.dtype}, which cannot be added in place "
                        f"to an output of x's dtype {x.dtype}")

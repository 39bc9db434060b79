"""One layer to and from torch.nn.BatchNorm: `from_batchnorm` (BN -> InPlaceABN, with the
activation folded in), `to_batchnorm` (an ABN/InPlaceABN layer -> BN + activation modules)
and `to_sync`. Whole models: torch_convert.convert_model and torch_revert.revert_model."""
from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .torch_checkpoint import _in_place_weight, scale_change
from .torch_modules import (ABN, IN_PLACE_MODULES, IABNConversionWarning, InPlaceABN,
                            InPlaceABNSync)


def _placed_like(new: nn.Module, src: nn.Module) -> nn.Module:
    """`new` moved to the device and dtype of src's first parameter (else floating buffer);
    as it is when src holds none."""
    for t in list(src.parameters()) + [b for b in src.buffers() if b.is_floating_point()]:
        return new.to(device=t.device, dtype=t.dtype)
    return new


def _copy_state(src: nn.Module, dst: nn.Module, weight: Optional[torch.Tensor]) -> None:
    """Writes into dst the scale `weight` (src's, already in dst's parametrisation; None: no
    scale to copy), then src's bias and running statistics: both conversion directions."""
    with torch.no_grad():
        if weight is not None:
            dst.weight.copy_(weight)
        if src.affine and src.bias is not None:  # no bias: nn.BatchNorm(bias=False)
            dst.bias.copy_(src.bias)
        if src.track_running_stats:
            dst.running_mean.copy_(src.running_mean)
            dst.running_var.copy_(src.running_var)
            dst.num_batches_tracked.copy_(src.num_batches_tracked)


def from_batchnorm(bn: _BatchNorm, activation: str = "leaky_relu",
                   activation_param: float = 0.01) -> ABN:
    """An InPlaceABN (InPlaceABNSync for nn.SyncBatchNorm) computing `activation(bn(x))`.

    Weights map as w = gamma - eps so that |w| + eps = gamma; channels with gamma <= eps cannot
    be represented (the in-place scale is always > eps): they get w = 0 and a warning.
    Running stats, num_batches_tracked, eps, momentum, device, dtype and train/eval carry over.
    """
    if not isinstance(bn, _BatchNorm):
        raise TypeError(f"from_batchnorm expects a torch.nn BatchNorm module, got "
                        f"{type(bn).__name__}")
    return _in_place_from(bn, activation, activation_param, warn=True)


def _in_place_from(bn: _BatchNorm, activation: str, activation_param: float,
                   warn: bool) -> ABN:
    """from_batchnorm's conversion. convert_model passes warn=False: it has already measured
    the scales (one device sync per BN) and reports them itself."""
    cls = InPlaceABNSync if isinstance(bn, nn.SyncBatchNorm) else InPlaceABN
    m = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
            activation, activation_param, bias=bn.bias is not None)
    if cls is InPlaceABNSync:  # synchronise over the same ranks (None: the default group)
        m.set_group(bn.process_group)
    m = _placed_like(m, bn)
    change = scale_change(bn) if warn else None
    if change is not None:  # stacklevel 3: the caller of from_batchnorm
        warnings.warn(f"from_batchnorm: {change.channels} of {bn.num_features} channels have "
                      f"gamma <= eps ({bn.eps}), which InPlaceABN (scale |w| + eps) cannot "
                      "represent; they are set to gamma = eps and their outputs will differ",
                      IABNConversionWarning, stacklevel=3)
    _copy_state(bn, m, _in_place_weight(bn.weight, bn.eps) if bn.affine else None)
    m._bn_class = type(bn)  # lets to_batchnorm rebuild the same class
    return m.train(bn.training)


def _activation_module(m: ABN) -> nn.Module:
    if m.activation == "relu":
        return nn.ReLU()
    if m.activation == "leaky_relu":
        return nn.LeakyReLU(m.activation_param)
    if m.activation == "elu":
        return nn.ELU(m.activation_param)
    return nn.Identity()


def to_batchnorm(m: ABN, bn_class: Optional[type] = None) -> nn.Sequential:
    """An equivalent `nn.Sequential(BatchNorm, activation)` of standard modules, for inference
    and export (ONNX, TorchScript). bn_class defaults to the class the module was converted
    from, else nn.BatchNorm2d (the classes differ only in the input rank they accept)."""
    if not isinstance(m, ABN):
        raise TypeError(f"to_batchnorm expects an ABN/InPlaceABN module, got {type(m).__name__}")
    bn = _batchnorm_from(m, bn_class or getattr(m, "_bn_class", nn.BatchNorm2d))
    return nn.Sequential(bn, _activation_module(m)).train(m.training)


def _batchnorm_from(m: ABN, bn_class: type, *args: Any) -> _BatchNorm:
    """A `bn_class` module (args: its arguments after BatchNorm's first five) holding m's
    state in the BatchNorm parametrisation, on m's device and dtype, in m's train/eval mode;
    an nn.SyncBatchNorm synchronises over m's group. Also builds revert_model's layers."""
    bn = bn_class(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats, *args)
    if isinstance(bn, nn.SyncBatchNorm):
        bn.process_group = getattr(m, "group", None)
    bn = _placed_like(bn, m)
    if m.affine and m.bias is None:  # built with bias=False: no bias key on either side
        bn.register_parameter("bias", None)
    # effective_weight() is None for a weight set to None: nothing to copy then
    _copy_state(m, bn, m.effective_weight() if m.affine else None)
    return bn.train(m.training)


def to_sync(m: ABN, group: Optional[Any] = None) -> InPlaceABNSync:
    """The InPlaceABNSync equivalent of an InPlaceABN (same config, state, device, dtype and
    train/eval), synchronising over `group`; an InPlaceABNSync just gets the group."""
    if not isinstance(m, IN_PLACE_MODULES):  # ABN's weight is the scale, not |w| - eps
        raise TypeError(f"to_sync expects an InPlaceABN or InPlaceABNSync module, got "
                        f"{type(m).__name__}")
    if isinstance(m, InPlaceABNSync):
        m.set_group(group)
        return m
    s = InPlaceABNSync(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats,
                       m.activation, m.activation_param, group,
                       bias=m.bias is not None or not m.affine)
    s = _placed_like(s, m)
    s.load_state_dict(m.state_dict())
    if hasattr(m, "_bn_class"):
        s._bn_class = m._bn_class
    return s.train(m.training)

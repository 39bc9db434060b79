"""One layer to and from torch.nn.BatchNorm: `from_batchnorm` (BN -> InPlaceABN, with the
activation folded in), `to_batchnorm` (an ABN/InPlaceABN layer -> BN + activation modules)
and `to_sync`. Whole models: torch_convert.convert_model and torch_revert.revert_model."""
from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .torch_modules import (ABN, IN_PLACE_MODULES, IABNConversionWarning, InPlaceABN,
                            InPlaceABNSync)


def _first_tensor(m: nn.Module) -> Optional[torch.Tensor]:
    for t in list(m.parameters()) + [b for b in m.buffers() if b.is_floating_point()]:
        return t
    return None


def _unrepresentable(bn: _BatchNorm) -> int:
    """Channels whose BN scale gamma <= eps: |w| + eps can never equal them."""
    if not bn.affine:
        return 0
    return int((bn.weight.detach() <= bn.eps).sum())


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
    cls = InPlaceABNSync if isinstance(bn, nn.SyncBatchNorm) else InPlaceABN
    m = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
            activation, activation_param, bias=bn.bias is not None)
    if cls is InPlaceABNSync:  # synchronise over the same ranks (None: the default group)
        m.set_group(bn.process_group)
    like = _first_tensor(bn)
    if like is not None:
        m = m.to(device=like.device, dtype=like.dtype)
    bad = _unrepresentable(bn)
    if bad:
        warnings.warn(f"from_batchnorm: {bad} of {bn.num_features} channels have gamma <= eps "
                      f"({bn.eps}), which InPlaceABN (scale |w| + eps) cannot represent; they "
                      "are set to gamma = eps and their outputs will differ",
                      IABNConversionWarning, stacklevel=2)
    with torch.no_grad():
        if bn.affine:
            m.weight.copy_((bn.weight - bn.eps).clamp_min(0))
            if bn.bias is not None:  # nn.BatchNorm(bias=False)
                m.bias.copy_(bn.bias)
        if bn.track_running_stats:
            m.running_mean.copy_(bn.running_mean)
            m.running_var.copy_(bn.running_var)
            m.num_batches_tracked.copy_(bn.num_batches_tracked)
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
    bn_class = bn_class or getattr(m, "_bn_class", nn.BatchNorm2d)
    bn = bn_class(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
    if isinstance(bn, nn.SyncBatchNorm):
        bn.process_group = getattr(m, "group", None)
    like = _first_tensor(m)
    if like is not None:
        bn = bn.to(device=like.device, dtype=like.dtype)
    if m.affine and m.bias is None:  # built with bias=False: no bias key on either side
        bn.register_parameter("bias", None)
    with torch.no_grad():
        if m.affine:
            bn.weight.copy_(m.effective_weight())
            if m.bias is not None:
                bn.bias.copy_(m.bias)
        if m.track_running_stats:
            bn.running_mean.copy_(m.running_mean)
            bn.running_var.copy_(m.running_var)
            bn.num_batches_tracked.copy_(m.num_batches_tracked)
    return nn.Sequential(bn, _activation_module(m)).train(m.training)


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
    like = _first_tensor(m)
    if like is not None:
        s = s.to(device=like.device, dtype=like.dtype)
    s.load_state_dict(m.state_dict())
    if hasattr(m, "_bn_class"):
        s._bn_class = m._bn_class
    return s.train(m.training)

"""Checkpoints across the two parametrisations of the BN scale.

nn.BatchNorm and ABN multiply the normalised input by `weight` itself; InPlaceABN and
InPlaceABNSync by gamma = |weight| + eps (never below eps, so the layer stays invertible).
Both store it under the same key, `weight`, so a state dict of one kind loads into the other
with "all keys matched" and a different function. The two helpers here convert on the way:

  * `batchnorm_state_dict(model)`: the model's state dict with every in-place layer's weight
    written as gamma = |w| + eps: it loads into the BN model the in-place one was converted
    from (or into `revert_model`'s result).
  * `load_batchnorm_state_dict(model, state_dict)`: loads a BN checkpoint (a pretrained
    torchvision/timm model) into a model with in-place layers, writing w = gamma - eps for
    them; channels with gamma <= eps follow convert_model's rule (see `scale_change`).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Optional

import torch
from torch import nn

from iabn_core.validate import IABNError

from .torch_modules import IN_PLACE_MODULES, IABNConversionWarning

__all__ = ["batchnorm_state_dict", "load_batchnorm_state_dict"]


@dataclass
class ScaleChange:
    """What InPlaceABN's scale floor (eps) does to a BN scale vector gamma."""
    channels: int  # channels with gamma <= eps (their scale becomes eps)
    total: int
    negative: int  # of those, channels with gamma < 0 (the sign would flip too)
    min_gamma: float
    bound: float  # the output changes by at most bound * |x_hat| (x_hat: normalised input)

    def line(self, name: str) -> str:
        """How a warning lists the layer (or state_dict key) `name` with this change."""
        return (f"{name}: {self.channels} of {self.total} channels, by at most "
                f"{self.bound:.3g}*|x_hat|")


def _scale_change(gamma: torch.Tensor, eps: float) -> Optional[ScaleChange]:
    g = gamma.detach()
    low = g <= eps
    n = int(low.sum())
    if not n:
        return None
    least = float(g[low].min())
    return ScaleChange(n, g.numel(), int((g < 0).sum()), least, eps - least)


def scale_change(bn: nn.Module) -> Optional[ScaleChange]:
    """None if every channel of BN-style module `bn` has gamma > eps (InPlaceABN then computes
    exactly its function), else the channels it cannot represent and the output change."""
    weight = getattr(bn, "weight", None)
    if not getattr(bn, "affine", False) or weight is None:
        return None
    return _scale_change(weight, bn.eps)


def _in_place_weight(gamma: torch.Tensor, eps: float) -> torch.Tensor:
    """The in-place weight w = gamma - eps, so that |w| + eps = gamma; gamma <= eps gets
    w = 0, the smallest scale (eps)."""
    return (gamma - eps).clamp_min(0)


def _in_place_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(state_dict key of its weight, layer) for each affine InPlaceABN/InPlaceABNSync in
    model: the layers whose weight the two parametrisations disagree on."""
    for name, m in model.named_modules():
        if isinstance(m, IN_PLACE_MODULES) and m.affine:
            yield (f"{name}.weight" if name else "weight"), m


def batchnorm_state_dict(model: nn.Module) -> dict:
    """`model.state_dict()` with the weight of every InPlaceABN/InPlaceABNSync written in the
    BatchNorm parametrisation (|w| + eps): load it into the BatchNorm model the in-place one
    was converted from. Keys are unchanged; ABN layers already use the BN parametrisation."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"batchnorm_state_dict: model must be an nn.Module, got "
                        f"{type(model).__name__}")
    sd = model.state_dict()
    for key, m in _in_place_layers(model):
        if m.weight is not None:
            sd[key] = m.effective_weight().detach()
    return sd


def load_batchnorm_state_dict(model: nn.Module, state_dict: Mapping[str, Any],
                              strict: bool = True, *, exact: bool = False):
    """Load a BatchNorm-parametrised state dict (a checkpoint of the model before
    convert_model, e.g. pretrained torchvision/timm weights) into `model`, whose in-place
    layers get w = gamma - eps so that they compute what the BN layers did. Other keys load as
    `model.load_state_dict(state_dict, strict)` loads them; returns its result.

    Channels with 0 <= gamma <= eps get the smallest in-place scale, eps (the output changes
    by at most eps*|x_hat|), with an IABNConversionWarning naming each layer; exact=True
    raises instead. A negative gamma always raises: its layer would compute another function.
    Nothing is loaded when it raises. For a checkpoint saved from a model with in-place
    layers, use model.load_state_dict: its weights are already in that parametrisation.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"load_batchnorm_state_dict: model must be an nn.Module, got "
                        f"{type(model).__name__}")
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"load_batchnorm_state_dict: state_dict must be a mapping, got "
                        f"{type(state_dict).__name__}")
    if not isinstance(exact, bool):
        raise TypeError(f"load_batchnorm_state_dict: exact must be a bool, got {exact!r}")
    converted = dict(state_dict)
    refused, changed = [], []
    for key, m in _in_place_layers(model):
        if key not in converted:
            continue
        gamma = converted[key]
        if not isinstance(gamma, torch.Tensor):
            raise TypeError(f"load_batchnorm_state_dict: state_dict[{key!r}] must be a "
                            f"tensor, got {type(gamma).__name__}")
        change = _scale_change(gamma, m.eps)
        if change is not None:
            if change.negative or exact:
                what = (f"{change.negative} channels with negative gamma" if change.negative
                        else f"{change.channels} channels with gamma <= eps")
                refused.append(f"{key}: {what} (down to {change.min_gamma:.3g})")
            else:
                changed.append(change.line(key))
        converted[key] = _in_place_weight(gamma, m.eps)
    if refused:
        raise IABNError("load_batchnorm_state_dict: InPlaceABN's scale |w| + eps cannot "
                        "represent these BatchNorm weights, so the model would compute another "
                        "function" + ("" if exact else " (a negative gamma is never accepted)")
                        + "; nothing was loaded:\n  " + "\n  ".join(refused))
    result = model.load_state_dict(converted, strict)
    if changed:
        warnings.warn("load_batchnorm_state_dict raised gamma <= eps to InPlaceABN's smallest "
                      "scale, eps, changing the function (exact=True refuses this):\n  "
                      + "\n  ".join(changed), IABNConversionWarning, stacklevel=2)
    return result

"""Which fused layers lose their gradients' precision in 16 bits (convert_model's report).

A layer with the residual fused in stores only z = act(BN(x) + r) and recovers BN(x), hence
x_hat, from it in backward. In float16 or bfloat16, z is rounded relative to |BN(x) + r|, so
the recovered x_hat carries an error that grows with |r| / |BN(x)|: the scale's gradient and
the input gradient of that layer go with it (the bias gradient, sum(dy), does not need
x_hat). float32 is unaffected in practice.

Measured by `python -m benchmarks --parts precision` (ResNet-50, batch 8 at 64x64, CPU):
with the standard init |r| / |BN(x)| stays at 1-3 after 20 SGD steps and the fused layers'
scale gradients are about as accurate as unfused InPlace-ABN's (~1e-3 float16); with the last
BN of each block zero-initialised (torchvision's zero_init_residual, timm's default) the ratio
starts at 1e5 and is still in the hundreds after 20 steps, and those scale gradients are
mostly rounding (relative error ~1 and above).

The residual is not known before data flows, but the other side of the ratio is: in
training, channel c of BN(x) has root mean square sqrt(gamma_c^2 + beta_c^2) (x_hat has zero
mean and unit variance). Residual streams of BatchNorm networks have a root mean square near
1 (1-3 measured), so a fused layer with a channel below SMALL_SCALE has |r| / |BN(x)| of
about 1 / SMALL_SCALE = 20 or more there, and convert_model lists it in a warning.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch.nn.modules.batchnorm import _BatchNorm

SMALL_SCALE = 0.05


def output_scale(gamma: torch.Tensor, beta: Union[torch.Tensor, float]) -> torch.Tensor:
    """Per channel, the root mean square of BN(x) in training, sqrt(gamma^2 + beta^2), in
    float64. `gamma` is the scale as applied (for the in-place modules |w| + eps), `beta` the
    bias, or 0.0 for a BN without one. One definition for this module's warning and for the
    precision benchmark's residual table (benchmarks/precision.py), so the scale the warning
    thresholds is the one the benchmark reports."""
    if isinstance(beta, torch.Tensor):
        beta = beta.double()
    return (gamma.double().square() + beta ** 2).sqrt()


def small_output_scale(bn: _BatchNorm) -> Optional[tuple[int, int, float]]:
    """(channels whose output scale is below SMALL_SCALE, channels, smallest scale) of a BN
    as convert_model turns it into InPlaceABN (scales <= eps raised to eps), or None."""
    if bn.weight is None:
        return None  # scale 1: nothing small
    # Made float64 before the clamp (output_scale's own cast comes too late for it): clamping
    # a float32 weight would round eps to float32 first.
    gamma = bn.weight.detach().double().abs().clamp_min(bn.eps)
    beta = 0.0 if bn.bias is None else bn.bias.detach()
    scale = output_scale(gamma, beta)
    small = int((scale < SMALL_SCALE).sum())
    return (small, scale.numel(), scale.min().item()) if small else None


def fused_precision_warning(fused: dict) -> Optional[str]:
    """The warning for fused layers with small output scales; `fused` maps the name of each
    BN that convert_model fuses with a residual to the module."""
    found = {name: s for name, bn in fused.items() if (s := small_output_scale(bn))}
    if not found:
        return None
    return (
        f"convert_model fused the residual into {len(found)} BatchNorm layers with channels "
        f"whose output scale sqrt(gamma^2 + beta^2) is below {SMALL_SCALE:g} (e.g. a "
        "zero-initialised last BN of a residual block). A fused layer recovers BN(x) from its "
        "stored output act(BN(x) + r); under float16 or bfloat16 autocast that rounding, "
        "relative to |r| / |BN(x)| (here about 1/scale for a unit residual), makes their "
        "weight and input gradients mostly rounding until the scales grow (float32 is "
        "unaffected; see README, Limitations). fuse_residual=False keeps BN -> add -> act "
        "as it is; exact=True keeps layers with gamma <= eps as BN:\n  "
        + "\n  ".join(f"{name}: {k} of {c} channels, smallest scale {s:.3g} (|r|/|BN(x)| ~ "
                      f"{_ratio(s)} for |r| ~ 1)" for name, (k, c, s) in found.items()))


def _ratio(scale: float) -> str:
    return f"{1 / scale:.3g}" if scale > 0 and math.isfinite(1 / scale) else "inf"

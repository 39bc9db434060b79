"""InPlace-ABN's backward as torch operations: the closed form the kernels compute, written so
that autograd can differentiate it again (double backward: gradient penalties, meta-learning).

The kernels are first-order only. When autograd asks for a graph of the backward
(`create_graph=True`), or hands the layer a gradient for its statistics output (the second
pass of a double backward), iabn.torch computes the backward here instead:

    y = act^-1(z), dy = dz * act'(z), xhat = (y - bias - r) / gamma, gamma = s(w) * w + eps
    training: dx = gamma * invstd * (dy - sum(dy)/m - xhat * sum(dy * xhat)/m)
    eval:     dx = gamma * invstd * dy
    dweight = s(w) * sum(dy * xhat), dbias = sum(dy), dr = dy

z and the statistics are the layer's own outputs, so their gradients flow back through the
layer's first-order backward, which is how the input x (overwritten) is reached. invstd is the
one quantity z does not determine (z is invariant to scaling x); in training it depends on x
through the batch variance, d invstd / dx_i = -invstd^2 * xhat_i / m, and a gradient `dinvstd`
arriving for it is added to dx with that factor.
"""
from __future__ import annotations

import torch


def _activation(z, activation: str, param: float):
    """(y = act^-1(z), act'(y)) of the layer's output, by the kernels' branch rule: the
    negative side is the sign bit set (-0 included), or NaN."""
    if activation == "identity":
        return z, torch.ones_like(z)
    neg = torch.signbit(z) | torch.isnan(z)
    if activation == "leaky_relu":
        return torch.where(neg, z / param, z), torch.where(neg, param, 1.0).to(z.dtype)
    if activation == "elu":
        floor = -1.0 + 2.0 ** -24  # the kernels' clamp: a finite z never gives -Inf
        y = torch.where(neg, torch.log1p(torch.clamp(z / param, min=floor)), z)
        return y, torch.where(neg, torch.clamp(z + param, min=0.0), torch.ones_like(z))
    raise ValueError(f"unknown activation {activation!r}")


def closed_form_backward(z, dz, invstd, weight, bias, residual, training: bool, eps: float,
                         activation: str, param: float, dinvstd=None):
    """(dx, dweight, dbias, dresidual) of one layer by torch operations (None where absent),
    differentiable when grad mode is on. `invstd` is the (C,) inverse std the forward used."""
    c, nd = z.shape[1], z.dim()
    dims = [0] + list(range(2, nd))
    shape = (1, c) + (1,) * (nd - 2)
    acc = invstd.dtype
    m = z.numel() // c if c else 0
    zf = z.to(acc)
    dzf = torch.zeros_like(zf) if dz is None else dz.to(acc)
    y, slope = _activation(zf, activation, param)
    dy = dzf * slope
    if weight is not None:
        sign = torch.where(weight.detach() < 0, -1.0, 1.0).to(acc)  # d|w|/dw, +1 at w = 0
        gamma = (weight.to(acc) * sign + eps).reshape(shape)
    else:
        sign, gamma = None, torch.ones((), dtype=acc, device=z.device)
    shifted = y if bias is None else y - bias.to(acc).reshape(shape)
    if residual is not None:
        shifted = shifted - residual.to(acc)
    xhat = shifted / gamma
    sum_dy, sum_dy_xhat = dy.sum(dims), (dy * xhat).sum(dims)
    scale = gamma * invstd.reshape(shape)
    if training and m:
        dx = scale * (dy - (sum_dy / m).reshape(shape) - xhat * (sum_dy_xhat / m).reshape(shape))
        if dinvstd is not None:
            dx = dx - (dinvstd.to(acc) * invstd * invstd / m).reshape(shape) * xhat
    else:
        dx = scale * dy
    dweight = None if weight is None else (sign * sum_dy_xhat).to(weight.dtype)
    dbias = None if bias is None else sum_dy.to(bias.dtype)
    dres = None if residual is None else dy.to(residual.dtype)
    return dx.to(z.dtype), dweight, dbias, dres

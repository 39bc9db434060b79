"""Precision of InPlace-ABN in 16 bits, where it matters: a converted ResNet-50 (issue 23, item 12).

InPlace-ABN does not keep its input: backward recovers x_hat from the stored output. In 16 bits
that output is rounded, so the gradients carry its rounding; with the residual fused in,
z = act(BN(x) + r), the rounding is relative to |BN(x) + r| while x_hat is scaled by BN(x)
alone, so the error grows with |r| / |BN(x)|. This part measures three things:

  * residuals: |r| / |BN(x)| (root mean square over the layer, and the worst channel) at every
    fused layer of ResNet-50 (benchmarks.nets, the repository's ResNet-50 v1.5 with
    LeakyReLU) at initialisation and after SGD steps on a fixed random batch, with the standard
    init and with the last BN of each block zero-initialised (torchvision's
    zero_init_residual, timm's default zero_init_last);
  * layer gradients: for every BN layer of the trained nets, the layer's input, residual and
    output gradient are taken from one float64 pass, rounded to float16 / bfloat16 as autocast
    hands them to the layer (16-bit activations, float32 parameters), and each kind's weight,
    bias and input gradient is compared with float64 on the same rounded values. Kinds:
    torch (nn.BatchNorm2d, + r, LeakyReLU), iabn (convert_model(fuse_residual=False): BN -> add
    -> act stays torch) and iabn_fused (convert_model's default). The float64 rows compare
    each kind in float64 with a closed form of the same gradients (the reference checked);
  * training: a small ResNet-50 trained a few steps from one seed, torch vs iabn vs iabn_fused,
    in float32, bfloat16 and float16 autocast (float16 with a GradScaler), loss per step.
"""
from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn

from . import nets
from .cases import EPS, SLOPE, NetSetup, Settings

KINDS = ("torch", "iabn", "iabn_fused")
DTYPES16 = {"float16": torch.float16, "bfloat16": torch.bfloat16}
GRADS = ("dweight", "dbias", "dx")


@dataclass(frozen=True)
class Sizes:
    width: int  # ResNet-50 base width (64: the real one)
    batch: int
    image: int
    steps: int  # SGD steps before the residuals and gradients are measured
    train_width: int
    train_batch: int
    train_image: int
    train_steps: int
    classes: int = 10
    lr: float = 0.05
    train_inits: tuple = ("standard", "zero_init_last")


def sizes(settings: Settings, device: str = "cpu") -> Sizes:
    if settings.tiny:
        return Sizes(width=4, batch=2, image=32, steps=2, train_width=4, train_batch=4,
                     train_image=32, train_steps=2, train_inits=("standard",))
    # Half the real width on the CPU keeps the part within ~3 minutes on 2 cores (the 20 SGD
    # steps of the full width take ~45 s per init there); the topology, hence the residual
    # stream, is ResNet-50's either way.
    return Sizes(width=64 if device == "cuda" else 32, batch=8, image=64, steps=20,
                 train_width=8, train_batch=16, train_image=32, train_steps=30)


def resnet50(width: int, classes: int, zero_init_last: bool, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nets.ResNet50(nets.standard_norm, width, classes)
    if zero_init_last:
        for name, m in model.named_modules():
            if name.endswith("bn3"):
                nn.init.zeros_(m.weight)
    return model.train()


class _InPlaceScale(nn.Module):
    """gamma = |w| + eps, with d|w|/dw = +1 at w = 0 as InPlace-ABN takes it (torch's abs
    would give 0 there, and a zero-initialised scale would never move)."""

    def forward(self, w):
        return torch.where(w < 0, -w, w) + EPS

    def right_inverse(self, gamma):
        return (gamma - EPS).clamp_min(0)


def train_as_converted(model, x, y, steps, lr):
    """Trains the torch model with InPlace-ABN's scale parametrisation, so that its BN layers
    learn what a converted model's would (in float32) at torch's speed, and no scale turns
    negative (convert_model refuses those), then writes gamma back as plain weights."""
    from torch.nn.utils import parametrize

    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        parametrize.register_parametrization(m, "weight", _InPlaceScale())
    train(model, x, y, steps, lr)
    for m in bns:
        parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    return model


def convert(model: nn.Module, fuse: bool) -> nn.Module:
    from iabn.torch import IABNConversionWarning, convert_model

    with warnings.catch_warnings():  # zero-initialised scales become eps: expected here
        warnings.simplefilter("ignore", IABNConversionWarning)
        return convert_model(copy.deepcopy(model), fuse_residual=fuse)


def batch(s: Sizes, n: int, image: int, device, seed=1):
    """n random images and class labels: nets.batch's ResNet-50 input, so this part and the
    others draw their batches the same way (the width, which only sizes the network, does
    not enter it)."""
    setup = NetSetup("resnet50", size=image, width=s.width, batches=(n,), classes=s.classes)
    return nets.batch(setup, n, device, seed)


def _autocast(device, dtype):
    if dtype in (None, torch.float32, torch.float64):
        return torch.autocast(torch.device(device).type, enabled=False)
    return torch.autocast(torch.device(device).type, dtype=dtype)


def train(model, x, y, steps, lr, dtype=None, losses=None):
    """SGD with momentum on one fixed batch; under 16-bit autocast, float16 uses a GradScaler."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    scaler = torch.amp.GradScaler(x.device.type, enabled=dtype is torch.float16)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        with _autocast(x.device, dtype):
            loss = F.cross_entropy(model(x).float(), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if losses is not None:
            losses.append(loss.item())
    return model


@dataclass
class Layer:
    name: str
    act: str  # activation of the fused/converted layer: leaky_relu or identity
    x: torch.Tensor
    r: torch.Tensor | None
    dz: torch.Tensor | None
    gamma: torch.Tensor  # the scale InPlaceABN applies, |w| + eps (what every kind gets)
    beta: torch.Tensor

    @cached_property
    def ratio(self) -> tuple[float, float]:
        """|r| / |BN(x)|: root mean square over the layer, and the largest per-channel ratio.
        Cached: the residual table and the gradient rows both report it, and it is a float64
        batch norm over the whole activation."""
        x = self.x.double()
        y = F.batch_norm(x, None, None, self.gamma.double(), self.beta.double(), True, 0.0, EPS)
        dims = [d for d in range(x.dim()) if d != 1]
        r = self.r.double()
        whole = (r.square().mean() / y.square().mean()).sqrt().item()
        per_channel = (r.square().mean(dims) / y.square().mean(dims)).sqrt().max().item()
        return whole, per_channel


def capture(fused: nn.Module, x, y, backward: bool) -> list[Layer]:
    """Every in-place layer's input, residual and output gradient in one pass of the
    converted model (run in the dtype the model and x are in)."""
    from iabn.torch import IN_PLACE_MODULES

    layers, hooks = [], []

    def pre(name, m):
        def hook(mod, args, kwargs):
            r = kwargs.get("residual", args[1] if len(args) > 1 else None)
            layers.append(Layer(name, m.activation, args[0].detach().clone(),
                                None if r is None else r.detach().clone(), None,
                                m.effective_weight().detach(), m.bias.detach().clone()))
        return hook

    def post(mod, args, kwargs, out):
        # An in-place layer has no in-place layer inside it: the last layer captured is its own.
        layer = layers[-1]
        if backward:
            out.register_hook(lambda g: setattr(layer, "dz", g.detach().clone()))

    for name, m in fused.named_modules():
        if isinstance(m, IN_PLACE_MODULES):
            hooks.append(m.register_forward_pre_hook(pre(name, m), with_kwargs=True))
            hooks.append(m.register_forward_hook(post, with_kwargs=True))
    try:
        with torch.set_grad_enabled(backward):
            loss = F.cross_entropy(fused(x), y)
            if backward:
                loss.backward()
    finally:
        for h in hooks:
            h.remove()
    return layers


def _act(u, act):
    return F.leaky_relu(u, SLOPE) if act == "leaky_relu" else u


def closed_form(layer: Layer, x, r, dz, gamma, beta) -> dict:
    """The layer's gradients in float64 from the textbook formulas (no autograd)."""
    x, dz, gamma, beta = x.double(), dz.double(), gamma.double(), beta.double()
    dims = [d for d in range(x.dim()) if d != 1]
    shape = [1, -1] + [1] * (x.dim() - 2)
    mean = x.mean(dims, keepdim=True)
    istd = (x.var(dims, unbiased=False, keepdim=True) + EPS).rsqrt()
    xhat = (x - mean) * istd
    u = gamma.view(shape) * xhat + beta.view(shape)
    if r is not None:
        u = u + r.double()
    dy = dz if layer.act == "identity" else torch.where(u >= 0, dz, dz * SLOPE)
    dw, db = (dy * xhat).sum(dims), dy.sum(dims)
    m_dy, m_dyx = dy.mean(dims, keepdim=True), (dy * xhat).mean(dims, keepdim=True)
    dx = gamma.view(shape) * istd * (dy - m_dy - xhat * m_dyx)
    return dict(dweight=dw, dbias=db, dx=dx)


def _in_place(kind: str, fused: bool, act: str) -> bool:
    """Whether `kind` runs the layer as InPlaceABN (else as nn.BatchNorm2d, + r, act):
    convert_model(fuse_residual=False) leaves BN -> add -> act and a shortcut's BN (no
    activation) as BN. kind_grads builds the layer from it and layer_rows reuses the torch
    kind's gradients where it is False, so both must agree."""
    return kind == "iabn_fused" or (kind == "iabn" and not fused and act != "identity")


def kind_grads(kind: str, layer: Layer, x, r, dz, gamma, beta, dtype) -> dict:
    """One kind's gradients of one layer, fed x, r, dz in the activation dtype and float32
    parameters (float64 ones for a float64 activation), as autocast hands them over."""
    from iabn.torch import InPlaceABN

    pdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    xl = x.clone().requires_grad_(True)
    rl = None if r is None else r.clone().requires_grad_(True)
    with _autocast(x.device, dtype):
        if _in_place(kind, r is not None, layer.act):
            m = InPlaceABN(x.shape[1], eps=EPS, activation=layer.act, activation_param=SLOPE)
            m = m.to(device=x.device, dtype=pdt)
            with torch.no_grad():
                m.weight.copy_(gamma - EPS)  # >= 0: d|w|/dw = +1, dweight is dgamma
                m.bias.copy_(beta)
            z = m(xl.clone(), residual=rl)
        else:
            m = nn.BatchNorm2d(x.shape[1], eps=EPS).to(device=x.device, dtype=pdt)
            with torch.no_grad():
                m.weight.copy_(gamma)
                m.bias.copy_(beta)
            u = m(xl)
            z = _act(u if rl is None else u + rl, layer.act)
    z.backward(dz)
    return dict(dweight=m.weight.grad, dbias=m.bias.grad, dx=xl.grad)


def rel_err(a, ref) -> float:
    a, ref = a.double(), ref.double()
    den = ref.norm().item()
    num = (a - ref).norm().item()
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


def _loss_scale(dz) -> float:
    """A power of two that brings max |dz| into [1, 2): the loss scaling float16 training
    uses (GradScaler), here per layer. Unscaled, this batch's gradients fall below float16's
    normal range and every kind's error would be underflow; a power of two changes no
    float64 relative error."""
    top = dz.abs().max().item()
    return 2.0 ** -math.floor(math.log2(top)) if top > 0 else 1.0


def layer_rows(init: str, layers: list[Layer], device) -> list[dict]:
    rows = []
    for lay in layers:
        fused = lay.r is not None
        rr = lay.ratio if fused else (None, None)
        for dname, dtype in (("float64", torch.float64), *DTYPES16.items()):
            pdt = torch.float64 if dtype == torch.float64 else torch.float32
            x, dz = lay.x.to(device, dtype), (lay.dz * _loss_scale(lay.dz)).to(device, dtype)
            r = None if lay.r is None else lay.r.to(device, dtype)
            gamma, beta = lay.gamma.to(device, pdt), lay.beta.to(device, pdt)
            ref = closed_form(lay, x, r, dz, gamma, beta)
            done = {}
            for kind in KINDS:
                if not _in_place(kind, fused, lay.act) and "torch" in done:
                    g = done["torch"]  # the same torch layer: no need to run it twice
                else:
                    g = kind_grads(kind, lay, x, r, dz, gamma, beta, dtype)
                done[kind] = g
                rows.append(dict(init=init, layer=lay.name, fused=fused, channels=x.shape[1],
                                 elements=x.numel(), kind=kind, dtype=dname,
                                 ratio_rms=rr[0], ratio_max_channel=rr[1],
                                 **{k: rel_err(g[k], ref[k]) for k in GRADS}))
    return rows


def training_rows(s: Sizes, device, zero_init_last: bool, dtypes=("float32", "bfloat16",
                                                                  "float16")) -> list[dict]:
    """Loss per step of the same small ResNet-50 (one seed, one fixed batch) as torch BN,
    iabn and iabn_fused, in each dtype (16-bit: autocast)."""
    base = resnet50(s.train_width, s.classes, zero_init_last, seed=2)
    x, y = batch(s, s.train_batch, s.train_image, device, seed=3)
    # Each kind's untrained model, converted once: conversion depends on the kind alone and
    # draws no random numbers, so a deep copy per dtype starts from the same weights as a
    # conversion per dtype would (train() moves and updates the copy, never these).
    start_of = {kind: base if kind == "torch" else convert(base, kind == "iabn_fused")
                for kind in KINDS}
    rows = []
    for dname in dtypes:
        dtype = getattr(torch, dname)
        for kind in KINDS:
            model = copy.deepcopy(start_of[kind])
            losses: list[float] = []
            start = time.perf_counter()
            train(model.to(device), x, y, s.train_steps, s.lr, dtype, losses)
            seconds = time.perf_counter() - start
            rows += [dict(init="zero_init_last" if zero_init_last else "standard", dtype=dname,
                          kind=kind, step=i, loss=v, seconds=seconds)
                     for i, v in enumerate(losses)]
    return rows


def residual_rows(init: str, stage: str, layers: list[Layer]) -> list[dict]:
    # convert_model's own measure of a small output scale, so min_scale is what it warns on
    from iabn.torch_convert_precision import output_scale

    rows = []
    for lay in layers:
        if lay.r is not None:
            rms, worst = lay.ratio
            scale = output_scale(lay.gamma, lay.beta)
            rows.append(dict(init=init, stage=stage, layer=lay.name, ratio_rms=rms,
                             ratio_max_channel=worst, min_scale=scale.min().item()))
    return rows


def precision_data(settings: Settings, device: str = "cpu", progress=lambda s: None) -> dict:
    s = sizes(settings, device)
    data = dict(sizes=s, device=device, residuals=[], layers=[], training=[])
    for zero in (False, True):
        init = "zero_init_last" if zero else "standard"
        start = time.perf_counter()
        model = resnet50(s.width, s.classes, zero).to(device)
        x, y = batch(s, s.batch, s.image, device)
        with torch.no_grad():
            data["residuals"] += residual_rows(init, "init", capture(convert(model, True), x, y,
                                                                    backward=False))
        train_as_converted(model, x, y, s.steps, s.lr)
        layers = capture(convert(model.double(), True), x.double(), y, backward=True)
        data["residuals"] += residual_rows(init, f"after {s.steps} steps", layers)
        data["layers"] += layer_rows(init, layers, device)
        if init in s.train_inits:
            data["training"] += training_rows(s, device, zero)
        progress(f"[precision] {init}: {time.perf_counter() - start:.0f} s")
    return data


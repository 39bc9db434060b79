"""ResNet-50-style and DeepLab-style networks whose BN+activation is pluggable.

`norm(c, activation)` builds one BN layer with its activation ("leaky_relu" or "identity"):
  standard: nn.BatchNorm2d followed by an in-place nn.LeakyReLU, the fair baseline (an
            in-place activation adds no buffer of its own; what remains is BN's saved input)
  iabn:     iabn.torch.InPlaceABN, which saves only its output
Everything else (convs, pooling, the residual adds) is identical between the two.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .cases import SLOPE, NetSetup


def standard_norm(c: int, activation: str) -> nn.Module:
    bn = nn.BatchNorm2d(c)
    if activation == "identity":
        return bn
    return nn.Sequential(bn, nn.LeakyReLU(SLOPE, inplace=True))


def iabn_norm(c: int, activation: str) -> nn.Module:
    from iabn.torch import InPlaceABN

    return InPlaceABN(c, activation=activation, activation_param=SLOPE)


NORMS = {"standard": standard_norm, "iabn": iabn_norm}


def _conv(cin, cout, k, stride=1, dilation=1):
    return nn.Conv2d(cin, cout, k, stride, padding=dilation * (k // 2), dilation=dilation,
                     bias=False)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride) -> 1x1 with BN+act after the first two and BN (identity) after the
    last, then residual add and an in-place LeakyReLU, as in ResNet-50 v1.5."""

    def __init__(self, cin, mid, cout, stride, norm):
        super().__init__()
        self.conv1, self.bn1 = _conv(cin, mid, 1), norm(mid, "leaky_relu")
        self.conv2, self.bn2 = _conv(mid, mid, 3, stride), norm(mid, "leaky_relu")
        self.conv3, self.bn3 = _conv(mid, cout, 1), norm(cout, "identity")
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(_conv(cin, cout, 1, stride), norm(cout, "identity"))

    def forward(self, x):
        out = self.bn3(self.conv3(self.bn2(self.conv2(self.bn1(self.conv1(x))))))
        shortcut = x if self.down is None else self.down(x)
        return F.leaky_relu(out + shortcut, SLOPE, inplace=True)


class ResNet50(nn.Module):
    """ResNet-50 (blocks 3-4-6-3, expansion 4) with base width `width` (64 = the real one)."""

    def __init__(self, norm, width=64, classes=1000):
        super().__init__()
        self.stem = nn.Sequential(_conv(3, width, 7, 2), norm(width, "leaky_relu"),
                                  nn.MaxPool2d(3, 2, 1))
        layers, cin = [], width
        for i, blocks in enumerate((3, 4, 6, 3)):
            mid = width * 2 ** i
            for j in range(blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                layers.append(Bottleneck(cin, mid, mid * 4, stride, norm))
                cin = mid * 4
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class DeepLabHead(nn.Module):
    """DeepLabv3-style ASPP head on an output-stride-8 feature map: a 1x1 branch and three
    dilated 3x3 branches (rates 12, 24, 36 for OS 8), concatenation, 1x1 projection, a 3x3
    conv, a classifier, and x8 bilinear upsampling to the crop size.

    The image-pooling branch is left out: BN over a 1x1 map is undefined at batch size 1,
    and its activation is a few values per sample either way.
    """

    def __init__(self, norm, cin=2048, mid=256, classes=19, rates=(12, 24, 36)):
        super().__init__()
        mid = max(8, min(mid, cin // 2))
        self.branches = nn.ModuleList(
            [nn.Sequential(_conv(cin, mid, 1), norm(mid, "leaky_relu"))]
            + [nn.Sequential(_conv(cin, mid, 3, dilation=r), norm(mid, "leaky_relu"))
               for r in rates])
        self.project = nn.Sequential(_conv(mid * (1 + len(rates)), mid, 1),
                                     norm(mid, "leaky_relu"),
                                     _conv(mid, mid, 3), norm(mid, "leaky_relu"))
        self.classifier = nn.Conv2d(mid, classes, 1)

    def forward(self, feats):
        x = torch.cat([b(feats) for b in self.branches], dim=1)
        x = self.classifier(self.project(x))
        return F.interpolate(x, scale_factor=8, mode="bilinear", align_corners=False)


def build(setup: NetSetup, kind: str, device) -> nn.Module:
    """The network of `setup` with `kind` ('standard' or 'iabn') BN layers, in train mode."""
    torch.manual_seed(0)  # same conv weights for both kinds
    norm = NORMS[kind]
    if setup.net == "resnet50":
        model = ResNet50(norm, setup.width, setup.classes)
    elif setup.net == "deeplab_head":
        model = DeepLabHead(norm, cin=setup.width, classes=setup.classes)
    else:
        raise ValueError(f"unknown network {setup.net!r}")
    return model.to(device).train()


def batch(setup: NetSetup, n: int, device, seed: int = 0):
    """(input, target) for one training step: an image batch for ResNet, a backbone feature
    map plus per-pixel labels at 8x its size for the DeepLab head."""
    g = torch.Generator().manual_seed(seed)
    if setup.net == "resnet50":
        x = torch.randn(n, 3, setup.size, setup.size, generator=g)
        y = torch.randint(0, setup.classes, (n,), generator=g)
    else:
        x = torch.randn(n, setup.width, setup.size, setup.size, generator=g)
        y = torch.randint(0, setup.classes, (n, setup.size * 8, setup.size * 8), generator=g)
    return x.to(device), y.to(device)


def loss_of(model: nn.Module, x, y):
    return F.cross_entropy(model(x), y)

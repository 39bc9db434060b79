"""ResNet-50-style and DeepLab-style networks whose BN+activation is pluggable.

`norm(c, activation)` builds one BN layer with its activation ("leaky_relu" or "identity"):
  standard:   nn.BatchNorm2d followed by an in-place nn.LeakyReLU, the fair baseline (an
              in-place activation adds no buffer of its own; what remains is BN's saved input)
  iabn:       iabn.torch.InPlaceABN, which saves only its output; a bottleneck's last BN
              (no activation of its own) is an identity InPlaceABN before the add
  iabn_fused: the standard network run through iabn.torch.convert_model: every BN -> act and
              every BN -> add -> act (the bottleneck's end) becomes one InPlaceABN, the latter
              with the residual fused in, z = act(BN(x) + r)
Everything else (convs, pooling, the residual adds) is identical between them.
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
    """1x1 -> 3x3 (stride or dilation) -> 1x1 with BN+act after the first two and BN (identity)
    after the last, then residual add and an in-place LeakyReLU, as in ResNet-50 v1.5."""

    def __init__(self, cin, mid, cout, stride, norm, dilation=1):
        super().__init__()
        self.conv1, self.bn1 = _conv(cin, mid, 1), norm(mid, "leaky_relu")
        self.conv2, self.bn2 = _conv(mid, mid, 3, stride, dilation), norm(mid, "leaky_relu")
        self.conv3, self.bn3 = _conv(mid, cout, 1), norm(cout, "identity")
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(_conv(cin, cout, 1, stride), norm(cout, "identity"))

    def forward(self, x):
        out = self.bn3(self.conv3(self.bn2(self.conv2(self.bn1(self.conv1(x))))))
        shortcut = x if self.down is None else self.down(x)
        return F.leaky_relu(out + shortcut, SLOPE, inplace=True)


class ResNet50(nn.Module):
    """ResNet-50 (blocks 3-4-6-3, expansion 4) with base width `width` (64 = the real one).
    dilated=True replaces the strides of the last two stages by dilation (output stride 8,
    the DeepLabV3 backbone)."""

    def __init__(self, norm, width=64, classes=1000, dilated=False):
        super().__init__()
        self.stem = nn.Sequential(_conv(3, width, 7, 2), norm(width, "leaky_relu"),
                                  nn.MaxPool2d(3, 2, 1))
        layers, cin, dilation = [], width, 1
        for i, blocks in enumerate((3, 4, 6, 3)):
            mid = width * 2 ** i
            for j in range(blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                if dilated and i >= 2 and j == 0:
                    dilation, stride = dilation * 2, 1
                layers.append(Bottleneck(cin, mid, mid * 4, stride, norm, dilation))
                cin = mid * 4
        self.out_channels = cin
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


class DeepLabV3(nn.Module):
    """DeepLabV3-ResNet50: the dilated ResNet-50 (output stride 8) and the ASPP head above,
    upsampled to the image size."""

    def __init__(self, norm, width=64, classes=21):
        super().__init__()
        self.backbone = ResNet50(norm, width, dilated=True)
        del self.backbone.fc  # features only
        self.head = DeepLabHead(norm, cin=self.backbone.out_channels, classes=classes)

    def forward(self, x):
        return self.head(self.backbone.layers(self.backbone.stem(x)))


def build(setup: NetSetup, kind: str, device) -> nn.Module:
    """The network of `setup` with `kind` ('standard', 'iabn' or 'iabn_fused') BN layers, in
    train mode."""
    torch.manual_seed(0)  # same conv weights for every kind
    norm = NORMS["standard" if kind == "iabn_fused" else kind]
    if setup.net == "resnet50":
        model = ResNet50(norm, setup.width, setup.classes)
    elif setup.net == "deeplab_head":
        model = DeepLabHead(norm, cin=setup.width, classes=setup.classes)
    elif setup.net == "deeplabv3_resnet50":
        model = DeepLabV3(norm, setup.width, setup.classes)
    else:
        raise ValueError(f"unknown network {setup.net!r}")
    if kind == "iabn_fused":
        from iabn.torch import convert_model

        model = convert_model(model)  # converts every BN here; it warns if one is left
    return model.to(device).train()


def batch(setup: NetSetup, n: int, device, seed: int = 0):
    """(input, target) for one training step: an image batch for ResNet (class labels) and
    DeepLabV3 (per-pixel labels), a backbone feature map plus per-pixel labels at 8x its size
    for the DeepLab head."""
    g = torch.Generator().manual_seed(seed)
    if setup.net == "resnet50":
        x = torch.randn(n, 3, setup.size, setup.size, generator=g)
        y = torch.randint(0, setup.classes, (n,), generator=g)
    elif setup.net == "deeplabv3_resnet50":
        x = torch.randn(n, 3, setup.size, setup.size, generator=g)
        y = torch.randint(0, setup.classes, (n, setup.size, setup.size), generator=g)
    else:
        x = torch.randn(n, setup.width, setup.size, setup.size, generator=g)
        y = torch.randint(0, setup.classes, (n, setup.size * 8, setup.size * 8), generator=g)
    return x.to(device), y.to(device)


def loss_of(model: nn.Module, x, y):
    return F.cross_entropy(model(x), y)

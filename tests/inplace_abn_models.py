"""Models written the way the official inplace_abn package's scripts write them, for
tests/test_inplace_abn_compat.py: blocks take a `norm_act` factory (a class or a partial),
import ABN from `inplace_abn` at module level, switch a norm to identity by setting its
`activation` attribute after construction, and find norms with isinstance(m, ABN).

Importing this module needs `inplace_abn`, i.e. iabn.torch.register_inplace_abn() first.
The code is this project's own (small versions of the same architectures), not the scripts'.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from inplace_abn import ABN


def conv(cin, cout, k, stride=1, dilation=1, groups=1):
    return nn.Conv2d(cin, cout, k, stride=stride, padding=dilation * (k // 2), bias=False,
                     dilation=dilation, groups=groups)


class IdentityResidualBlock(nn.Module):
    """Pre-activation block: norm_act -> conv ... -> conv, plus the shortcut. With three
    channel counts it is a (grouped, ResNeXt-style) bottleneck."""

    def __init__(self, in_channels, channels, stride=1, dilation=1, groups=1, norm_act=ABN):
        super().__init__()
        self.bn1 = norm_act(in_channels)
        if len(channels) == 2:
            layers = [("conv1", conv(in_channels, channels[0], 3, stride, dilation)),
                      ("bn2", norm_act(channels[0])),
                      ("conv2", conv(channels[0], channels[1], 3, 1, dilation))]
        else:
            layers = [("conv1", conv(in_channels, channels[0], 1, stride)),
                      ("bn2", norm_act(channels[0])),
                      ("conv2", conv(channels[0], channels[1], 3, 1, dilation, groups)),
                      ("bn3", norm_act(channels[1])),
                      ("conv3", conv(channels[1], channels[2], 1))]
        self.convs = nn.Sequential(OrderedDict(layers))
        if stride != 1 or in_channels != channels[-1]:
            self.proj_conv = conv(in_channels, channels[-1], 1, stride)

    def forward(self, x):
        if hasattr(self, "proj_conv"):
            pre = self.bn1(x)  # may overwrite x: the projection reads the normalised input
            shortcut = self.proj_conv(pre)
        else:
            shortcut = x.clone()  # bn1 may work in place, and the shortcut needs x itself
            pre = self.bn1(x)
        out = self.convs(pre)
        out.add_(shortcut)
        return out


class ResidualBlock(nn.Module):
    """Post-activation bottleneck: conv -> norm_act, three times, the last norm without
    activation (and zero-initialised with zero_init_last, as timm does), then the sum goes
    through the first norm's activation."""

    def __init__(self, in_channels, channels, stride=1, groups=1, norm_act=ABN,
                 zero_init_last=False):
        super().__init__()
        bn3 = norm_act(channels[2])
        bn3.activation = "identity"
        self.convs = nn.Sequential(OrderedDict([
            ("conv1", conv(in_channels, channels[0], 1)), ("bn1", norm_act(channels[0])),
            ("conv2", conv(channels[0], channels[1], 3, stride, groups=groups)),
            ("bn2", norm_act(channels[1])),
            ("conv3", conv(channels[1], channels[2], 1)), ("bn3", bn3)]))
        if stride != 1 or in_channels != channels[-1]:
            self.proj_conv = conv(in_channels, channels[-1], 1, stride)
            self.proj_bn = norm_act(channels[-1])
            self.proj_bn.activation = "identity"
        if zero_init_last:
            nn.init.zeros_(bn3.weight)

    def forward(self, x):
        residual = self.proj_bn(self.proj_conv(x)) if hasattr(self, "proj_conv") else x
        out = self.convs(x) + residual
        bn1 = self.convs.bn1
        if bn1.activation == "leaky_relu":
            return F.leaky_relu(out, bn1.activation_param, inplace=True)
        if bn1.activation == "elu":
            return F.elu(out, bn1.activation_param, inplace=True)
        return out


class DenseModule(nn.Module):
    """DenseNet block: each layer sees the concatenation of all previous outputs and adds
    `growth` channels (norm_act -> 1x1 bottleneck -> norm_act -> 3x3)."""

    def __init__(self, in_channels, growth, layers, bottleneck_factor=2, norm_act=ABN):
        super().__init__()
        self.out_channels = in_channels + growth * layers
        width = growth * bottleneck_factor
        self.layers = nn.ModuleList()
        for i in range(layers):
            c = in_channels + i * growth
            self.layers.append(nn.Sequential(OrderedDict([
                ("bn1", norm_act(c)), ("conv1", conv(c, width, 1)),
                ("bn3", norm_act(width)), ("conv3", conv(width, growth, 3))])))

    def forward(self, x):
        features = [x]
        for layer in self.layers:
            # a fresh concatenation per layer: an in-place norm may overwrite it
            features.append(layer(torch.cat(features, dim=1)))
        return torch.cat(features, dim=1)


class DeeplabV3(nn.Module):
    """DeepLabV3 head: parallel 1x1 and dilated 3x3 convolutions, one norm_act over their
    concatenation, plus an image-pooling branch added after the reduction."""

    def __init__(self, in_channels, out_channels, hidden_channels=8, dilations=(1, 2, 3),
                 norm_act=ABN):
        super().__init__()
        self.map_convs = nn.ModuleList([conv(in_channels, hidden_channels, 1)] + [
            conv(in_channels, hidden_channels, 3, dilation=d) for d in dilations])
        self.map_bn = norm_act(hidden_channels * (len(dilations) + 1))
        self.pool_conv = conv(in_channels, hidden_channels, 1)
        self.pool_bn = norm_act(hidden_channels)
        self.red_conv = conv(hidden_channels * (len(dilations) + 1), out_channels, 1)
        self.pool_red_conv = conv(hidden_channels, out_channels, 1)
        self.red_bn = norm_act(out_channels)
        self.red_bn.activation = "identity"
        for m in self.modules():
            if isinstance(m, ABN):  # only the inplace_abn norms; other norms keep theirs
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def forward(self, x):
        out = self.red_conv(self.map_bn(torch.cat([m(x) for m in self.map_convs], dim=1)))
        pool = x.mean(dim=(2, 3), keepdim=True)
        pool = self.pool_red_conv(self.pool_bn(self.pool_conv(pool)))
        out += pool  # broadcast over the map, in place on the reduction's fresh output
        return self.red_bn(out)


class Net(nn.Module):
    """stem conv -> body -> head, the body built from the blocks above."""

    def __init__(self, kind, norm_act, classes=5):
        super().__init__()
        self.stem = conv(3, 8, 3)
        if kind == "preact_resnet":
            self.body = nn.Sequential(
                IdentityResidualBlock(8, [8, 8], norm_act=norm_act),
                IdentityResidualBlock(8, [8, 16], stride=2, norm_act=norm_act),
                IdentityResidualBlock(16, [8, 8, 16], groups=2, norm_act=norm_act),
                norm_act(16))
            width = 16
        elif kind == "resnext_zero_init_last":
            self.body = nn.Sequential(
                norm_act(8),
                ResidualBlock(8, [8, 8, 16], stride=2, groups=2, norm_act=norm_act,
                              zero_init_last=True),
                ResidualBlock(16, [8, 8, 16], groups=4, norm_act=norm_act,
                              zero_init_last=True))
            width = 16
        elif kind == "densenet":
            dense = DenseModule(8, growth=4, layers=3, norm_act=norm_act)
            self.body = nn.Sequential(dense, norm_act(dense.out_channels))
            width = dense.out_channels
        elif kind == "deeplabv3":
            # (no norm_act right before a pre-activation block: its bn1 would overwrite the
            # output that an in-place norm keeps for backward)
            self.body = nn.Sequential(
                IdentityResidualBlock(8, [8, 8], dilation=2, norm_act=norm_act),
                DeeplabV3(8, classes, norm_act=norm_act))
            width = None  # the head's output is the (N, classes, H, W) prediction
        else:
            raise ValueError(kind)
        self.dense_output = width is None
        if not self.dense_output:
            self.classifier = nn.Linear(width, classes)

    def forward(self, x):
        out = self.body(self.stem(x))
        if self.dense_output:
            return out
        return self.classifier(out.mean(dim=(2, 3)))


KINDS = ("preact_resnet", "resnext_zero_init_last", "densenet", "deeplabv3")

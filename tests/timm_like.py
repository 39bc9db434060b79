"""Blocks written the way timm writes them (timm does not import beside this torch): the
ResNet Bottleneck with its placeholders (drop_block = nn.Identity, aa = nn.Identity, optional
DropPath before `x += shortcut`) and zero_init_last (bn3's scale starts at 0), the DropPath
module (stochastic depth), and the BatchNormAct2d norm+act module with its `drop` slot.
Own code mirroring timm's structure and call order; the real timm test is optional."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DropPath(nn.Module):
    """Stochastic depth per sample, as timm's DropPath: drops whole samples in training, the
    identity in eval or with drop_prob 0. The Python branch on self.training is why the
    converter must keep it a call node."""

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True):
        super().__init__()
        self.drop_prob, self.scale_by_keep = drop_prob, scale_by_keep

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * (mask / keep if self.scale_by_keep else mask)


class BatchNormAct2d(nn.BatchNorm2d):
    """BN with its activation inside and a `drop` slot between them, as timm's norm+act."""

    def __init__(self, c, act_layer=nn.ReLU, apply_act=True, drop_layer=None):
        super().__init__(c)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = act_layer(inplace=True) if apply_act else nn.Identity()

    def forward(self, x):
        if self.training:
            self.num_batches_tracked.add_(1)
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, self.momentum, self.eps)
        return self.act(self.drop(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, act_layer=nn.ReLU,
                 drop_block=None, drop_path=None, mid_drop=None):
        super().__init__()
        width = planes
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.act1 = act_layer(inplace=True)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        # timm: drop_block() if drop_block is not None else nn.Identity()
        self.drop_block = drop_block() if drop_block is not None else nn.Identity()
        self.act2 = act_layer(inplace=True)
        self.aa = nn.Identity()  # anti-aliasing placeholder
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.se = None
        self.mid_drop = mid_drop() if mid_drop is not None else None  # test-only extra slot
        self.act3 = act_layer(inplace=True)
        self.downsample = downsample
        self.drop_path = drop_path

    def zero_init_last(self):
        nn.init.zeros_(self.bn3.weight)

    def forward(self, x):
        shortcut = x
        x = self.conv1(x)
        x = self.bn1(x)
        if self.mid_drop is not None:
            x = self.mid_drop(x)
        x = self.act1(x)
        x = self.conv2(x)
        x = self.bn2(x)
        x = self.drop_block(x)
        x = self.act2(x)
        x = self.aa(x)
        x = self.conv3(x)
        x = self.bn3(x)
        if self.se is not None:
            x = self.se(x)
        if self.drop_path is not None:
            x = self.drop_path(x)
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        x += shortcut
        x = self.act3(x)
        return x


class ResNet(nn.Module):
    """timm's ResNet layout: stem conv1/bn1/act1/maxpool, four stages, global pool, fc;
    zero_init_last=True (timm's default) zeroes every bn3 weight."""

    def __init__(self, layers=(3, 4, 6, 3), width=8, act_layer=nn.ReLU, drop_path_rate=0.0,
                 zero_init_last=True, num_classes=10, **block_kw):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.act1 = act_layer(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes, stages = width, []
        for i, n in enumerate(layers):
            planes, blocks = width * 2 ** i, []
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                down = None
                if stride != 1 or inplanes != planes * 4:
                    down = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False),
                                         nn.BatchNorm2d(planes * 4))
                dp = DropPath(drop_path_rate) if drop_path_rate > 0 else None
                blocks.append(Bottleneck(inplanes, planes, stride, down, act_layer,
                                         drop_path=dp, **block_kw))
                inplanes = planes * 4
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        if zero_init_last:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    m.zero_init_last()

    def forward(self, x):
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.global_pool(x), 1))

"""Torchvision-style ResNet / ResNeXt / Wide-ResNet and DeepLabV3 / FCN heads, written in the
style of torchvision's own code (BN and activation are attributes called in forward, one ReLU
module shared by several calls, `out += identity`), since torchvision does not import here.
`act` builds the activation module, so the same code gives the ReLU and LeakyReLU versions."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv3x3(cin, cout, stride=1, groups=1, dilation=1):
    return nn.Conv2d(cin, cout, 3, stride, padding=dilation, groups=groups, bias=False,
                     dilation=dilation)


def conv1x1(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 1, stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64,
                 dilation=1, act=None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = act()
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64,
                 dilation=1, act=None):
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride, groups, dilation)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = act()
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        out = self.relu(out)
        out = self.conv3(out)
        out = self.bn3(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class ResNet(nn.Module):
    def __init__(self, block, layers, num_classes=10, groups=1, width_per_group=64, width=8,
                 replace_stride_with_dilation=(False, False, False), act=None):
        super().__init__()
        self.act = act
        self.inplanes, self.dilation = width, 1
        self.groups, self.base_width = groups, width_per_group
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = act()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, width, layers[0])
        dil = replace_stride_with_dilation
        self.layer2 = self._make_layer(block, width * 2, layers[1], 2, dil[0])
        self.layer3 = self._make_layer(block, width * 4, layers[2], 2, dil[1])
        self.layer4 = self._make_layer(block, width * 8, layers[3], 2, dil[2])
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 8 * block.expansion, num_classes)

    def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
        downsample = None
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample, self.groups, self.base_width,
                        previous_dilation, act=self.act)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, groups=self.groups,
                                base_width=self.base_width, dilation=self.dilation, act=self.act))
        return nn.Sequential(*layers)

    def features(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x):
        x = self.features(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


class ASPPConv(nn.Sequential):
    def __init__(self, cin, cout, dilation, act):
        super().__init__(nn.Conv2d(cin, cout, 3, padding=dilation, dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), act())


class ASPPPooling(nn.Sequential):
    def __init__(self, cin, cout, act):
        super().__init__(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, cout, 1, bias=False),
                         nn.BatchNorm2d(cout), act())

    def forward(self, x):
        size = x.shape[-2:]
        for mod in self:
            x = mod(x)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    def __init__(self, cin, rates, cout, act):
        super().__init__()
        mods = [nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), act())]
        mods += [ASPPConv(cin, cout, r, act) for r in rates]
        mods.append(ASPPPooling(cin, cout, act))
        self.convs = nn.ModuleList(mods)
        self.project = nn.Sequential(nn.Conv2d(len(self.convs) * cout, cout, 1, bias=False),
                                     nn.BatchNorm2d(cout), act(), nn.Dropout(0.0))

    def forward(self, x):
        return self.project(torch.cat([conv(x) for conv in self.convs], dim=1))


class DeepLabHead(nn.Sequential):
    def __init__(self, cin, classes, act, rates=(12, 24, 36), mid=16):
        super().__init__(ASPP(cin, rates, mid, act), nn.Conv2d(mid, mid, 3, padding=1, bias=False),
                         nn.BatchNorm2d(mid), act(), nn.Conv2d(mid, classes, 1))


class FCNHead(nn.Sequential):
    def __init__(self, cin, classes, act):
        inter = cin // 4
        super().__init__(nn.Conv2d(cin, inter, 3, padding=1, bias=False), nn.BatchNorm2d(inter),
                         act(), nn.Dropout(0.0), nn.Conv2d(inter, classes, 1))


class Segmenter(nn.Module):
    """backbone (dilated ResNet, output stride 8) -> head -> upsampling, like torchvision's
    _SimpleSegmentationModel."""

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone, self.classifier = backbone, head

    def forward(self, x):
        size = x.shape[-2:]
        out = self.classifier(self.backbone.features(x))
        return F.interpolate(out, size=size, mode="bilinear", align_corners=False)


def resnet(kind: str, act, **kw) -> ResNet:
    specs = {"resnet18": (BasicBlock, (2, 2, 2, 2), {}),
             "resnet50": (Bottleneck, (3, 4, 6, 3), {}),
             "resnext": (Bottleneck, (1, 1, 1, 1), dict(groups=4, width_per_group=16)),
             "wide": (Bottleneck, (1, 1, 1, 1), dict(width_per_group=128))}
    block, layers, extra = specs[kind]
    return ResNet(block, layers, act=act, **extra, **kw)


def deeplabv3(act, width=8, classes=5) -> Segmenter:
    bb = resnet("resnet50", act, width=width,
                replace_stride_with_dilation=(False, True, True))
    return Segmenter(bb, DeepLabHead(width * 32, classes, act))


def fcn(act, width=8, classes=5) -> Segmenter:
    bb = resnet("resnet18", act, width=width, replace_stride_with_dilation=(False, True, True))
    return Segmenter(bb, FCNHead(width * 8, classes, act))

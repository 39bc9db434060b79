"""The one setup factory every benchmark draws from: shapes, dtypes, layouts and inputs.

Speed, memory and count runs all take their sizes from `Settings`, so `--tiny` shrinks every
part at once and a number in one table is always comparable with the same label in another.
"""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

# Activation and hyper-parameters shared by iabn and every baseline (the official package's
# defaults), so a correctness check compares like with like.
ACTIVATION = "leaky_relu"
SLOPE = 0.01
EPS = 1e-5
MOMENTUM = 0.1

# (C, H=W) of the BatchNorm layers of ResNet-50 (torchvision v1.5 layout: the stride sits in
# the 3x3 conv, so each stage's first 1x1 conv still runs at the previous resolution).
RESNET50_BN = ((64, 112), (64, 56), (256, 56), (128, 56), (128, 28), (512, 28), (256, 28),
               (256, 14), (1024, 14), (512, 14), (512, 7), (2048, 7))
# Segmentation-sized BN inputs: a DeepLab ASPP at output stride 8 on a 512x512 crop (64x64),
# and a decoder at stride 4 (128x128).
SEGMENTATION_BN = ((8, 256, 64), (8, 2048, 64), (4, 256, 128))

DTYPES = ("float32", "float16", "bfloat16")
LAYOUTS = ("nchw", "channels_last")


@dataclass(frozen=True)
class BNCase:
    """One BatchNorm+activation input: x of shape (n, c, h, w) in `dtype` and `layout`;
    parameters are float32 (what autocast produces for 16-bit activations)."""

    family: str  # "resnet50" or "segmentation"
    n: int
    c: int
    h: int
    w: int
    dtype: str = "float32"
    layout: str = "nchw"

    @property
    def shape(self) -> tuple:
        return (self.n, self.c, self.h, self.w)

    @property
    def numel(self) -> int:
        return self.n * self.c * self.h * self.w

    @property
    def label(self) -> str:
        lay = "cl" if self.layout == "channels_last" else "nchw"
        return f"{self.n}x{self.c}x{self.h}x{self.w}-{self.dtype}-{lay}"


@dataclass(frozen=True)
class NetSetup:
    """A network and the batch sizes to measure it at. `size` is the input's H=W: the image
    for ResNet, the backbone feature map (output stride 8) for the DeepLab head."""

    net: str  # "resnet50", "deeplab_head" or "deeplabv3_resnet50"
    size: int
    width: int  # ResNet base width (64 = ResNet-50) or the head's input channels
    batches: tuple
    classes: int = 1000


@dataclass(frozen=True)
class Settings:
    tiny: bool = False
    cpu_only: bool = False
    compile: bool = True  # include the torch.compile baseline (slow to compile per shape)
    memory_budget_gib: float = 16.0
    seed: int = 0
    # time.monotonic() by which a budgeted part stops starting new measurements (--time-budget;
    # None = no limit). Parts then report what they left out rather than being killed.
    deadline: float | None = None

    def time_left(self) -> float:
        return math.inf if self.deadline is None else self.deadline - time.monotonic()

    # -- speed (GPU) ---------------------------------------------------------------------------
    def speed_cases(self) -> list[BNCase]:
        """ResNet-50 shapes at N=32 and N=128 in float32/NCHW; at N=32 also channels_last in
        float16 and bfloat16 (the mixed-precision training layout); segmentation shapes in
        float32/NCHW and float16/channels_last."""
        if self.tiny:
            return [BNCase("resnet50", 4, 64, 14, 14), BNCase("resnet50", 4, 256, 7, 7),
                    BNCase("resnet50", 4, 64, 14, 14, "float16", "channels_last"),
                    BNCase("segmentation", 2, 32, 16, 16, "bfloat16", "channels_last")]
        cases = [BNCase("resnet50", n, c, hw, hw) for n in (32, 128) for c, hw in RESNET50_BN]
        cases += [BNCase("resnet50", 32, c, hw, hw, dt, "channels_last")
                  for dt in ("float16", "bfloat16") for c, hw in RESNET50_BN]
        for n, c, hw in SEGMENTATION_BN:
            cases.append(BNCase("segmentation", n, c, hw, hw))
            cases.append(BNCase("segmentation", n, c, hw, hw, "float16", "channels_last"))
        return cases

    def timing(self) -> tuple[int, int]:
        """(warm-up iterations, timed iterations) per measurement."""
        return (2, 5) if self.tiny else (5, 25)

    # -- memory --------------------------------------------------------------------------------
    def net_setups(self, device: str) -> list[NetSetup]:
        """Networks for peak-memory (GPU) and saved-bytes (any device) runs. CPU sizes are cut
        down to what a CPU forward pass finishes in seconds; the saved bytes per sample
        scale with the pixel count, and the standard/iabn ratio does not depend on it."""
        if self.tiny:
            return [NetSetup("resnet50", 64, 8, (1, 2), 10),
                    NetSetup("deeplab_head", 8, 32, (1, 2), 5),
                    NetSetup("deeplabv3_resnet50", 64, 8, (1, 2), 5)]
        if device == "cpu":
            return [NetSetup("resnet50", 224, 64, (1, 2, 4)),
                    NetSetup("deeplab_head", 32, 2048, (1, 2), 19),
                    NetSetup("deeplabv3_resnet50", 256, 64, (1, 2), 21)]
        return [NetSetup("resnet50", 224, 64, (16, 32, 64, 128)),
                NetSetup("deeplab_head", 64, 2048, (2, 4, 8, 16), 19),
                NetSetup("deeplabv3_resnet50", 512, 64, (2, 4, 8, 16), 21)]

    # -- whole-network training step (GPU) ----------------------------------------------------
    def step_setups(self) -> list[NetSetup]:
        """ResNet-50 on 224x224 images and the DeepLab head on 2048x64x64 features (512x512
        crops at output stride 8), both at batch 32."""
        if self.tiny:
            return [NetSetup("resnet50", 32, 8, (2,), 10), NetSetup("deeplab_head", 4, 32, (2,), 5)]
        return [NetSetup("resnet50", 224, 64, (32,)), NetSetup("deeplab_head", 64, 2048, (32,), 19)]

    # "float16-cl": autocast float16 with channels_last tensors (mixed-precision training);
    # "float32": float32 in NCHW. The first is measured first: it is how such nets train.
    step_precisions: tuple = ("float16-cl", "float32")

    def step_timing(self) -> tuple[int, int]:
        """(warm-up steps, timed steps) per network, precision and kind."""
        return (0, 1) if self.tiny else (3, 10)

    # -- machine-independent counts ------------------------------------------------------------
    def traffic_shape(self) -> tuple:
        """Shape the emulator's byte counters run on: big enough that the O(C) per-channel
        traffic is a small slack on the per-element figure, small enough to emulate fast."""
        return (4, 16, 16, 16) if self.tiny else (8, 64, 28, 28)

    def compile_pairs(self) -> tuple[str, ...] | None:
        """Dtype pairs (iabn_core.dtypes keys) whose modules are compiled cold; None = all."""
        return ("float32_float32",) if self.tiny else None

    compile_arch: str = "sm_80"


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
            "float64": torch.float64}[name]


def bn_inputs(case: BNCase, device, seed: int = 0) -> dict:
    """Seeded inputs of one BN case: x, upstream gradient dy, float32 weight/bias/running stats.

    Weights are positive and away from 0 so iabn's gamma = |w| + eps is w + eps, and its
    inverse (backward reconstructs x-hat from z) is well conditioned.
    """
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    dt = torch_dtype(case.dtype)
    fmt = torch.channels_last if case.layout == "channels_last" else torch.contiguous_format

    def act(t):
        return t.to(device=device, dtype=dt).contiguous(memory_format=fmt)

    c = case.c
    return dict(
        x=act(torch.randn(case.shape, generator=g) * 2 + 0.5),
        dy=act(torch.randn(case.shape, generator=g)),
        w=(torch.rand(c, generator=g) + 0.5).to(device),
        b=(torch.randn(c, generator=g) * 0.1).to(device),
        rm=torch.zeros(c, device=device),
        rv=torch.ones(c, device=device),
    )


def comma_list(choices, what: str):
    """An argparse `type` for a comma-separated subset of `choices` (both CLIs' --parts/--steps);
    argparse also runs it on a string default, so the parsed value is always a list."""
    def parse(text: str) -> list[str]:
        names = [s.strip() for s in text.split(",") if s.strip()]
        bad = set(names) - set(choices)
        if bad:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {sorted(bad)}; choose from {', '.join(choices)}")
        return names
    return parse


def device_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (the results folder name)."""
    out = "".join(ch.lower() if ch.isalnum() else "-" for ch in name)
    while "--" in out:
        out = out.replace("--", "-")
    return out.strip("-") or "unknown"

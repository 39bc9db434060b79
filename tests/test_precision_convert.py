"""convert_model's 16-bit report: fused layers whose BN output scale is small (zero-initialised
last BN of a block) are listed in one warning, and nothing else is (issue 23, item 12)."""
from __future__ import annotations

import pytest
import torch

import torchvision_like as tv
from test_convert_timm import convert
from test_torch_convert import leaky
from iabn.torch_convert_precision import SMALL_SCALE


def precision_lines(msgs):
    found = [m for m in msgs if "fused the residual into" in m]
    assert len(found) <= 1
    return found[0].splitlines()[1:] if found else []


def resnet50(last_gamma=None):
    torch.manual_seed(0)
    model = tv.resnet("resnet50", leaky, width=8)
    if last_gamma is not None:
        with torch.no_grad():
            for name, m in model.named_modules():
                if name.endswith("bn3"):
                    m.weight.fill_(last_gamma)
    return model


def fused_bns(conv):
    """Names of the BNs the converted model calls with a residual."""
    return {n.target for n in conv.graph.nodes
            if n.op == "call_module" and "residual" in n.kwargs}


def test_zero_initialised_fused_layers_are_listed():
    conv, msgs = convert(resnet50(last_gamma=0.0))
    lines = precision_lines(msgs)
    fused = fused_bns(conv)
    assert len(fused) == 16 and all(name.endswith("bn3") for name in fused)
    assert sorted(ln.split(":")[0].strip() for ln in lines) == sorted(fused)
    assert "layer1.0.bn3: 32 of 32 channels, smallest scale 1e-05 (|r|/|BN(x)| ~ 1e+05" in (
        "\n".join(lines))


@pytest.mark.parametrize("gamma,listed", [(SMALL_SCALE / 2, True), (SMALL_SCALE * 2, False),
                                          (1.0, False)])
def test_small_but_positive_scales_follow_the_threshold(gamma, listed):
    _, msgs = convert(resnet50(last_gamma=gamma))
    assert bool(precision_lines(msgs)) == listed


def test_bias_counts_in_the_output_scale():
    model = resnet50(last_gamma=0.0)
    with torch.no_grad():
        for name, m in model.named_modules():
            if name.endswith("bn3"):
                m.bias.fill_(1.0)  # BN(x) ~ beta: as large as a unit residual
    _, msgs = convert(model)
    assert precision_lines(msgs) == []


def test_unfused_and_exact_conversions_do_not_warn():
    _, msgs = convert(resnet50(last_gamma=0.0), fuse_residual=False)
    assert precision_lines(msgs) == []
    # exact=True keeps the zero-initialised BNs as BN: nothing small is fused
    _, msgs = convert(resnet50(last_gamma=0.0), exact=True)
    assert precision_lines(msgs) == []


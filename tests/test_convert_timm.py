"""convert_model on timm's blocks (tests/timm_like.py mirrors; real timm when it imports):
identity placeholders and rate-0 dropouts between a BN and its activation or add are looked
past, dropouts that act in training are refused with that reason, layers with 0 <= gamma <= eps
(timm's zero_init_last) convert with the change bounded and reported, exact=True refuses
them, and a printed converted model shows no activation it no longer applies."""
from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch
from torch import nn

import iabn.torch as it
import timm_like as tm
import torchvision_like as tv
from iabn.torch import IABNConversionWarning
from test_torch_convert import SLOPE, assert_same_function, n_bn, n_iabn, randomize

leaky_layer = functools.partial(nn.LeakyReLU, SLOPE)


def timm_resnet(act_layer=nn.ReLU, layers=(3, 4, 6, 3), **kw):
    torch.manual_seed(0)
    m = randomize(tm.ResNet(layers, act_layer=act_layer, **kw))
    for b in m.modules():  # randomize set every scale; timm starts bn3 at 0
        if isinstance(b, tm.Bottleneck):
            b.zero_init_last()
    return m.double()


def convert(model, **kw):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always", IABNConversionWarning)
        out = it.convert_model(model, **kw)
    return out, [str(w.message) for w in rec if issubclass(w.category, IABNConversionWarning)]


def scales_floored(model):
    """The BN model computing exactly what InPlaceABN computes: scales <= eps raised to eps."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.clamp_(min=m.eps)
    return ref


def test_timm_resnet50_converts_every_layer_and_reports_the_change():
    orig = timm_resnet()
    conv, msgs = convert(copy.deepcopy(orig), replace_relu=SLOPE)
    assert n_bn(orig) == 53 and n_iabn(conv) == 53 and n_bn(conv) == 0
    changed = [m for m in msgs if "changed the function" in m]
    assert len(changed) == 1 and not any("left these" in m for m in msgs)
    lines = changed[0].splitlines()[1:]
    assert len(lines) == 16 and all(".bn3: " in ln for ln in lines)
    assert "layer1.0.bn3: 32 of 32 channels, by at most 1e-05*|x_hat|" in changed[0]
    # Within eps*|x_hat| of the model it was converted from, per layer: logits barely move.
    leaky = timm_resnet(leaky_layer)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    leaky.eval(), conv.eval()
    with torch.no_grad():
        y0, y1 = leaky(x.clone()), conv(x.clone())
    assert 0 < float((y1 - y0).abs().max()) < 1e-3 * float(y0.abs().max())
    # Exactly: the LeakyReLU model with every bn3 scale raised from 0 to eps.
    assert_same_function(scales_floored(leaky), conv, x, lambda y: y.square().mean(), steps=1)


def test_exact_refuses_any_change_of_function():
    orig = timm_resnet(leaky_layer, layers=(1, 1, 1, 1))
    conv, msgs = convert(copy.deepcopy(orig), exact=True)
    assert n_iabn(conv) == n_bn(orig) - 4 and n_bn(conv) == 4
    assert ("layer1.0.bn3: has 32 channels with 0 <= gamma <= eps, which InPlaceABN cannot "
            "represent exactly") in msgs[0]
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert_same_function(orig, conv, x, lambda y: y.square().mean(), steps=1)
    with pytest.raises(TypeError, match="exact must be a bool"):
        it.convert_model(orig, exact="yes")


def test_negative_gamma_is_always_refused():
    orig = timm_resnet(leaky_layer, layers=(1, 1, 1, 1))
    with torch.no_grad():
        orig.layer1[0].bn3.weight[3] = -0.5
    conv, msgs = convert(copy.deepcopy(orig))
    assert "layer1.0.bn3: has 1 channels with negative gamma (down to -0.5)" in msgs[0]
    assert type(conv.layer1[0].bn3) is nn.BatchNorm2d
    assert n_iabn(conv) == n_bn(orig) - 1


@pytest.mark.parametrize("slot", ["drop_block", "mid_drop"])
@pytest.mark.parametrize("drop", [nn.Identity, functools.partial(nn.Dropout, 0.0),
                                  functools.partial(nn.Dropout2d, 0.0),
                                  functools.partial(tm.DropPath, 0.0)])
def test_pass_through_modules_between_bn_and_activation(slot, drop):
    orig = timm_resnet(leaky_layer, layers=(1, 1, 1, 1), **{slot: drop})
    conv, msgs = convert(copy.deepcopy(orig))
    assert not any("left these" in m for m in msgs), msgs
    assert n_iabn(conv) == n_bn(orig)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert_same_function(scales_floored(orig), conv, x, lambda y: y.square().mean(), steps=1)


def test_dropout_that_acts_in_training_is_refused_with_that_reason():
    orig = timm_resnet(leaky_layer, layers=(1, 1, 1, 1),
                       drop_block=functools.partial(nn.Dropout, 0.1))
    conv, msgs = convert(copy.deepcopy(orig))
    skipped = next(m for m in msgs if "left these" in m)
    assert ("layer1.0.bn2: followed by Dropout (layer1.0.drop_block) with drop probability "
            "0.1, which zeroes values in training") in skipped
    assert "modified in place" not in skipped
    assert type(conv.layer1[0].bn2) is nn.BatchNorm2d and n_iabn(conv) == n_bn(orig) - 4


@pytest.mark.parametrize("rate", [0.0, 0.2])
def test_drop_path_before_the_residual_add(rate):
    """DropPath(0) is looked past and bn3 is fused with the add; DropPath(0.2) keeps bn3 as BN
    and still drops samples in training after conversion (it stays a call, not a traced-away
    branch), so train-mode outputs match the original under the same seed."""
    orig = timm_resnet(leaky_layer, layers=(1, 1, 1, 1), drop_path_rate=rate)
    if rate == 0.0:  # timm passes drop_path=None then; force the module in
        for b in orig.modules():
            if isinstance(b, tm.Bottleneck):
                b.drop_path = tm.DropPath(0.0)
    conv, msgs = convert(copy.deepcopy(orig))
    fused = isinstance(conv.layer1[0].bn3, it.InPlaceABN)
    assert fused == (rate == 0.0), msgs
    if rate:
        assert "layer1.0.bn3: followed by DropPath (layer1.0.drop_path) with drop probability" \
            in next(m for m in msgs if "left these" in m)
    # bn3 (gamma 0) converts only where it fuses; every other scale is > eps
    ref = (scales_floored(orig) if fused else copy.deepcopy(orig)).train()
    conv.train()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    torch.manual_seed(1)
    y0 = ref(x.clone())
    torch.manual_seed(1)
    y1 = conv(x.clone())
    torch.testing.assert_close(y1, y0)


def test_norm_act_with_zero_rate_dropout_converts():
    m = nn.Sequential(nn.Conv2d(3, 4, 1),
                      tm.BatchNormAct2d(4, leaky_layer, drop_layer=lambda: nn.Dropout(0.0)))
    conv, msgs = convert(copy.deepcopy(randomize(m)))
    assert not msgs and isinstance(conv[1], it.InPlaceABN)


def test_printed_model_shows_no_replaced_activation():
    orig = randomize(tv.resnet("resnet50", lambda: nn.LeakyReLU(SLOPE, inplace=True), width=4))
    conv, _ = convert(copy.deepcopy(orig))
    assert isinstance(conv, torch.fx.GraphModule)
    assert "LeakyReLU" in str(orig) and "LeakyReLU" not in str(conv)
    # timm-style code: the module swap replaces each activation by Identity
    conv, _ = convert(timm_resnet(), replace_relu=SLOPE)
    assert "ReLU" not in str(conv)


def test_real_timm_resnet50_converts_every_layer():
    timm = pytest.importorskip("timm", reason="timm is not installed (optional)")
    orig = timm.create_model("resnet50", pretrained=False)
    conv, msgs = convert(copy.deepcopy(orig), replace_relu=SLOPE)
    assert n_iabn(conv) == n_bn(orig) == 53, msgs
    assert "ReLU" not in str(conv)

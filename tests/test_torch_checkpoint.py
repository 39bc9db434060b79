"""Checkpoints across the BN and InPlace-ABN weight parametrisations: a pretrained BN
checkpoint loads into a converted model with one call and the same function; a converted
model's checkpoint loads into the BN model; scales InPlaceABN cannot hold are reported or
refused, never loaded silently."""
from __future__ import annotations

import copy

import pytest
import torch

import iabn.torch as it
import torchvision_like as tv
from iabn.torch import IABNConversionWarning, IABNError
from test_torch_convert import leaky, quiet_convert, randomize


def models(seed=0):
    """(BN model, converted copy, a BN checkpoint with other values: 'pretrained' weights)."""
    torch.manual_seed(seed)
    bn = randomize(tv.resnet("resnet18", leaky, width=4), seed).double()
    conv = quiet_convert(copy.deepcopy(bn))
    pretrained = randomize(copy.deepcopy(bn), seed + 1).state_dict()
    with torch.no_grad():  # negative scales too: BN allows them, |w| + eps must not see them
        pretrained["layer1.0.bn1.weight"][0] = -0.5
    return bn, conv, pretrained


def outputs(model, x):
    model.eval()
    with torch.no_grad():
        return model(x.clone())


X = torch.randn(2, 3, 32, 32, dtype=torch.float64)


def test_pretrained_bn_checkpoint_into_converted_model():
    bn, conv, pretrained = models()
    with torch.no_grad():
        pretrained["layer1.0.bn1.weight"][0] = 0.5  # negative: see the refusal test
    bn.load_state_dict(pretrained)
    plain = copy.deepcopy(conv)
    plain.load_state_dict(pretrained)  # what load_state_dict does: keys match, values do not
    assert (outputs(plain, X) - outputs(bn, X)).abs().max() > 1e-6
    res = it.load_batchnorm_state_dict(conv, pretrained)
    assert not res.missing_keys and not res.unexpected_keys
    torch.testing.assert_close(outputs(conv, X), outputs(bn, X))


def test_converted_checkpoint_into_bn_model():
    bn, conv, _ = models()
    with torch.no_grad():  # train-like values, a negative in-place weight among them
        for m in conv.modules():
            if isinstance(m, it.InPlaceABN):
                m.weight.copy_(torch.randn(m.num_features) * 0.5)
    sd = it.batchnorm_state_dict(conv)
    assert list(sd) == list(conv.state_dict())
    plain = copy.deepcopy(bn)
    plain.load_state_dict(conv.state_dict())  # "all keys matched", another function
    assert (outputs(plain, X) - outputs(conv, X)).abs().max() > 1e-6
    bn.load_state_dict(sd)
    torch.testing.assert_close(outputs(bn, X), outputs(conv, X))
    # ... the same state as revert_model's result
    rev = it.revert_model(copy.deepcopy(conv))
    for k, v in rev.state_dict().items():
        torch.testing.assert_close(sd[k], v, msg=k)


def test_negative_gamma_is_refused_and_nothing_loads():
    _, conv, pretrained = models()
    before = copy.deepcopy(conv.state_dict())
    with pytest.raises(IABNError, match=r"(?s)nothing was loaded.*layer1\.0\.bn1\.weight: 1 "
                                        r"channels with negative gamma \(down to -0\.5\)"):
        it.load_batchnorm_state_dict(conv, pretrained)
    assert all(torch.equal(v, before[k]) for k, v in conv.state_dict().items())


def test_gamma_up_to_eps_is_reported_or_refused_with_exact():
    bn, conv, pretrained = models()
    with torch.no_grad():
        pretrained["layer1.0.bn1.weight"][0] = 0.5
        pretrained["layer2.0.bn2.weight"][:3] = 0.0  # timm's zero_init_last
    with pytest.raises(IABNError, match=r"layer2\.0\.bn2\.weight: 3 channels with gamma <= eps"):
        it.load_batchnorm_state_dict(conv, pretrained, exact=True)
    with pytest.warns(IABNConversionWarning,
                      match=r"layer2\.0\.bn2\.weight: 3 of 8 channels, by at most 1e-05"):
        it.load_batchnorm_state_dict(conv, pretrained)
    with torch.no_grad():
        pretrained["layer2.0.bn2.weight"][:3] = bn.layer2[0].bn2.eps  # what was loaded
    bn.load_state_dict(pretrained)
    torch.testing.assert_close(outputs(conv, X), outputs(bn, X))


def test_strict_is_passed_on():
    _, conv, pretrained = models()
    with torch.no_grad():
        pretrained["layer1.0.bn1.weight"][0] = 0.5
    del pretrained["fc.bias"]
    with pytest.raises(RuntimeError, match="Missing key"):
        it.load_batchnorm_state_dict(conv, pretrained)
    res = it.load_batchnorm_state_dict(conv, pretrained, strict=False)
    assert res.missing_keys == ["fc.bias"]


def test_bad_arguments_name_themselves():
    _, conv, pretrained = models()
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        it.load_batchnorm_state_dict(pretrained, conv)
    with pytest.raises(TypeError, match="state_dict must be a mapping"):
        it.load_batchnorm_state_dict(conv, [1])
    with pytest.raises(TypeError, match="exact must be a bool"):
        it.load_batchnorm_state_dict(conv, pretrained, exact=1)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        it.batchnorm_state_dict(pretrained)

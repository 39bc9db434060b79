"""iabn.torch modules (drop-in for the official package) and BatchNorm conversion."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import iabn.torch as it
from iabn.torch import IABNConversionWarning, IABNError


def test_state_dict_keys_match_batchnorm():
    keys = list(nn.BatchNorm2d(4).state_dict())
    for cls in (it.ABN, it.InPlaceABN, it.InPlaceABNSync):
        assert list(cls(4).state_dict()) == keys
    m = it.InPlaceABN(4)
    m.load_state_dict(nn.BatchNorm2d(4).state_dict())


def test_loads_checkpoint_without_num_batches_tracked():
    sd = it.InPlaceABN(3).state_dict()
    del sd["num_batches_tracked"]
    sd._metadata[""]["version"] = 1  # as saved before the buffer existed
    m = it.InPlaceABN(3)
    m.load_state_dict(sd)
    assert int(m.num_batches_tracked) == 0


def test_defaults_and_extra_repr():
    m = it.InPlaceABN(5)
    assert (m.eps, m.momentum, m.affine, m.track_running_stats, m.activation,
            m.activation_param) == (1e-5, 0.1, True, True, "leaky_relu", 0.01)
    assert torch.equal(m.weight, torch.ones(5)) and torch.equal(m.bias, torch.zeros(5))
    r = repr(it.InPlaceABN(5, activation="elu", activation_param=1.0, momentum=None))
    assert r == ("InPlaceABN(5, eps=1e-05, momentum=None, affine=True, "
                 "track_running_stats=True, activation=elu[1.0])")
    assert "activation=identity)" in repr(it.ABN(2, activation="identity"))


def test_in_place_modules_refuse_non_invertible_activation():
    with pytest.raises(IABNError, match="relu.*not invertible"):
        it.InPlaceABN(3, activation="relu")
    with pytest.raises(IABNError, match="activation_param"):
        it.InPlaceABN(3, activation="leaky_relu", activation_param=0.0)
    with pytest.raises(ValueError, match="activation must be one of"):
        it.ABN(3, activation="gelu")


@pytest.mark.parametrize("shape", [(6, 4), (3, 4, 5), (2, 4, 3, 3), (2, 4, 2, 2, 3),
                                   (2, 4, 1, 2, 2, 2)])
def test_any_input_rank(shape):
    torch.manual_seed(0)
    x = torch.randn(shape)
    ref = F.leaky_relu(F.batch_norm(x, None, None, torch.ones(4) + 1e-5, torch.zeros(4),
                                    True, 0.1, 1e-5), 0.01)
    out = it.InPlaceABN(4)(x.clone())
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "elu", "identity"])
@pytest.mark.parametrize("training", [True, False])
def test_abn_is_batchnorm_plus_activation_not_in_place(activation, training):
    torch.manual_seed(0)
    m = it.ABN(4, activation=activation, activation_param=0.2).train(training)
    bn = nn.BatchNorm2d(4).train(training)
    with torch.no_grad():
        m.weight.uniform_(-1, 1)  # ABN uses weight as is, like the official package
        bn.weight.copy_(m.weight)
    act = {"relu": nn.ReLU(), "leaky_relu": nn.LeakyReLU(0.2), "elu": nn.ELU(0.2),
           "identity": nn.Identity()}[activation]
    x = torch.randn(2, 4, 3, 3)
    before = x.clone()
    torch.testing.assert_close(m(x), act(bn(x)))
    assert torch.equal(x, before)
    torch.testing.assert_close(m.running_var, bn.running_var)


def test_affine_false_and_no_running_stats():
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5)
    for train in (True, False):
        m = it.InPlaceABN(4, affine=False, track_running_stats=False).train(train)
        bn = nn.BatchNorm1d(4, affine=False, track_running_stats=False).train(train)
        assert m.weight is None and m.running_mean is None
        assert list(m.state_dict()) == list(bn.state_dict()) == []
        torch.testing.assert_close(m(x.clone()), F.leaky_relu(bn(x), 0.01))


def test_affine_false_backward():
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    leaf = x.clone().requires_grad_()
    it.InPlaceABN(4, affine=False).double()(leaf.clone()).square().sum().backward()
    xr = x.clone().requires_grad_()
    F.leaky_relu(nn.BatchNorm1d(4, affine=False).double()(xr), 0.01).square().sum().backward()
    torch.testing.assert_close(leaf.grad, xr.grad)


def test_only_weight_requires_grad():
    """x without grad: backward still delivers dweight and dbias."""
    torch.manual_seed(0)
    m = it.InPlaceABN(4)
    x = torch.randn(2, 4, 3)
    m(x.clone()).sum().backward()
    assert m.weight.grad is not None and m.bias.grad is not None


def test_sync_falls_back_with_warning():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 3, 3)
    with pytest.warns(it.SyncFallbackWarning, match="not initialised"):
        out = it.InPlaceABNSync(4)(x.clone())
    torch.testing.assert_close(out, it.InPlaceABN(4)(x.clone()))
    m = it.InPlaceABNSync(4, group=None).eval()
    with pytest.warns(it.SyncFallbackWarning):  # in eval too, as the official package does
        m(x.clone())


def test_sync_with_single_process_group_runs_locally_without_warning():
    dist = torch.distributed
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        x = torch.randn(2, 4, 3, 3)
        out = it.inplace_abn_sync(x.clone(), torch.ones(4), torch.zeros(4), None, None)
        torch.testing.assert_close(out, it.InPlaceABN(4)(x.clone()))
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------ conversion
def _random_bn(cls=nn.BatchNorm2d, c=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    bn = cls(c)
    with torch.no_grad():
        bn.weight.copy_(0.5 + torch.rand(c, generator=g))
        bn.bias.copy_(torch.randn(c, generator=g))
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(0.5 + torch.rand(c, generator=g))
        bn.num_batches_tracked.fill_(7)
    return bn


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_from_batchnorm_and_back(dtype):
    bn = _random_bn(nn.BatchNorm3d).to(dtype).eval()
    m = it.from_batchnorm(bn, "elu", 0.5)
    assert isinstance(m, it.InPlaceABN) and not m.training and m.weight.dtype == dtype
    torch.testing.assert_close(m.weight.abs() + m.eps, bn.weight)
    assert int(m.num_batches_tracked) == 7
    x = torch.randn(2, 4, 2, 3, 3, dtype=dtype)
    torch.testing.assert_close(m(x.clone()), F.elu(bn(x), 0.5))
    back = it.to_batchnorm(m)
    assert isinstance(back[0], nn.BatchNorm3d) and isinstance(back[1], nn.ELU)
    torch.testing.assert_close(back(x), F.elu(bn(x), 0.5))
    for k, v in bn.state_dict().items():
        torch.testing.assert_close(back[0].state_dict()[k], v)


def test_to_batchnorm_scripts_and_matches():
    m = it.InPlaceABN(4).eval()
    with torch.no_grad():
        m.weight.copy_(torch.tensor([0.5, -2.0, 1.0, 3.0]))
    seq = torch.jit.script(it.to_batchnorm(m))
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(seq(x), m(x.clone()))
    assert isinstance(it.to_batchnorm(it.ABN(4, activation="relu"))[1], nn.ReLU)


def test_from_batchnorm_warns_on_unrepresentable_gamma():
    bn = _random_bn()
    with torch.no_grad():
        bn.weight[1] = -0.5
        bn.weight[2] = 0.0
    with pytest.warns(IABNConversionWarning, match="2 of 4 channels"):
        m = it.from_batchnorm(bn)
    assert m.weight[1] == 0 and m.weight[2] == 0


def test_convert_model_converts_safe_pairs_and_reports_the_rest():
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(3, 4, 3), _random_bn(seed=1), nn.LeakyReLU(0.1),    # converted
                nn.Conv2d(4, 4, 3), _random_bn(seed=2), nn.ReLU(),             # not invertible
                nn.Conv2d(4, 4, 1), _random_bn(seed=3), nn.ELU(),              # converted
                nn.Conv2d(4, 4, 1), _random_bn(seed=4))                        # nothing after
            self.pre = nn.Sequential(_random_bn(nn.BatchNorm2d, 3), nn.Identity())  # model input
            self.loose = _random_bn(seed=5)                                    # input from a BN

        def forward(self, x):
            return self.loose(self.body(self.pre(x)))

    net = Net().eval()
    x = torch.randn(2, 3, 12, 12)
    expected = net(x)
    with pytest.warns(IABNConversionWarning) as rec:
        out_net = it.convert_model(net)
    assert out_net is net
    msg = str(rec[0].message)
    for reason in ("body.4: followed by ReLU", "body.10: followed by BatchNorm2d (loose), not an "
                   "activation", "pre.0: its input is the model's input",
                   "loose: its input comes from BatchNorm2d (body.10)"):
        assert reason in msg
    kinds = [type(m).__name__ for m in net.body]
    assert kinds[1:3] == ["InPlaceABN", "Identity"] and kinds[7:9] == ["InPlaceABN", "Identity"]
    assert net.body[7].activation == "elu" and net.body[1].activation_param == 0.1
    torch.testing.assert_close(net(x), expected, rtol=1e-5, atol=1e-5)

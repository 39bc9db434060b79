"""Review of the torch adapter where issues 9-12 meet: convert_model's GraphModule result,
ABN's residual, to_sync, and the eager path against the custom ops with a residual in eval."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import iabn.torch as it
import iabn.torch_ops as to
from iabn.torch import IABNConversionWarning, IABNError

C = 4


class _Block(nn.Module):
    """A residual block: its fused add makes convert_model return a GraphModule."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(C, C, 3, padding=1), nn.BatchNorm2d(C)
        self.conv2, self.bn2 = nn.Conv2d(C, C, 3, padding=1), nn.BatchNorm2d(C)

    def forward(self, x):
        out = F.leaky_relu(self.bn1(self.conv1(x)), 0.01)
        return F.leaky_relu(self.bn2(self.conv2(out)) + x, 0.01)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, C, 1), nn.BatchNorm2d(C)
        self.block, self.head = _Block(), nn.Conv2d(C, 2, 1)
        self.register_buffer("scratch", torch.zeros(1), persistent=False)
        self.num_classes = 2

    def forward(self, x):
        return self.head(self.block(F.leaky_relu(self.bn(self.stem(x)), 0.01)))


def _convert(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IABNConversionWarning)
        out = it.convert_model(model)
    assert isinstance(out, torch.fx.GraphModule)
    return out


def test_graph_module_keeps_each_submodules_mode():
    """A frozen BatchNorm (eval) inside a model being trained stays frozen: its running stats
    do not move and it normalises with them, as in the original."""
    torch.manual_seed(0)
    orig = _Net().train()
    orig.block.bn1.eval()
    conv = _convert(orig)
    assert conv.training and not conv.block.bn1.training and conv.block.bn2.training
    rm = conv.block.bn1.running_mean.clone()
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(conv(x), orig(x))
    assert torch.equal(conv.block.bn1.running_mean, rm)


def test_graph_module_keeps_state_dict_keys_hooks_and_attributes():
    orig = _Net()
    calls = []
    orig.register_forward_hook(lambda m, i, o: calls.append(o.shape))
    conv = _convert(orig)
    assert list(conv.state_dict()) == list(orig.state_dict())  # no non-persistent buffer
    conv.load_state_dict(orig.state_dict())  # strict: an original checkpoint loads
    conv(torch.randn(2, 3, 5, 5))
    assert calls == [torch.Size([2, 2, 5, 5])]
    assert conv.num_classes == orig.num_classes


@pytest.mark.parametrize("residual", [torch.randn(2, C, 5, 5), torch.randn(C, 1, 1), 1.0],
                         ids=["shape", "broadcast", "scalar"])
def test_abn_residual_refused_before_any_write(residual):
    """ABN checks its residual like the in-place modules: refused with IABNError naming it,
    and neither the running stats nor num_batches_tracked move."""
    m = it.ABN(C)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(IABNError, match="residual"):
        m(torch.randn(2, C, 4, 4), residual=residual)
    for k, v in m.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_to_sync_refuses_abn():
    """ABN uses `weight` as the scale; InPlaceABNSync uses |weight| + eps: loading one's
    state into the other would silently change the function."""
    with pytest.raises(TypeError, match="InPlaceABN"):
        it.to_sync(it.ABN(C))


@pytest.mark.parametrize("training", [True, False])
def test_eager_and_custom_op_paths_agree_with_residual(monkeypatch, training):
    """The bitwise agreement of the two paths, with a residual (that needs no grad) and in
    eval, where the custom-op backward rebuilds its signature from z."""
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(3, C, 5, 6, generator=g).contiguous(memory_format=torch.channels_last)
    r = torch.randn(3, C, 5, 6, generator=g).contiguous(memory_format=torch.channels_last)
    dz = torch.randn(3, C, 5, 6, generator=g)
    w0 = torch.rand(C, generator=g) * 3 - 1.5
    outs = []
    eager = to._eager
    for use_eager in (True, False):
        monkeypatch.setattr(to, "_eager", eager if use_eager else (lambda t: False))
        m = it.InPlaceABN(C, activation="elu", activation_param=0.7).train(training)
        with torch.no_grad():
            m.weight.copy_(w0)
        leaf = x0.clone().requires_grad_()
        z = m(leaf * 1, residual=r)
        z.backward(dz)
        outs.append([t.detach().clone() for t in (z, leaf.grad, m.weight.grad, m.bias.grad,
                                                  m.running_mean, m.running_var)])
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_sync_batchnorm_group_carries_over():
    """from_batchnorm(SyncBatchNorm(process_group=g)) synchronises over g, not the whole
    world, and to_batchnorm gives the group back."""
    group = object()  # a stand-in: nothing here runs a collective
    bn = nn.SyncBatchNorm(C, process_group=group)
    m = it.from_batchnorm(bn)
    assert isinstance(m, it.InPlaceABNSync) and m.group is group
    assert it.to_batchnorm(m)[0].process_group is group


def test_graph_module_runs_its_own_forward_not_a_patched_one():
    """An instance attribute that shadows a GraphModule method (a patched `forward`) must not
    be carried over: the converted model would run the original model's code."""
    orig = _Net()
    orig.forward = lambda x: torch.zeros(())  # noqa: E731 - an instance-level patch
    conv = _convert(orig)
    assert conv(torch.randn(2, 3, 5, 5)).shape == (2, 2, 5, 5)


class _InputResidual(nn.Module):
    """act(bn(conv(x)) + x): the residual is the model's float32 input."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(C, C, 3, padding=1), nn.BatchNorm2d(C), \
            nn.Conv2d(C, 2, 1)

    def forward(self, x):
        return self.head(F.leaky_relu(self.bn(self.conv(x)) + x, 0.01))


@pytest.mark.xfail(strict=True, raises=IABNError, reason=(
    "under autocast the fused residual (float32 here) and the BN input (the conv's bfloat16 "
    "output) differ in dtype: the original add promotes, the fused layer refuses the residual"))
def test_fused_residual_under_autocast_with_a_float32_residual():
    orig = _InputResidual()
    conv = _convert(orig)
    x = torch.randn(2, C, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        conv(x)

"""Double backward (gradient penalties, meta-learning): issue 23, item 1.

InPlace-ABN's backward has a closed form that is itself differentiable (iabn/torch_grad.py);
autograd gets it whenever it asks for a graph of the backward, and a gradient reaching the
batch statistics in the second pass is carried to x. Checked with gradgradcheck in float64
and against nn.BatchNorm on the issue's gradient-penalty case."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from iabn.torch import ABN, InPlaceABN, inplace_abn  # noqa: E402

BACKENDS = ["numpy", "emulator"]
ACTS = [("identity", 0.01), ("leaky_relu", 0.2), ("elu", 0.7)]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("IABN_BACKEND", request.param)
    return request.param


def _penalty_model(cls, training):
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(3)
    layer = cls(3, activation="identity")
    d = nn.Sequential(nn.Linear(4, 3), layer, nn.Linear(3, 1)).double()
    with torch.no_grad():
        w = torch.tensor([0.7, -1.3, 0.4], dtype=torch.float64)
        d[1].weight.copy_(w)
        d[1].bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
        d[1].running_mean.copy_(torch.tensor([0.05, -0.1, 0.2]))
        d[1].running_var.copy_(torch.tensor([1.5, 0.7, 1.1]))
        gamma = w.abs() + d[1].eps if cls is InPlaceABN else w
    ref = nn.Sequential(nn.Linear(4, 3), bn, nn.Linear(3, 1)).double()
    ref.load_state_dict({k: v for k, v in d.state_dict().items()}, strict=True)
    with torch.no_grad():
        ref[1].weight.copy_(gamma)
    return d.train(training), ref.train(training)


@pytest.mark.parametrize("cls", [InPlaceABN, ABN])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("how", ["backward_inputs", "grad", "backward"])
def test_gradient_penalty_matches_batchnorm(backend, cls, training, how):
    """The issue's WGAN-GP probe: every parameter's gradient of the penalty equals
    nn.BatchNorm1d's (before, iabn returned a partial answer silently)."""
    d, ref = _penalty_model(cls, training)
    x = torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grads = []
    for net in (d, ref):
        xx = x.clone().requires_grad_()
        g = torch.autograd.grad((net(xx) ** 2).sum(), xx, create_graph=True)[0]
        gp = ((g.norm(2, dim=1) - 1) ** 2).mean()
        params = list(net.parameters())
        if how == "grad":
            grads.append(torch.autograd.grad(gp, params, allow_unused=True))
            continue
        for p in params:
            p.grad = None
        gp.backward(inputs=params) if how == "backward_inputs" else gp.backward()
        grads.append([p.grad for p in params])
    names = [n for n, _ in d.named_parameters()]
    for name, got, want in zip(names, *grads):
        assert got is not None and want is not None, name
        if name == "1.weight" and cls is InPlaceABN:  # d gamma / dw = s(w)
            want = want * torch.where(d[1].weight.detach() < 0, -1.0, 1.0)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.parametrize("activation,param", ACTS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("residual", [False, True])
def test_gradgradcheck(backend, activation, param, training, residual):
    g = torch.Generator().manual_seed(2)
    shape = (3, 2, 2, 2)
    x = torch.randn(shape, dtype=torch.float64, generator=g, requires_grad=True)
    w = (torch.rand(2, dtype=torch.float64, generator=g) + 0.5).requires_grad_()
    with torch.no_grad():
        w[0] = -w[0]  # both signs of s(w)
    b = torch.randn(2, dtype=torch.float64, generator=g, requires_grad=True)
    r = torch.randn(shape, dtype=torch.float64, generator=g, requires_grad=True)
    rm = torch.randn(2, dtype=torch.float64, generator=g)
    rv = torch.rand(2, dtype=torch.float64, generator=g) + 0.5

    def f(x, w, b, r):
        return inplace_abn(x.clone(), w, b, rm.clone(), rv.clone(), training, 0.1, 1e-5,
                           activation, param, residual=r if residual else None)

    assert torch.autograd.gradcheck(f, (x, w, b, r), atol=1e-6, rtol=1e-5)
    assert torch.autograd.gradgradcheck(f, (x, w, b, r), atol=1e-5, rtol=1e-4)


def test_second_order_reaches_the_batch_statistics(backend):
    """A loss on the gradient w.r.t. x depends on x through invstd as well: compared with
    BatchNorm + LeakyReLU written with torch ops (what autograd differentiates exactly)."""
    torch.manual_seed(3)
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    w = torch.tensor([0.6, 1.2, 0.9], dtype=torch.float64)
    b = torch.tensor([0.1, -0.3, 0.2], dtype=torch.float64)
    outs = []
    for use_iabn in (True, False):
        xx = x.clone().requires_grad_()
        if use_iabn:
            y = inplace_abn(xx.clone(), w - 1e-5, b, None, None, True, 0.1, 1e-5,
                            "leaky_relu", 0.1)
        else:
            y = nn.functional.leaky_relu(nn.functional.batch_norm(
                xx, None, None, w, b, True, 0.1, 1e-5), 0.1)
        g = torch.autograd.grad((y.sin()).sum(), xx, create_graph=True)[0]
        outs.append(torch.autograd.grad((g ** 2).sum(), xx)[0])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-6, atol=1e-8)

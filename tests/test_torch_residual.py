"""The residual form in PyTorch: inplace_abn(..., residual=r) and Module.forward(x, residual)
compute act(BN(x) + r) in place over x, save z and r only, and give r the gradient dy."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import iabn.torch as it
from iabn.torch import IABNError

HAVE_GPU = torch.cuda.is_available()
MF = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def _pair(act, param, c=4, dtype=torch.float64, device="cpu"):
    """(ABN with gamma = |w| + eps, InPlaceABN) computing the same function."""
    torch.manual_seed(0)
    m = it.InPlaceABN(c, activation=act, activation_param=param).to(device, dtype)
    a = it.ABN(c, activation=act, activation_param=param).to(device, dtype)
    with torch.no_grad():
        m.weight.uniform_(-1.5, 1.5)
        m.bias.normal_()
        a.weight.copy_(m.effective_weight())
        a.bias.copy_(m.bias)
    return a, m


def _compare(a, m, shape, mf, training, dtype=torch.float64, device="cpu", tol=1e-10):
    a.train(training), m.train(training)
    g = torch.Generator().manual_seed(1)
    x0, r0, dz = (torch.randn(shape, generator=g, dtype=dtype).to(device, memory_format=mf)
                  for _ in range(3))
    xa, ra = x0.clone().requires_grad_(), r0.clone().requires_grad_()
    xb, rb = x0.clone().requires_grad_(), r0.clone().requires_grad_()
    za = a(xa, ra)
    zb = m(xb * 1, rb)  # * 1: a non-leaf input that InPlaceABN may overwrite
    za.backward(dz)
    zb.backward(dz)
    torch.testing.assert_close(zb, za, rtol=tol, atol=tol)
    torch.testing.assert_close(xb.grad, xa.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(rb.grad, ra.grad, rtol=tol, atol=tol)
    assert rb.grad.stride() == rb.stride()
    torch.testing.assert_close(m.weight.grad * m.weight.sign(), a.weight.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(m.bias.grad, a.bias.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(m.running_mean, a.running_mean)
    torch.testing.assert_close(m.running_var, a.running_var)


@pytest.mark.parametrize("mf", list(MF), ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("act,param", [("leaky_relu", 0.1), ("elu", 0.7), ("identity", 0.01)])
@pytest.mark.parametrize("backend", ["numpy", "emulator"])
def test_residual_matches_abn(monkeypatch, backend, act, param, training, mf):
    monkeypatch.setenv("IABN_BACKEND", backend)
    a, m = _pair(act, param)
    _compare(a, m, (3, 4, 5, 6), MF[mf], training)


def test_functional_residual_keyword_and_sync_fallback():
    a, m = _pair("leaky_relu", 0.01)
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    r = torch.randn(2, 4, 3, dtype=torch.float64)
    want = a(x.clone(), r)
    got = it.inplace_abn(x.clone(), m.weight, m.bias, m.running_mean.clone(),
                         m.running_var.clone(), residual=r)
    torch.testing.assert_close(got, want)
    with pytest.warns(it.SyncFallbackWarning):
        got = it.inplace_abn_sync(x.clone(), m.weight, m.bias, m.running_mean.clone(),
                                  m.running_var.clone(), residual=r)
    torch.testing.assert_close(got, want)


def _saved_storages(fn):
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, seen


def test_residual_adds_no_storage_when_another_op_saves_it():
    """A residual block: conv saves its input r, and the fused layer saves z and that same r,
    so the residual costs no saved storage beyond what the block keeps anyway."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
    m = it.InPlaceABN(4)
    r = torch.randn(2, 4, 8, 8).requires_grad_()
    r_in = r * 1  # the block's input (non-leaf)
    params = {p.untyped_storage().data_ptr() for p in list(conv.parameters())
              + list(m.parameters()) + list(m.buffers())}

    def block(with_residual):
        h = conv(r_in)
        return m(h, r_in) if with_residual else m(h)

    z1, plain = _saved_storages(lambda: block(False))
    z2, fused = _saved_storages(lambda: block(True))
    act_plain = {p: n for p, n in plain.items() if p not in params and n > 64}
    act_fused = {p: n for p, n in fused.items() if p not in params and n > 64}
    full = r_in.numel() * r_in.element_size()
    assert r_in.untyped_storage().data_ptr() in act_fused
    assert z2.untyped_storage().data_ptr() in act_fused
    assert sorted(act_fused.values()) == sorted(act_plain.values()) == [full, full]


def test_in_place_change_of_the_residual_fails_at_backward():
    m = it.InPlaceABN(3)
    x = torch.randn(2, 3, 4).requires_grad_()
    r = torch.randn(2, 3, 4).requires_grad_() * 1
    z = m(x * 1, r)
    r.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        z.sum().backward()


def test_bad_residual_is_rejected_before_any_write():
    m = it.InPlaceABN(3)
    x = torch.randn(2, 3, 4)
    before = (x.clone(), m.running_mean.clone())
    for r, match in ((torch.randn(2, 3, 4, dtype=torch.float64), "residual has dtype"),
                     (torch.randn(2, 3, 5), "residual has shape"),
                     (x, "residual shares memory with x"),
                     ("r", "residual must be a torch.Tensor")):
        with pytest.raises(IABNError, match=match):
            m(x, r)
        assert torch.equal(x, before[0]) and torch.equal(m.running_mean, before[1])


def test_compile_fullgraph_with_residual():
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv0 = nn.Conv2d(4, 4, 1)
            # no conv bias before BN: its true gradient is 0, so only rounding would be compared
            self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
            self.bn = it.InPlaceABN(4)

        def forward(self, x):
            h = self.conv0(x)
            return self.bn(self.conv(h), h)

    eager = Block()
    comp_mod = copy.deepcopy(eager)
    comp = torch.compile(comp_mod, fullgraph=True)
    x = torch.randn(2, 4, 6, 6)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    ye, yc = eager(xe), comp(xc)
    torch.testing.assert_close(yc, ye, rtol=1e-5, atol=1e-5)
    ye.square().sum().backward()
    yc.square().sum().backward()
    torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(eager.named_parameters(), comp_mod.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=str)
def test_autocast_cpu_residual(dtype):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 3, padding=1)
    m = it.InPlaceABN(4)
    x = torch.randn(2, 4, 6, 6)
    with torch.autocast("cpu", dtype=dtype):
        r = conv(x)
        h = conv(r)
        z = m(h, r)
    assert z.dtype == dtype and m.weight.dtype == torch.float32
    z.float().sum().backward()
    assert torch.isfinite(conv.weight.grad).all() and m.weight.grad.dtype == torch.float32


@pytest.mark.parametrize("mf", list(MF), ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("act,param", [("leaky_relu", 0.01), ("elu", 1.0)])
@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_GPU, reason="needs a CUDA GPU")
def test_gpu_residual_matches_abn(act, param, training, mf):
    """The CUDA kernels with a residual, through the custom ops (float32 on the GPU)."""
    a, m = _pair(act, param, c=16, dtype=torch.float32, device="cuda")
    _compare(a, m, (4, 16, 9, 7), MF[mf], training, torch.float32, "cuda", tol=1e-4)

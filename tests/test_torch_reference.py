"""iabn.torch against torch.nn.BatchNorm{1,2,3}d + activation, and gradcheck.

One body compares every quantity (output, dx, dweight, dbias, running stats,
num_batches_tracked) with a float64 nn.BatchNorm reference holding copied weights, over
shape x layout x dtype x mode x activation, on the `numpy` backend, on the CUDA kernels in the
CPU `emulator`, and on a GPU when there is one.
"""
from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import iabn.torch as it

# Error allowed, relative to the largest magnitude of the expected tensor.
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}

SHAPES = [(16, 5), (4, 3, 7), (3, 4, 5, 6), (2, 3, 2, 3, 4)]
BN_FOR_RANK = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
ACTIVATIONS = [("leaky_relu", 0.01), ("elu", 0.7), ("identity", 0.01)]

try:
    import iabn_core.emulator  # noqa: F401
    EMULATOR_REASON = None
except Exception as exc:  # the emulator needs a host C++ toolchain
    EMULATOR_REASON = f"iabn_core.emulator does not import: {exc!r}"

needs_emulator = pytest.mark.skipif(EMULATOR_REASON is not None, reason=str(EMULATOR_REASON))
HAVE_GPU = torch.cuda.is_available()
on_gpu = [pytest.mark.gpu, pytest.mark.skipif(not HAVE_GPU, reason="needs a CUDA GPU")]
DEVICES = ["cpu", pytest.param("cuda", marks=on_gpu)]


@pytest.fixture
def emulator(monkeypatch):
    """Run the CPU tensors through the real CUDA kernels in the emulator (and check they did)."""
    from iabn_core import backends

    monkeypatch.setenv("IABN_BACKEND", "emulator")
    before = backends.get("emulator").launches
    yield
    assert backends.get("emulator").launches > before, "the emulator backend never ran"


def assert_near(actual, expected, tol, what):
    """max |actual - expected| <= tol * max |expected|, with where the worst value is."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    err = (a - e).abs()
    scale = max(e.abs().max().item(), 1e-30)
    worst = err.max().item()
    if not worst <= tol * scale:
        idx = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
        raise AssertionError(f"{what}: max error {worst:.3g} > {tol:.1g} * {scale:.3g} at {idx}: "
                             f"got {a[idx].item():.8g}, expected {e[idx].item():.8g}")


def to_layout(t, layout):
    """t with the same values in `layout` memory ("ncs" contiguous or "nsc" channels-last)."""
    if layout == "ncs" or t.dim() == 2:
        return t.contiguous()
    if t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    if t.dim() == 5:
        return t.contiguous(memory_format=torch.channels_last_3d)
    return t.transpose(1, 2).contiguous().transpose(1, 2)  # (N, C, L) with C innermost


def reference_act(y, activation, param):
    if activation == "leaky_relu":
        return F.leaky_relu(y, param)
    if activation == "elu":
        return F.elu(y, param)
    return y


def make_pair(c, rank, param_dtype, device, momentum, activation, param, gen):
    """An InPlaceABN with random weights (both signs) and a float64 nn.BatchNorm copy of it."""
    m = it.InPlaceABN(c, momentum=momentum, activation=activation,
                      activation_param=param).to(param_dtype)
    ref = BN_FOR_RANK[rank](c, momentum=momentum).double()
    with torch.no_grad():
        sign = torch.where(torch.rand(c, generator=gen) < 0.3, -1.0, 1.0)
        m.weight.copy_(sign * (0.5 + torch.rand(c, generator=gen)))
        m.bias.copy_(torch.randn(c, generator=gen) * 0.5)
        m.running_mean.copy_(torch.randn(c, generator=gen) * 0.2)
        m.running_var.copy_(0.5 + torch.rand(c, generator=gen))
        ref.weight.copy_(m.weight.double().abs() + m.eps)  # gamma = |w| + eps
        ref.bias.copy_(m.bias)
        ref.running_mean.copy_(m.running_mean)
        ref.running_var.copy_(m.running_var)
    return m.to(device), ref


def compare_with_batchnorm(shape, dtype, layout, training, activation, param, *, device="cpu",
                           param_dtype=None, momentum=0.1, steps=2, grad_layout=None):
    """Runs `steps` forward/backward steps on both modules and checks everything each step."""
    # crc32, not hash(): str hashes change between processes, and the seed must not.
    gen = torch.Generator().manual_seed(
        zlib.crc32(repr((shape, dtype, layout, training, activation)).encode()))
    param_dtype = param_dtype or (torch.float64 if dtype == torch.float64 else torch.float32)
    m, ref = make_pair(shape[1], len(shape), param_dtype, device, momentum, activation, param,
                       gen)
    m.train(training)
    ref.train(training)
    tol = TOL[dtype]
    for step in range(steps):
        # Values are drawn in float64 and rounded once, so both sides see the same input.
        x64 = (torch.randn(shape, generator=gen, dtype=torch.float64) * 1.5 + 0.3).to(dtype)
        g64 = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
        leaf = to_layout(x64.to(device), layout).clone().requires_grad_()
        inp = leaf.clone()  # a non-leaf to work in place on; clone keeps the layout
        ptr = inp.data_ptr()
        out = m(inp)
        assert out.data_ptr() == ptr and out.stride() == leaf.stride(), "not in place"
        g = to_layout(g64.to(device), grad_layout or layout)
        out.backward(g)

        xr = x64.double().clone().requires_grad_()
        yr = reference_act(ref(xr), activation, param)
        yr.backward(g64.double())

        what = f"step {step}"
        assert_near(out, yr, tol, f"{what} output")
        assert_near(leaf.grad, xr.grad, tol * 4, f"{what} dx")
        # d/dw = sign(w) * d/dgamma, since gamma = |w| + eps.
        assert_near(m.weight.grad, torch.sign(m.weight.detach()).cpu().double() * ref.weight.grad,
                    tol * 4, f"{what} dweight")
        assert_near(m.bias.grad, ref.bias.grad, tol * 4, f"{what} dbias")
        assert_near(m.running_mean, ref.running_mean, max(tol, 1e-6), f"{what} running_mean")
        assert_near(m.running_var, ref.running_var, max(tol, 1e-6), f"{what} running_var")
        assert int(m.num_batches_tracked) == int(ref.num_batches_tracked)
        for p in list(m.parameters()) + list(ref.parameters()):
            p.grad = None


@pytest.mark.parametrize("activation,param", ACTIVATIONS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("layout", ["ncs", "nsc"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_batchnorm(shape, layout, dtype, training, activation, param):
    if layout == "nsc" and len(shape) == 2:
        pytest.skip("(N, C) has a single layout")
    compare_with_batchnorm(shape, dtype, layout, training, activation, param)


@pytest.mark.parametrize("shape", [(3, 4, 5, 6), (6, 3)], ids=lambda s: "x".join(map(str, s)))
def test_momentum_none_is_cumulative_average(shape):
    compare_with_batchnorm(shape, torch.float32, "ncs", True, "leaky_relu", 0.01,
                           momentum=None, steps=3)


@pytest.mark.parametrize("layouts", [("nsc", "ncs"), ("ncs", "nsc")], ids=["cl-x", "cl-grad"])
def test_gradient_in_another_layout(layouts):
    """Autograd may hand a grad in another memory layout than z; backward must copy it."""
    x_layout, g_layout = layouts
    compare_with_batchnorm((3, 4, 5, 6), torch.float32, x_layout, True, "leaky_relu", 0.01,
                           grad_layout=g_layout, steps=1)


def test_expanded_gradient():
    """out.sum() hands backward an expanded (stride-0) gradient; it must still be right."""
    torch.manual_seed(0)
    m, ref = make_pair(4, 4, torch.float32, "cpu", 0.1, "leaky_relu", 0.01, torch.Generator())
    x = torch.randn(2, 4, 3, 3)
    leaf = x.clone().requires_grad_()
    m(leaf.clone()).sum().backward()
    xr = x.double().requires_grad_()
    F.leaky_relu(ref(xr), 0.01).sum().backward()
    assert_near(leaf.grad, xr.grad, 1e-4, "dx")


# ------------------------------------------------------------------------ emulator, GPU
@needs_emulator
@pytest.mark.parametrize("activation,param", [("leaky_relu", 0.01), ("elu", 1.0)])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["ncs", "nsc"])
def test_emulator_matches_batchnorm(emulator, layout, dtype, training, activation, param):
    compare_with_batchnorm((2, 3, 4, 5), dtype, layout, training, activation, param, steps=1)


@needs_emulator
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_emulator_low_precision_params(emulator, dtype):
    """Parameters in the input's own 16-bit dtype (the (x, x) dtype pairs)."""
    compare_with_batchnorm((2, 3, 4, 5), dtype, "nsc", True, "leaky_relu", 0.01,
                           param_dtype=dtype, steps=1)


@needs_emulator
def test_emulator_rank2_and_momentum_none(emulator):
    compare_with_batchnorm((8, 5), torch.float32, "ncs", True, "leaky_relu", 0.01,
                           momentum=None, steps=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["ncs", "nsc"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=on_gpu)])
def test_gpu_matches_batchnorm(device, training, layout, dtype):
    compare_with_batchnorm((4, 8, 9, 10), dtype, layout, training, "leaky_relu", 0.01,
                           device=device)


# --------------------------------------------------------------------------- gradcheck
@pytest.mark.parametrize("activation,param", ACTIVATIONS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["ncs", "nsc"])
@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(device, layout, training, activation, param):
    gen = torch.Generator().manual_seed(7)
    c = 3
    x = torch.randn(3, c, 2, 3, generator=gen, dtype=torch.float64)
    # |w| stays away from 0, where |w| is not differentiable.
    w = torch.tensor([0.8, -1.2, 1.5], dtype=torch.float64)
    b = torch.randn(c, generator=gen, dtype=torch.float64) * 0.3
    rm = torch.randn(c, generator=gen, dtype=torch.float64) * 0.1
    rv = 0.5 + torch.rand(c, generator=gen, dtype=torch.float64)
    x, w, b, rm, rv = (t.to(device) for t in (x, w, b, rm, rv))

    def f(x, w, b):
        # Fresh copies each call: x is overwritten and the running stats are updated.
        return it.inplace_abn(to_layout(x.clone(), layout), w, b, rm.clone(), rv.clone(),
                              training, 0.1, 1e-5, activation, param)

    inputs = tuple(t.clone().requires_grad_() for t in (x, w, b))
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)

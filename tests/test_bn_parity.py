"""nn.BatchNorm's own cases, run against ABN and InPlaceABN with activation="identity" (issue
23): every row gives the same result as torch (output, running stats, num_batches_tracked,
gradients of input, weight and bias) to a per-dtype tolerance, or asserts a difference that
README's "Differences from torch.nn.BatchNorm" documents. None is silent.

InPlaceABN is set up as README says: its scale is gamma = |w| + eps, so the reference BN gets
weight |w| + eps (w > 0 here, so dL/dw = dL/dgamma). ABN never reaches iabn's backends (it is
F.batch_norm plus an activation), so its rows run once; InPlaceABN's run on the NumPy backend
(the whole table) and the emulator, which runs the CUDA kernels on the CPU (a small table:
it compiles them with g++ on first use).
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

import iabn.torch as it
from iabn.torch import IABNError

C = 3
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}
SHAPES = {"(N,C)": (8, C), "(N,C,L)": (4, C, 5), "2d": (2, C, 4, 4), "3d": (2, C, 2, 3, 2)}
BN = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
MOMENTA = {"0.1": 0.1, "None": None, "0": 0.0}


@pytest.fixture(params=["numpy", "emulator"])
def backend(request, monkeypatch):
    monkeypatch.setenv("IABN_BACKEND", request.param)
    return request.param


def make(cls, shape, dtype=torch.float64, affine=True, track=True, momentum=0.1, seed=0):
    """(ours, reference BN) in the same state; the reference's weight is ours' scale."""
    g = torch.Generator().manual_seed(seed)
    kw = dict(momentum=momentum, affine=affine, track_running_stats=track, dtype=dtype)
    ours, ref = cls(C, activation="identity", **kw), BN[len(shape)](C, **kw)
    with torch.no_grad():
        if affine:
            ours.weight.copy_(0.5 + torch.rand(C, generator=g, dtype=dtype))
            ours.bias.copy_(torch.randn(C, generator=g, dtype=dtype))
            ref.weight.copy_(ours.effective_weight())
            ref.bias.copy_(ours.bias)
        if track:
            for m in (ours, ref):
                m.running_mean.copy_(torch.linspace(-1, 1, C, dtype=dtype))
                m.running_var.copy_(torch.linspace(0.5, 2, C, dtype=dtype))
                m.num_batches_tracked.fill_(3)
    return ours, ref


def step(m, x, g):
    """One forward and backward; (output, dx). In-place modules get a non-leaf copy of x."""
    xa = x.clone().requires_grad_()
    out = m(xa.clone() if isinstance(m, it.IN_PLACE_MODULES) else xa)
    if out.numel():
        out.backward(g)
    elif any(p.requires_grad for p in m.parameters()):
        out.sum().backward()
    return out.detach().clone(), xa.grad


def _scale(m):
    return m.effective_weight().detach() if isinstance(m, it.ABN) else m.weight.detach()


def assert_same_state(ours, ref, tol):
    """Same state_dict keys and values; `weight` compared as the scale it stands for."""
    for (k, a), (k2, b) in zip(ours.state_dict().items(), ref.state_dict().items()):
        assert k == k2
        if k == "weight":
            a, b = _scale(ours), _scale(ref)
        torch.testing.assert_close(a, b, **tol, msg=k)


def assert_same_grads(ours, ref, tol):
    if ours.weight is None:
        return
    dw = ours.weight.grad
    if isinstance(ours, it.IN_PLACE_MODULES):  # gamma = |w| + eps, w > 0: dgamma/dw = 1
        assert bool((ours.weight > 0).all())
    torch.testing.assert_close(dw, ref.weight.grad, **tol, msg="dweight")
    torch.testing.assert_close(ours.bias.grad, ref.bias.grad, **tol, msg="dbias")


def run_table_row(cls, shape, dtype, affine, track, momentum, mode, steps=3):
    ours, ref = make(cls, shape, dtype, affine, track, momentum)
    ours.train(mode == "train")
    ref.train(mode == "train")
    tol = TOL[dtype]
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):  # several steps: momentum=None averages over the counted ones
        x = 2 + 3 * torch.randn(shape, generator=g, dtype=dtype)
        dy = torch.randn(shape, generator=g, dtype=dtype)
        for m in (ours, ref):
            m.zero_grad(set_to_none=True)
        out, dx = step(ours, x, dy)
        want, dx_want = step(ref, x, dy)
        torch.testing.assert_close(out, want, **tol, msg="output")
        torch.testing.assert_close(dx, dx_want, **tol, msg="dx")
        assert_same_grads(ours, ref, tol)
        assert_same_state(ours, ref, tol)


# float64 over every variant; float32 (the tolerance check) with the default momentum
TABLE = [r for r in itertools.product(SHAPES, (torch.float32, torch.float64), (True, False),
                                      (True, False), MOMENTA, ("train", "eval"))
         if r[1] == torch.float64 or r[4] == "0.1"]


def _id(row):
    shape, dtype, affine, track, momentum, mode = row
    return (f"{shape}-{str(dtype)[6:]}-affine={affine}-track={track}-momentum={momentum}-"
            f"{mode}")


@pytest.mark.parametrize("row", TABLE, ids=[_id(r) for r in TABLE])
def test_abn_table(row):
    shape, dtype, affine, track, momentum, mode = row
    run_table_row(it.ABN, SHAPES[shape], dtype, affine, track, MOMENTA[momentum], mode)


@pytest.mark.parametrize("row", TABLE, ids=[_id(r) for r in TABLE])
def test_inplace_abn_table_numpy(row, monkeypatch):
    monkeypatch.setenv("IABN_BACKEND", "numpy")
    shape, dtype, affine, track, momentum, mode = row
    run_table_row(it.InPlaceABN, SHAPES[shape], dtype, affine, track, MOMENTA[momentum], mode)


SMALL = [r for r in TABLE if r[0] in ("2d", "(N,C,L)") and r[1] == torch.float32
         and r[3] is True and r[4] != "0"]


@pytest.mark.parametrize("row", SMALL, ids=[_id(r) for r in SMALL])
def test_inplace_abn_table_emulator(row, monkeypatch):
    monkeypatch.setenv("IABN_BACKEND", "emulator")
    shape, dtype, affine, track, momentum, mode = row
    run_table_row(it.InPlaceABN, SHAPES[shape], dtype, affine, track, MOMENTA[momentum], mode,
                  steps=2)


# ------------------------------------------------------------------- state_dict round trips
@pytest.mark.parametrize("cls", [it.ABN, it.InPlaceABN])
def test_state_dict_round_trip_between_our_modules(cls):
    a, _ = make(cls, SHAPES["2d"])
    b = cls(C, activation="identity", dtype=torch.float64)
    b.load_state_dict(a.state_dict())
    x = torch.randn(SHAPES["2d"], dtype=torch.float64)
    torch.testing.assert_close(b(x.clone()), a(x.clone()))
    assert_same_state(a, b, TOL[torch.float64])


def test_state_dict_abn_and_batchnorm_are_interchangeable():
    """ABN's weight is BN's weight: the state dicts load both ways with the same meaning."""
    a, bn = make(it.ABN, SHAPES["2d"])
    other, fresh = it.ABN(C, activation="identity", dtype=torch.float64), nn.BatchNorm2d(C)
    other.load_state_dict(bn.state_dict())
    fresh.double().load_state_dict(a.state_dict())
    x = torch.randn(SHAPES["2d"], dtype=torch.float64)
    torch.testing.assert_close(other.eval()(x), bn.eval()(x))
    torch.testing.assert_close(fresh.eval()(x), a.eval()(x))


def test_state_dict_inplace_abn_from_batchnorm_is_the_documented_difference():
    """Same keys, but InPlaceABN reads `weight` as w in gamma = |w| + eps: a BN state dict
    loaded as is scales by |gamma| + eps (README: use from_batchnorm, which maps
    w = gamma - eps). The difference is exactly that, never anything else."""
    _, bn = make(it.InPlaceABN, SHAPES["2d"])
    m = it.InPlaceABN(C, activation="identity", dtype=torch.float64)
    m.load_state_dict(bn.state_dict())
    torch.testing.assert_close(m.effective_weight(), bn.weight.abs() + bn.eps, rtol=0, atol=0)
    converted = it.from_batchnorm(bn, "identity")
    x = torch.randn(SHAPES["2d"], dtype=torch.float64)
    torch.testing.assert_close(converted.eval()(x.clone()), bn.eval()(x), **TOL[torch.float64])


@pytest.mark.parametrize("cls", [it.ABN, it.InPlaceABN])
def test_partial_load_without_num_batches_tracked_as_batchnorm(cls):
    ours, ref = make(cls, SHAPES["2d"], momentum=None)
    for m in (ours, ref):
        sd = dict(m.state_dict())  # a plain dict: no version metadata
        del sd["num_batches_tracked"]
        m.load_state_dict(sd, strict=False)
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 3
    x, dy = torch.randn(SHAPES["2d"], dtype=torch.float64), torch.randn(SHAPES["2d"])
    step(ours, x, dy.double())
    step(ref, x, dy.double())
    assert_same_state(ours, ref, TOL[torch.float64])


# ------------------------------------------------------- zero-size batches (issue item 6)
@pytest.mark.parametrize("shape", [(0, C, 4, 4), (0, C)])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("cls", [it.ABN, it.InPlaceABN])
def test_zero_size_batch_as_batchnorm(backend, cls, shape, mode):
    """Empty output, running stats untouched, num_batches_tracked counted (torch counts the
    batch), zero parameter gradients, in train and eval."""
    ours, ref = make(cls, shape)
    ours.train(mode == "train")
    ref.train(mode == "train")
    x = torch.randn(shape, dtype=torch.float64)
    out, dx = step(ours, x, None)
    want, dx_want = step(ref, x, None)
    assert out.shape == want.shape == shape and dx.shape == dx_want.shape == shape
    assert_same_grads(ours, ref, TOL[torch.float64])
    assert_same_state(ours, ref, TOL[torch.float64])


# --------------------------------------------------------- double backward (issue item 1)
def _functional(cls, activation, training):
    param = 0.3 if activation != "identity" else 0.01
    rm, rv = torch.linspace(-1, 1, C).double(), torch.linspace(0.5, 2, C).double()

    def f(x, w, b):
        if cls is it.ABN:
            y = torch.nn.functional.batch_norm(x, rm.clone(), rv.clone(), w, b, training,
                                               0.1, 1e-5)
            return {"identity": y, "leaky_relu": torch.nn.functional.leaky_relu(y, param),
                    "elu": torch.nn.functional.elu(y, param)}[activation]
        return it.inplace_abn(x.clone(), w, b, rm.clone(), rv.clone(), training, 0.1, 1e-5,
                              activation, param)
    return f


DOUBLE = list(itertools.product(("ABN", "InPlaceABN"), ("identity", "leaky_relu", "elu"),
                                ("train", "eval")))


@pytest.mark.parametrize("cls,activation,mode", DOUBLE)
def test_double_backward_gradgradcheck(cls, activation, mode, monkeypatch):
    monkeypatch.setenv("IABN_BACKEND", "numpy")
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, C, 2, generator=g, dtype=torch.float64, requires_grad=True)
    w = (0.5 + torch.rand(C, generator=g, dtype=torch.float64)).requires_grad_()
    b = torch.randn(C, generator=g, dtype=torch.float64, requires_grad=True)
    f = _functional({"ABN": it.ABN, "InPlaceABN": it.InPlaceABN}[cls], activation,
                    mode == "train")
    assert torch.autograd.gradgradcheck(f, (x, w, b))


def test_double_backward_gradgradcheck_emulator(monkeypatch):
    monkeypatch.setenv("IABN_BACKEND", "emulator")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, C, 2, generator=g, dtype=torch.float64, requires_grad=True)
    w = (0.5 + torch.rand(C, generator=g, dtype=torch.float64)).requires_grad_()
    b = torch.randn(C, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(_functional(it.InPlaceABN, "leaky_relu", True),
                                        (x, w, b))


# ------------------------------------------------ documented differences, asserted as such
def test_non_contiguous_input_is_refused_not_copied():
    ours, ref = make(it.InPlaceABN, (4, C, 6))
    x = torch.randn(4, C, 12, dtype=torch.float64)[:, :, ::2]
    ref(x)  # BatchNorm takes any strides
    keep = [t.clone() for t in (x, ours.running_mean, ours.num_batches_tracked)]
    with pytest.raises(IABNError, match="x has unsupported strides"):
        ours(x)
    assert all(torch.equal(a, b) for a, b in zip(keep, (x, ours.running_mean,
                                                          ours.num_batches_tracked)))
    abn, abn_ref = make(it.ABN, (4, C, 6))  # ABN is not in place: it takes any strides
    torch.testing.assert_close(abn(x), abn_ref(x))


def test_relu_is_refused_by_the_in_place_modules_only():
    with pytest.raises(IABNError, match="relu"):
        it.InPlaceABN(C, activation="relu")
    it.ABN(C, activation="relu")


@pytest.mark.parametrize("cls", [it.ABN, it.InPlaceABN])
def test_forward_mode_ad(cls):
    """ABN supports forward-mode AD as BatchNorm does; InPlaceABN does not (its autograd
    Function has no jvp) and must refuse before writing x or the running stats."""
    ours, ref = make(cls, SHAPES["2d"])
    x = torch.randn(SHAPES["2d"], dtype=torch.float64)
    t = torch.randn_like(x)
    with fwAD.dual_level():
        want = fwAD.unpack_dual(ref(fwAD.make_dual(x, t))).tangent
    if cls is it.ABN:
        with fwAD.dual_level():
            got = fwAD.unpack_dual(ours(fwAD.make_dual(x.clone(), t))).tangent
        torch.testing.assert_close(got, want)
        return
    xc = x.clone()
    keep = [t.clone() for t in (xc, ours.running_mean, ours.running_var)]
    with fwAD.dual_level():
        with pytest.raises((IABNError, RuntimeError, NotImplementedError)):
            ours(fwAD.make_dual(xc, t))
    assert all(torch.equal(a, b) for a, b in zip(keep, (xc, ours.running_mean,
                                                          ours.running_var)))


@pytest.mark.parametrize("dtype,bound", [(torch.float16, 3e-3), (torch.bfloat16, 2e-2)])
def test_16_bit_weight_gradient_precision_is_the_documented_size(dtype, bound):
    """InPlaceABN recovers x-hat from the stored 16-bit output, so its dweight is off float64
    by about the 16-bit rounding (README: ~1e-3 float16, ~2e-3 bfloat16), where BatchNorm,
    which keeps its input, stays near 1e-7. Both against float64 on the same 16-bit x and
    dy, so only the layer's own error counts."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(8, C, 16, 16, generator=g).to(dtype)
    dy = torch.randn(8, C, 16, 16, generator=g).to(dtype)

    def rel_err(cls):  # ABN is F.batch_norm: torch's own error
        low, exact = (make(cls, (8, C, 16, 16), dtype=torch.float32)[0] for _ in range(2))
        step(low, x, dy)
        step(exact.double(), x.double(), dy.double())
        diff = low.weight.grad.double() - exact.weight.grad
        return (diff.abs().max() / exact.weight.grad.abs().max()).item()

    ours, torch_bn = rel_err(it.InPlaceABN), rel_err(it.ABN)
    assert ours < bound
    assert torch_bn < 1e-5 < ours  # the difference is InPlace-ABN's, as documented

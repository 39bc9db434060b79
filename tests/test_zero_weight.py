"""A weight that is exactly 0 trains (issue 10).

gamma = |w| + eps, so dweight = d|w|/dw * dL/dgamma. With sign(0) = 0 as d|w|/dw, a zero weight
(timm zero-initialises the last norm of every residual block) would get no gradient and stay 0
forever. iabn takes d|w|/dw = -1 where w < 0, else +1 (the official package's convention) in
the kernels, the NumPy backend and the float64 reference alike; these tests pin each of them.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import iabn.cupy as iabn_arrays
import iabn.torch as it
from conftest import ALL_BACKENDS
from iabn_core import reference as ref
from iabn_core import verify
from iabn_core.dtypes import PAIRS, numpy_dtype

EPS = 1e-5
# 0 and -0 must both train; the other two channels keep the sign convention honest.
WEIGHTS = (0.0, 0.5, -0.5, -0.0)


def _inputs(pair, layout, seed=3):
    rng = np.random.default_rng(seed)
    c = len(WEIGHTS)
    xdt, pdt = numpy_dtype(pair.x), numpy_dtype(pair.param)
    x = (rng.normal(size=(5, c, 6)) * 2 + 1).astype(xdt)
    dz = rng.normal(size=x.shape).astype(xdt)
    if layout == "nsc":
        x, dz = verify.channels_last(x), verify.channels_last(dz)
    w = np.array(WEIGHTS, dtype=pdt)
    b = rng.normal(size=c).astype(pdt)
    return x, dz, w, b


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("layout", ["ncs", "nsc"])
@pytest.mark.parametrize("pair", PAIRS, ids=[p.key for p in PAIRS])
def test_zero_weight_gets_the_reference_gradient(backend, layout, pair):
    host = verify.Host(backend)
    x0, dz0, w0, b0 = _inputs(pair, layout)
    x, dz, w, b = (host.put(a) for a in (x0, dz0, w0, b0))
    dz64 = dz0.astype(np.float64)  # CPU backends overwrite dz0 itself with dx
    ctx = iabn_arrays.forward(x, w, b, training=True, activation="leaky_relu",
                              activation_param=0.1, eps=EPS, backend=backend)
    z64 = ref.to_ncs(host.get(x).reshape(5, len(WEIGHTS), 6))
    stats = host.get(ctx.stats)
    _, dweight, _ = iabn_arrays.backward(ctx, x, dz)
    dweight = host.get(dweight)
    # The reference backward runs from this backend's own z: with gamma = eps, xhat =
    # (y - b) / eps magnifies z's rounding 1e5-fold, so only the same z gives a fair target.
    g = ref.backward(z64, dz64, stats[3], stats[0], w0, b0, training=True,
                     eps=EPS, activation="leaky_relu", param=0.1)
    if pair.x in ("float32", "float64"):
        # In float16/bfloat16, y = eps * xhat + b rounds to b: z keeps nothing of xhat at
        # gamma = eps, so the gradient may legitimately be 0 there (the |w| + eps price).
        assert np.all(dweight[[0, 3]] != 0), dweight
    scale = np.abs(g["dy"] * g["xhat"]).sum(axis=(0, 2)).max()  # what the sum's rounding scales with
    assert np.abs(dweight - g["dweight"]).max() <= verify.TOL[pair.param] * scale


def test_reference_matches_batchnorm_at_zero_weight():
    """The float64 reference against torch's BatchNorm at gamma = |w| + eps: its weight
    gradient is dL/dgamma, so iabn's dweight must equal it where w >= 0 (zero included) and be
    its negative where w < 0."""
    rng = np.random.default_rng(0)
    w = np.array(WEIGHTS)
    b = rng.normal(size=w.size)
    x = rng.normal(size=(5, w.size, 6)) * 2 + 1
    dz = rng.normal(size=x.shape)
    gamma = torch.tensor(np.abs(w) + EPS, requires_grad=True)
    xt = torch.tensor(x)
    out = F.leaky_relu(F.batch_norm(xt, None, None, gamma, torch.tensor(b), True, 0.1, EPS), 0.1)
    out.backward(torch.tensor(dz))
    e = ref.forward(x, w, b, training=True, eps=EPS, activation="leaky_relu", param=0.1)
    g = ref.backward(e["z"], dz, e["invstd"], e["count"], w, b, training=True, eps=EPS,
                     activation="leaky_relu", param=0.1)
    expected = np.where(w < 0, -1.0, 1.0) * gamma.grad.numpy()
    assert expected[0] != 0
    assert ref.rel_error(g["dweight"], expected) <= 1e-9  # xhat = (y - b) / 1e-5 in float64


def test_zero_initialised_module_trains_like_batchnorm():
    """An InPlaceABN with all weights 0 and a BatchNorm at gamma = eps: the same gradients, and
    one SGD step moves every iabn weight off 0 (to |w| = lr * |dL/dgamma|)."""
    torch.manual_seed(0)
    m = it.InPlaceABN(4, eps=EPS).double()
    nn.init.zeros_(m.weight)
    bn = nn.BatchNorm2d(4, eps=EPS).double()
    with torch.no_grad():
        bn.weight.fill_(EPS)
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64) + 0.5
    t = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    ((m(x.clone()) - t) ** 2).sum().backward()
    ((F.leaky_relu(bn(x), 0.01) - t) ** 2).sum().backward()
    assert torch.all(m.weight.grad != 0)
    torch.testing.assert_close(m.weight.grad, bn.weight.grad, rtol=1e-8, atol=0)
    torch.testing.assert_close(m.bias.grad, bn.bias.grad, rtol=1e-10, atol=1e-12)
    torch.optim.SGD(m.parameters(), lr=0.1).step()
    assert torch.all(m.weight != 0)

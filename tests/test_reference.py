"""The float64 reference (iabn_core.reference) and the merge against PyTorch CPU autograd.

PyTorch is the independent oracle: batch_norm with weight |w| + eps followed by the activation,
differentiated by autograd in float64. Every test here can fail: see the planted-error tests.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from iabn_core import reference as ref
from iabn_core.merge import merge_partials

RTOL = 1e-10  # float64 against float64: only summation-order differences remain
EPS = 1e-5
MOMENTUM = 0.1
ACT_PARAM = {"identity": 0.0, "leaky_relu": 0.1, "elu": 0.7}

# (N, C, S): general, C=1, S=1, N*S=2 (two ways), prime-sized
SHAPES = [(4, 3, 5), (3, 1, 7), (6, 4, 1), (1, 3, 2), (2, 2, 1), (7, 5, 11)]
AFFINE = [(True, True), (True, False), (False, True), (False, False)]


def check(actual, expected, rtol, what=""):
    """Assert rel_error(actual, expected) <= rtol (error relative to the output scale)."""
    err = ref.rel_error(actual, expected)
    assert err <= rtol, f"{what}: relative error {err:.3e} > {rtol:.1e}"


def make_case(shape, has_weight, has_bias, seed=0):
    rng = np.random.default_rng(seed)
    n, c, s = shape
    return {
        "x": rng.normal(0.5, 2.0, size=shape),
        "dz": rng.normal(size=shape),
        # signs mixed on purpose: dweight carries sign(w)
        "weight": rng.normal(size=c) if has_weight else None,
        "bias": rng.normal(size=c) if has_bias else None,
        "rm": rng.normal(size=c),
        "rv": rng.uniform(0.5, 2.0, size=c),
    }


def torch_oracle(case, training, activation, param):
    """z, running stats, dx, dweight, dbias from PyTorch autograd in float64."""
    x = torch.tensor(case["x"], requires_grad=True)
    w = None if case["weight"] is None else torch.tensor(case["weight"], requires_grad=True)
    b = None if case["bias"] is None else torch.tensor(case["bias"], requires_grad=True)
    rm, rv = torch.tensor(case["rm"].copy()), torch.tensor(case["rv"].copy())
    weight = None if w is None else w.abs() + EPS
    y = F.batch_norm(x, rm, rv, weight=weight, bias=b, training=training,
                     momentum=MOMENTUM, eps=EPS)
    if activation == "leaky_relu":
        z = F.leaky_relu(y, negative_slope=param)
    elif activation == "elu":
        z = F.elu(y, alpha=param)
    else:
        z = y
    z.backward(torch.tensor(case["dz"]))
    return {
        "z": z.detach().numpy(), "running_mean": rm.numpy(), "running_var": rv.numpy(),
        "dx": x.grad.numpy(),
        "dweight": None if w is None else w.grad.numpy(),
        "dbias": None if b is None else b.grad.numpy(),
    }


def reference_case(case, training, activation, param):
    fwd = ref.forward(case["x"], case["weight"], case["bias"], case["rm"], case["rv"],
                      training=training, momentum=MOMENTUM, eps=EPS, activation=activation,
                      param=param)
    bwd = ref.backward(fwd["z"], case["dz"], fwd["invstd"], fwd["count"], case["weight"],
                       case["bias"], training=training, eps=EPS, activation=activation,
                       param=param)
    return fwd, bwd


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("has_weight,has_bias", AFFINE, ids=["wb", "w", "b", "none"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation", ref.ACTIVATIONS)
def test_reference_matches_torch(shape, has_weight, has_bias, training, activation):
    case = make_case(shape, has_weight, has_bias)
    param = ACT_PARAM[activation]
    want = torch_oracle(case, training, activation, param)
    fwd, bwd = reference_case(case, training, activation, param)
    check(fwd["z"], want["z"], RTOL, "z")
    if training:
        check(fwd["running_mean"], want["running_mean"], RTOL, "running_mean")
        check(fwd["running_var"], want["running_var"], RTOL, "running_var")
    else:  # eval leaves the running stats alone, in torch and in the reference
        check(fwd["running_mean"], case["rm"], 0.0, "running_mean")
        check(fwd["running_var"], case["rv"], 0.0, "running_var")
    check(bwd["dx"], want["dx"], RTOL, "dx")
    for key in ("dweight", "dbias"):
        if want[key] is None:
            assert bwd[key] is None, key
        else:
            check(bwd[key], want[key], RTOL, key)


@pytest.mark.parametrize("activation", ref.ACTIVATIONS)
def test_backward_recovers_forward_intermediates(activation):
    """y and xhat recovered from z alone equal the forward's own y and (x - mean) * invstd."""
    case = make_case((5, 3, 4), True, True, seed=3)
    param = ACT_PARAM[activation]
    fwd, bwd = reference_case(case, True, activation, param)
    xhat = (case["x"] - fwd["mean"][None, :, None]) * fwd["invstd"][None, :, None]
    gam = ref.gamma(case["weight"], EPS, 3)[None, :, None]
    check(bwd["xhat"], xhat, 1e-12, "xhat")
    check(bwd["y"], gam * xhat + case["bias"][None, :, None], 1e-12, "y")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_nsc_layout_is_a_transpose(training):
    case = make_case((3, 4, 5), True, True, seed=5)
    fwd, bwd = reference_case(case, training, "elu", 0.7)
    x_nsc = case["x"].transpose(0, 2, 1).copy()
    fwd2 = ref.forward(x_nsc, case["weight"], case["bias"], case["rm"], case["rv"],
                       training=training, momentum=MOMENTUM, eps=EPS, activation="elu",
                       param=0.7, layout="nsc")
    assert fwd2["z"].shape == x_nsc.shape
    check(fwd2["z"], fwd["z"].transpose(0, 2, 1), 0.0, "z")
    bwd2 = ref.backward(fwd2["z"], case["dz"].transpose(0, 2, 1), fwd2["invstd"], fwd2["count"],
                        case["weight"], case["bias"], training=training, eps=EPS,
                        activation="elu", param=0.7, layout="nsc")
    check(bwd2["dx"], bwd["dx"].transpose(0, 2, 1), 1e-14, "dx")


# ------------------------------------------------------------------------------ activations
@pytest.mark.parametrize("param", [0.3, 1.0, 2.5])
def test_elu_inverse_finite_at_and_below_asymptote(param):
    """The official package's ELU inverse gave NaN/-inf for z <= -p; ours must stay finite."""
    z = np.array([-param, -param * (1 + 1e-16), -param * 1.001, -2 * param, -1e30, -np.inf])
    y = ref.act_inverse("elu", z[:-1], param)
    assert np.all(np.isfinite(y)), y
    # the clamp lands at the documented floor, log(2^-24), not somewhere odd
    np.testing.assert_allclose(y, np.log(2.0**-24), rtol=1e-6)
    slope = ref.act_derivative("elu", z[:-1], param)
    assert np.all(np.isfinite(slope)) and np.all(slope >= 0)


@pytest.mark.parametrize("activation", ref.ACTIVATIONS)
@pytest.mark.parametrize("param", [0.01, 0.5, 1.0, 3.0])
def test_inverse_of_forward_is_identity(activation, param):
    y = np.concatenate([np.linspace(-8, 8, 1001), [0.0, -0.0, 1e-300, -1e-300]])
    z = ref.act_forward(activation, y, param)
    check(ref.act_inverse(activation, z, param), y, 1e-9, "act_inverse(act_forward(y))")


@pytest.mark.parametrize("activation", ["leaky_relu", "elu"])
def test_derivative_from_z_matches_torch(activation):
    param = 0.7
    y = torch.linspace(-6, 6, 601, dtype=torch.float64, requires_grad=True)
    z = F.leaky_relu(y, param) if activation == "leaky_relu" else F.elu(y, param)
    z.sum().backward()
    got = ref.act_derivative(activation, z.detach().numpy(), param)
    check(got, y.grad.numpy(), 1e-12, "act_derivative")


@pytest.mark.parametrize("activation,param", [("leaky_relu", 0.0), ("elu", -1.0), ("relu", 1.0)])
def test_bad_activation_rejected(activation, param):
    with pytest.raises(ValueError):
        ref.act_forward(activation, np.zeros(3), param)


# ---------------------------------------------------------------------------------- merge
def _split(x, sizes):
    edges = np.cumsum([0] + list(sizes))
    return [x[a:b] for a, b in zip(edges[:-1], edges[1:])]


@pytest.mark.parametrize("sizes", [[10], [3, 7], [0, 10], [10, 0], [2, 0, 0, 5, 0, 3],
                                   [1] * 10, [0, 1, 0, 9, 0]], ids=str)
def test_merge_of_splits_equals_concatenation(sizes):
    rng = np.random.default_rng(len(sizes))
    x = rng.normal(3.0, 0.5, size=(10, 4, 3)) + rng.normal(size=(1, 4, 1)) * 100
    partials = ref.stats_of_pieces(_split(x, sizes))
    empty = partials[:, 0, 0] == 0
    partials[empty, 1:] = np.nan  # garbage in empty pieces must never reach the result
    merged = merge_partials(partials, xp=np)
    count, mean, var = ref.batch_stats(x)
    assert merged.shape == (3, 4)
    np.testing.assert_array_equal(merged[0], count)
    check(merged[1], mean, 1e-13, "mean")
    check(merged[2], var, 1e-12, "var")


def test_merge_all_empty_gives_zeros_not_nan():
    partials = np.full((3, 3, 5), np.nan)
    partials[:, 0] = 0
    with np.errstate(all="raise"):  # not even a 0/0 evaluated behind a mask
        merged = merge_partials(partials)
    np.testing.assert_array_equal(merged, np.zeros((3, 5)))


def test_merge_is_order_fixed_and_per_channel_counts():
    """Counts may differ per channel; the result is deterministic for a given order."""
    rng = np.random.default_rng(9)
    partials = np.stack([np.stack([rng.integers(0, 5, 6).astype(float), rng.normal(size=6),
                                   rng.uniform(size=6)]) for _ in range(7)])
    a = merge_partials(partials)
    np.testing.assert_array_equal(a, merge_partials(partials.copy()))
    for ch in range(6):  # per channel: merge equals the closed form over the pieces
        n, mu, var = partials[:, 0, ch], partials[:, 1, ch], partials[:, 2, ch]
        tot = n.sum()
        if tot == 0:
            assert a[0, ch] == 0 and a[1, ch] == 0 and a[2, ch] == 0
            continue
        mean = (n * mu).sum() / tot
        check(a[1, ch], mean, 1e-13, "mean")
        check(a[2, ch], (n * (var + (mu - mean) ** 2)).sum() / tot, 1e-13, "var")


def test_merge_rejects_bad_shape():
    with pytest.raises(ValueError):
        merge_partials(np.zeros((2, 4, 3)))


# ----------------------------------------------------------------- the checks can fail
_RUNNING_UPDATE = ref.running_update  # the genuine one, before any monkeypatching


def _swapped_momentum(rm, rv, mean, var, count, momentum):
    return _RUNNING_UPDATE(rm, rv, mean, var, count, 1.0 - momentum)


def _biased_running_var(rm, rv, mean, var, count, momentum):
    return _RUNNING_UPDATE(rm, rv, mean, var, 1e300, momentum)  # m/(m-1) -> 1


@pytest.mark.parametrize("planted", [_swapped_momentum, _biased_running_var],
                         ids=["swapped_momentum", "biased_var"])
def test_planted_running_stats_error_is_detected(planted, monkeypatch):
    case = make_case((4, 3, 5), True, True)
    want = torch_oracle(case, True, "identity", 0.0)
    monkeypatch.setattr(ref, "running_update", planted)
    fwd, _ = reference_case(case, True, "identity", 0.0)
    with pytest.raises(AssertionError):
        check(fwd["running_mean"], want["running_mean"], RTOL, "running_mean")
        check(fwd["running_var"], want["running_var"], RTOL, "running_var")


def test_planted_dx_error_is_detected():
    """Dropping the mean-of-dy term of dx (a classic slip) must fail the dx comparison."""
    case = make_case((4, 3, 5), True, True)
    want = torch_oracle(case, True, "elu", 0.7)
    fwd, bwd = reference_case(case, True, "elu", 0.7)
    gam = ref.gamma(case["weight"], EPS, 3)
    wrong = ref.input_grad(bwd["dy"], bwd["xhat"], gam, fwd["invstd"], fwd["count"],
                           np.zeros(3), bwd["sum_dy_xhat"], True)
    check(bwd["dx"], want["dx"], RTOL, "dx")
    with pytest.raises(AssertionError):
        check(wrong, want["dx"], RTOL, "dx")


def test_rel_error_flags_nan_and_shape():
    assert ref.rel_error([1.0, np.nan], [1.0, 2.0]) == float("inf")
    assert ref.rel_error(np.zeros(3), np.zeros(4)) == float("inf")
    assert ref.rel_error([1.0, 2.0], [1.0, 2.0]) == 0.0
    assert ref.rel_error([0.0, 1e-3], [0.0, 0.0]) == 1e-3

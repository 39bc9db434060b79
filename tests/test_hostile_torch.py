"""Hostile input through iabn.torch: tensors the op may not write in place are refused before
any write (IABNError naming the tensor), never by PyTorch after the kernels have written."""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

torch = pytest.importorskip("torch")

from iabn.torch import InPlaceABN, inplace_abn  # noqa: E402
from iabn_core import reference as ref  # noqa: E402
from iabn_core.validate import IABNError  # noqa: E402
from iabn_core.verify import TOL  # noqa: E402

C = 3


def _inference(t):
    with torch.inference_mode():
        return t.clone()


def refused_unchanged(match, fn, *tensors):
    before = [t.detach().clone() for t in tensors]
    with pytest.raises(IABNError, match=match):
        fn()
    for b, t in zip(before, tensors):
        assert torch.equal(b, t.detach()), "a refused call wrote to a tensor"


# ----------------------------------------------------------------- reproducer 2 and kin
def test_inference_input_outside_inference_mode_is_refused_before_writing():
    t = _inference(torch.randn(2, C, 4))
    m = InPlaceABN(C)
    refused_unchanged("^x is an inference tensor", lambda: m(t), t, m.running_mean,
                      m.running_var)
    assert int(m.num_batches_tracked) == 0
    with torch.inference_mode():
        m(t)  # inside inference mode it is an ordinary in-place update
    assert int(m.num_batches_tracked) == 1


def test_inference_running_stats_read_in_eval_refused_in_training():
    rm, rv = _inference(torch.zeros(C)), _inference(torch.ones(C))
    x = torch.randn(2, C, 4)
    inplace_abn(x.clone(), None, None, rm, rv, training=False)
    refused_unchanged("^running_mean is an inference tensor",
                      lambda: inplace_abn(x, None, None, rm, rv, training=True), x, rm, rv)


def test_inference_weight_refused_only_when_autograd_would_save_it():
    w = _inference(torch.ones(C))
    x = torch.randn(2, C, 4)
    inplace_abn(x.clone(), w, None, None, None)  # nothing to save: fine
    a = torch.randn(2, C, 4, requires_grad=True)
    y = a * 1
    refused_unchanged("^weight is an inference tensor", lambda: inplace_abn(y, w, None, None, None),
                      y)


@pytest.mark.parametrize("make,match", [
    (lambda a: (a * 1).chunk(2)[0], "returned by a function that returns several views"),
    (lambda a: (a * 1).unbind(0)[0].unsqueeze(0), "returned by a function that returns several"),
    (lambda a: _no_grad_view(a * 1), "created under torch.no_grad"),
    (lambda a: _inference_mode_view(a * 1), "created under torch.inference_mode"),
])
def test_views_autograd_cannot_rebase_are_refused(make, match):
    a = torch.randn(4, C, 5, requires_grad=True)
    w = torch.ones(C, requires_grad=True)
    x = make(a)
    refused_unchanged(f"^x is a view {match}", lambda: inplace_abn(x, w, None, None, None), x)
    with torch.no_grad():  # nothing recorded: the same view may be updated in place
        inplace_abn(make(a.detach()), w, None, None, None)


def _no_grad_view(t):
    with torch.no_grad():
        return t[:2]


def _inference_mode_view(t):
    with torch.inference_mode():
        return t[:2]


def test_lazy_negation_and_sparse_tensors_are_refused():
    x = torch.randn(2, C, 4)
    refused_unchanged("^x has its negative or conjugate bit set",
                      lambda: inplace_abn(torch._neg_view(x), None, None, None, None), x)
    with pytest.raises(IABNError, match="^x has layout torch.sparse_coo"):
        inplace_abn(torch.randn(4, C).to_sparse(), None, None, None, None)


# ------------------------------------------------------------------------ property test
X_KINDS = ("plain", "inference", "chunk_view", "no_grad_view", "inference_view", "leaf_grad",
           "nonleaf_grad", "neg")
MODES = ("grad", "no_grad", "inference_mode")


def _make_x(kind, base):
    if kind == "inference":
        return _inference(base)
    if kind == "leaf_grad":
        return base.clone().requires_grad_()
    if kind == "neg":
        return torch._neg_view(base.neg())
    g = base.clone().requires_grad_() * 1
    if kind == "nonleaf_grad":
        return g
    if kind == "chunk_view":
        return torch.cat([g, g]).chunk(2)[0]
    if kind == "no_grad_view":
        return _no_grad_view(torch.cat([g, g]))
    if kind == "inference_view":
        return _inference_mode_view(torch.cat([g, g]))
    return base.clone()


def _make_vec(kind, values):
    if kind is None:
        return None
    t = torch.tensor(values, dtype=torch.float32)
    return {"plain": t, "param": torch.nn.Parameter(t), "inference": _inference(t)}[kind]


@settings(max_examples=80, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(x_kind=st.sampled_from(X_KINDS), w_kind=st.sampled_from([None, "plain", "param",
                                                                 "inference"]),
       rs_kind=st.sampled_from([None, "plain", "inference"]), mode=st.sampled_from(MODES),
       training=st.booleans(), seed=st.integers(0, 2**16))
def test_random_torch_calls_are_refused_cleanly_or_correct(x_kind, w_kind, rs_kind, mode,
                                                           training, seed):
    rng = np.random.default_rng(seed)
    base = torch.tensor(rng.normal(size=(2, C, 4)), dtype=torch.float32)
    x = _make_x(x_kind, base)
    w = _make_vec(w_kind, rng.uniform(0.5, 1.5, C))
    rm = _make_vec(rs_kind, rng.normal(size=C))
    rv = _make_vec(rs_kind, rng.uniform(0.5, 2.0, C))
    if not training and rm is None:
        training = True
    watched = [t for t in (x, rm, rv) if t is not None]
    before = [t.detach().clone() for t in watched]
    ctx = {"grad": contextlib.nullcontext(), "no_grad": torch.no_grad(),
           "inference_mode": torch.inference_mode()}[mode]
    try:
        with ctx:
            out = inplace_abn(x, w, None, rm, rv, training=training)
    except IABNError as err:
        assert any(name in str(err) for name in ("x ", "weight", "running_")), err
        for b, t in zip(before, watched):
            assert torch.equal(b, t.detach()), f"refused call wrote: {err}"
        return
    x0 = before[0].double().numpy()
    exp = ref.forward(x0.reshape(2, C, 4), None if w is None else w.detach().double().numpy(),
                      None, None if rm is None else before[1].double().numpy(),
                      None if rv is None else before[2].double().numpy(), training=training,
                      activation="leaky_relu", param=0.01)
    assert ref.rel_error(out.detach().double().numpy(), exp["z"]) <= TOL["float32"] * 4
    if out.requires_grad:  # autograd recorded the call: backward must work too
        out.backward(torch.ones_like(out))

"""What a user replacing nn.BatchNorm expects of the modules (issue 23): partial state_dict
loads keep the module's count, bias=False and torch's factory arguments, hyperparameters
refused at construction, a residual the add would refuse changes nothing, ABN scripts and
traces, and the inplace_abn stand-in looks like a real package."""
from __future__ import annotations

import math
import os
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import iabn.torch as it
from iabn.torch import IABNError

CLASSES = (it.ABN, it.InPlaceABN, it.InPlaceABNSync)


def _quiet(m, *args):
    """m(*args) without the sync fallback warning (no torch.distributed here)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", it.SyncFallbackWarning)
        return m(*args)


# ---------------------------------------------------------------- item 2: partial loads
@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("metadata", ["plain dict", "version 2", "version 1"])
def test_load_without_num_batches_tracked_keeps_own_count_like_batchnorm(cls, metadata):
    src = nn.BatchNorm2d(3)
    with torch.no_grad():
        src.running_mean.uniform_(-1, 1)
    sd = src.state_dict()
    del sd["num_batches_tracked"]
    if metadata == "plain dict":
        sd = dict(sd)  # no _metadata at all: version None
    else:
        sd._metadata[""]["version"] = int(metadata[-1])
    ours, bn = cls(3, momentum=None), nn.BatchNorm2d(3, momentum=None)
    ours.num_batches_tracked.fill_(4)
    bn.num_batches_tracked.fill_(4)
    ours.load_state_dict(sd, strict=False)  # load_state_dict copies it, _metadata included
    bn.load_state_dict(sd, strict=False)
    assert int(ours.num_batches_tracked) == int(bn.num_batches_tracked) == 4
    # momentum=None: the next batch gets weight 1/5 in both, not 1 (a reset count)
    x = torch.randn(4, 3, 2, 2)
    _quiet(ours.train(), x.clone())
    bn.train()(x)
    torch.testing.assert_close(ours.running_mean, bn.running_mean)
    assert int(ours.num_batches_tracked) == 5


@pytest.mark.parametrize("cls", CLASSES)
def test_strict_load_still_reports_the_missing_count(cls):
    sd = cls(3).state_dict()
    del sd["num_batches_tracked"]
    with pytest.raises(RuntimeError, match="num_batches_tracked"):
        cls(3).load_state_dict(sd)


# ------------------------------------------------------ item 7: bias=False, device=, dtype=
@pytest.mark.parametrize("cls", CLASSES)
def test_bias_false_matches_batchnorm_without_bias(cls):
    torch.manual_seed(0)
    m = cls(3, bias=False, activation="identity")
    bn = nn.BatchNorm2d(3, bias=False).double()
    m = m.double()
    assert m.bias is None and m.weight is not None
    assert list(m.state_dict()) == list(bn.state_dict())
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        bn.weight.copy_(m.effective_weight())
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = _quiet(m, xa * 1)  # a non-leaf: the in-place classes overwrite their input
    ref = bn(xb)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad)
    dw = m.weight.grad
    if cls is not it.ABN:  # gamma = |w| + eps: chain rule through |w|
        dw = dw * torch.sign(m.weight.detach())
    torch.testing.assert_close(dw, bn.weight.grad)
    torch.testing.assert_close(m.running_var, bn.running_var)
    assert "bias=False" in repr(m)


def test_from_batchnorm_without_bias():
    bn = nn.BatchNorm2d(3, bias=False).eval()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
        bn.running_mean.copy_(torch.tensor([0.1, -0.2, 0.3]))
    m = it.from_batchnorm(bn, "identity")
    assert m.bias is None
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(m(x.clone()), bn(x))


@pytest.mark.parametrize("cls", CLASSES)
def test_factory_arguments_like_batchnorm(cls):
    m = cls(3, dtype=torch.float64, device="cpu")
    bn = nn.BatchNorm2d(3, dtype=torch.float64, device="cpu")
    for k, v in bn.state_dict().items():
        assert m.state_dict()[k].dtype == v.dtype and m.state_dict()[k].device == v.device, k
    meta = cls(3, device="meta")
    assert all(t.device.type == "meta" for t in meta.state_dict().values())


# ------------------------------------------------------------ item 8: hyperparameters
BAD = [("eps", 0.0), ("eps", -1.0), ("eps", math.nan), ("eps", math.inf), ("eps", "1e-5"),
       ("momentum", 2.0), ("momentum", -0.1), ("momentum", math.nan), ("momentum", "0.1"),
       ("num_features", 0), ("num_features", -3), ("num_features", 2.5),
       ("num_features", True), ("activation_param", math.nan), ("activation", "gelu")]


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("name,value", BAD)
def test_bad_hyperparameters_are_refused_at_construction(cls, name, value):
    kw = dict(num_features=3)
    kw[name] = value
    with pytest.raises(ValueError, match=name):  # IABNError is a ValueError
        cls(**kw)


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("momentum", [None, 0, 0.0, 1, 1.0, 0.5])
def test_momentum_edges_and_none_are_accepted(cls, momentum):
    assert cls(3, momentum=momentum).momentum == momentum


def test_abn_momentum_two_never_trains_to_negative_variance():
    """The reported case: ABN(momentum=2.0) trained and left running_var at -0.046."""
    with pytest.raises(IABNError, match=r"momentum must be in \[0, 1\]"):
        it.ABN(3, momentum=2.0)


# ---------------------------------------------------- item 5: residual checked up front
def _bad_residuals(x):
    return {"complex64": torch.zeros(x.shape, dtype=torch.complex64),
            "broadcast": torch.zeros(x.shape[0], x.shape[1], 1, 1),
            "meta device": torch.zeros(x.shape, device="meta"),
            "a list": [[0.0]]}


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("kind", ["complex64", "broadcast", "meta device", "a list"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_residual_the_add_would_refuse_changes_nothing(cls, kind, momentum):
    torch.manual_seed(0)
    m = cls(3, momentum=momentum)
    x = torch.randn(2, 3, 4, 4)
    keep = [t.clone() for t in (x, m.running_mean, m.running_var, m.num_batches_tracked)]
    with pytest.raises((IABNError, TypeError), match="residual"):
        _quiet(m, x, _bad_residuals(x)[kind])
    for before, now in zip(keep, (x, m.running_mean, m.running_var, m.num_batches_tracked)):
        assert torch.equal(before, now)


def test_abn_accepts_a_residual_the_add_promotes_into_y():
    """float64 or int residuals into a float32 y: the in-place add casts them, as y + r
    followed by a cast would; only what it refuses is refused up front."""
    x = torch.randn(2, 3, 4)
    for r in (torch.ones(2, 3, 4, dtype=torch.float64), torch.ones(2, 3, 4, dtype=torch.int32)):
        torch.testing.assert_close(it.ABN(3, activation="identity")(x, r),
                                   F.batch_norm(x, None, None, training=True) + 1)


# ------------------------------------------------------- item 9: TorchScript, tracing
ABN_CASES = [dict(), dict(activation="relu"), dict(activation="elu", activation_param=0.5),
             dict(activation="identity", momentum=None), dict(affine=False),
             dict(track_running_stats=False), dict(bias=False, activation_param=0.2)]


def _pair(kw):
    torch.manual_seed(0)
    eager = it.ABN(8, **kw)
    if eager.weight is not None:
        with torch.no_grad():
            eager.weight.uniform_(-1, 1)
    other = it.ABN(8, **kw)
    other.load_state_dict(eager.state_dict())
    return eager, other, [torch.randn(4, 8, 3, 3) for _ in range(3)], torch.randn(4, 8, 3, 3)


def _same_state(a, b):
    for k, v in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[k], v, msg=k)


@pytest.mark.parametrize("kw", ABN_CASES, ids=str)
def test_abn_scripts_like_eager(kw):
    eager, other, xs, r = _pair(kw)
    comp = torch.jit.script(other)
    for train in (True, False):
        eager.train(train)
        comp.train(train)
        for x in xs:
            torch.testing.assert_close(comp(x.clone(), r), eager(x.clone(), r))
            torch.testing.assert_close(comp(x.clone()), eager(x.clone()))  # residual optional
        _same_state(eager, comp)


TRACE_CASES = [(kw, train) for kw in ABN_CASES for train in (True, False)
               # momentum=None's 1/(n+1) becomes a constant of the trace, as in a trace of
               # nn.BatchNorm: only its eval trace can match eager over several steps
               if train is False or kw.get("momentum", 0.1) is not None]


# torch's own F.batch_norm warns when traced in training (nn.BatchNorm2d's trace does too)
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("kw,train", TRACE_CASES, ids=str)
def test_abn_traces_like_eager(kw, train):
    """A trace fixes the mode it was traced in, as nn.BatchNorm's does."""
    eager, other, xs, r = _pair(kw)
    eager.train(train)
    comp = torch.jit.trace(other.train(train), (xs[0].clone(), r), check_trace=False)
    eager.load_state_dict({k: v.clone() for k, v in other.state_dict().items()})  # one step ran
    for x in xs:
        torch.testing.assert_close(comp(x.clone(), r), eager(x.clone(), r))
    _same_state(eager, comp)


# --------------------------------------------- item 11: the stand-in looks like a package
@pytest.fixture
def registered():
    saved = {n: m for n, m in sys.modules.items() if n.split(".")[0] == "inplace_abn"}
    for n in saved:
        del sys.modules[n]
    try:
        yield it.register_inplace_abn(force=True)
    finally:
        for n in [n for n in sys.modules if n.split(".")[0] == "inplace_abn"]:
            del sys.modules[n]
        sys.modules.update(saved)


def test_registered_modules_have_real_module_attributes(registered):
    import inplace_abn

    print(inplace_abn.__file__)  # what timm's own check does
    for name in ("inplace_abn", "inplace_abn.abn", "inplace_abn.functions",
                 "inplace_abn.group"):
        mod = sys.modules[name]
        assert os.path.isfile(mod.__file__), name
        assert mod.__spec__.name == name and mod.__spec__.origin == mod.__file__
        assert mod.__spec__.has_location and hasattr(mod, "__loader__")
        # the file named is iabn's, and it defines what the stand-in serves
        for attr in mod.__all__:
            src = sys.modules[getattr(mod, attr).__module__].__file__
            assert os.path.dirname(src) == os.path.dirname(mod.__file__)
    assert inplace_abn.__path__ == [] and inplace_abn.__spec__.submodule_search_locations == []
    assert sys.modules["inplace_abn.functions"].__file__ == sys.modules[
        it.inplace_abn.__module__].__file__

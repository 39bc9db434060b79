"""Code written for the official `inplace_abn` runs unchanged on iabn (issue 10):
register_inplace_abn(), the official class hierarchy and warning class, models in the official
scripts' style trained against BatchNorm + activation, and timm's InplaceAbn layer.

register_inplace_abn() writes to sys.modules, which is global: every test that touches it
uses the `clean_modules` fixture, which hides any inplace_abn (and timm) modules for the test
and restores sys.modules as it was afterwards.
"""
from __future__ import annotations

import importlib
import importlib.util
import pickle
import sys
import warnings
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import iabn.torch as it
from iabn.torch import IABNError
from iabn_core.reference import rel_error

# The public names of the official package's modules (inplace_abn 1.1: __init__.py, abn.py,
# functions.py `__all__`, group.py), the contract register_inplace_abn() serves.
OFFICIAL = {
    "inplace_abn": {"ABN", "InPlaceABN", "InPlaceABNSync", "active_group", "set_active_group"},
    "inplace_abn.abn": {"ABN", "InPlaceABN", "InPlaceABNSync", "inplace_abn",
                        "inplace_abn_sync"},
    "inplace_abn.functions": {"inplace_abn", "inplace_abn_sync"},
    "inplace_abn.group": {"active_group", "set_active_group"},
}
_HIDDEN = ("inplace_abn", "timm", "inplace_abn_models", "fake_inplace_abn_probe")


def _ours(name: str) -> bool:
    return name.split(".")[0] in _HIDDEN


@pytest.fixture
def clean_modules():
    saved = {n: m for n, m in sys.modules.items() if _ours(n)}
    for n in saved:
        del sys.modules[n]
    try:
        yield
    finally:
        for n in [n for n in sys.modules if _ours(n)]:
            del sys.modules[n]
        sys.modules.update(saved)


def _register():
    # force only where a real official package is installed here (it would be shadowed)
    return it.register_inplace_abn(force=importlib.util.find_spec("inplace_abn") is not None)


@pytest.fixture
def fake_official(tmp_path, monkeypatch):
    """A directory holding a package named inplace_abn, put on sys.path (an 'installed'
    official package as importlib sees it)."""
    pkg = tmp_path / "inplace_abn"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("ORIGIN = 'fake official package'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return pkg


# ------------------------------------------------------------------- register_inplace_abn
def test_register_serves_every_official_public_name(clean_modules):
    pkg = _register()
    import inplace_abn
    import inplace_abn.abn
    import inplace_abn.functions
    import inplace_abn.group
    from inplace_abn import abn, functions, group

    assert inplace_abn is pkg and (abn, functions, group) == (
        inplace_abn.abn, inplace_abn.functions, inplace_abn.group)
    for name, public in OFFICIAL.items():
        mod = sys.modules[name]
        assert isinstance(mod, type(sys)) and set(mod.__all__) == public, name
        for attr in public:
            assert getattr(mod, attr) is getattr(it, attr), f"{name}.{attr}"
    ns: dict = {}
    exec("from inplace_abn.functions import *", ns)
    assert ns["inplace_abn"] is it.inplace_abn and ns["inplace_abn_sync"] is it.inplace_abn_sync
    assert importlib.util.find_spec("inplace_abn.functions") is not None
    # whole-model pickles made with the official package name their classes this way
    assert pickle.loads(b"cinplace_abn.abn\nInPlaceABNSync\n.") is it.InPlaceABNSync
    with pytest.raises(ModuleNotFoundError):  # the compiled backend has no iabn equivalent
        importlib.import_module("inplace_abn._backend")


def test_register_is_idempotent_and_repairs(clean_modules):
    pkg = _register()
    functions = sys.modules["inplace_abn.functions"]
    assert _register() is pkg and sys.modules["inplace_abn.functions"] is functions
    del sys.modules["inplace_abn.group"]  # e.g. a test harness that pruned sys.modules
    assert _register() is pkg and sys.modules["inplace_abn.group"] is pkg.group


def test_register_refuses_when_another_inplace_abn_is_imported(clean_modules, fake_official):
    import inplace_abn

    assert inplace_abn.ORIGIN == "fake official package"
    before = dict(sys.modules)
    for force in (False, True):
        with pytest.raises(IABNError, match="already imported.*before anything imports"):
            it.register_inplace_abn(force=force)
    assert sys.modules["inplace_abn"] is inplace_abn and dict(sys.modules) == before


def test_register_shadows_an_installed_package_only_with_force(clean_modules, fake_official):
    with pytest.raises(IABNError, match="installed.*force=True"):
        it.register_inplace_abn()
    assert "inplace_abn" not in sys.modules
    pkg = it.register_inplace_abn(force=True)
    import inplace_abn

    assert inplace_abn is pkg and not hasattr(inplace_abn, "ORIGIN")
    assert it.register_inplace_abn() is pkg  # already ours: no second refusal


def test_register_respects_blocked_imports(clean_modules):
    sys.modules["inplace_abn"] = None
    with pytest.raises(IABNError, match="blocked"):
        it.register_inplace_abn()
    assert sys.modules["inplace_abn"] is None
    assert it.register_inplace_abn(force=True) is sys.modules["inplace_abn"]


# ------------------------------------------------------------- hierarchy, warning, groups
def test_sync_class_hierarchy_matches_official():
    assert issubclass(it.InPlaceABNSync, it.ABN)
    assert not issubclass(it.InPlaceABNSync, it.InPlaceABN)
    assert set(it.IN_PLACE_MODULES) == {it.InPlaceABN, it.InPlaceABNSync}
    with pytest.raises(IABNError, match="relu.*not invertible"):  # still in place
        it.InPlaceABNSync(3, activation="relu")
    m = it.InPlaceABNSync(3)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([-2.0, 0.0, 3.0]))
    torch.testing.assert_close(m.effective_weight(), m.weight.abs() + m.eps)
    group = object()  # convert_model(sync=True) still hands existing sync layers the group
    assert it.convert_model(nn.Sequential(m), sync=True, group=group)[0].group is group


@pytest.mark.parametrize("training", [True, False])
def test_sync_fallback_warns_runtimewarning_in_train_and_eval(training):
    assert issubclass(it.SyncFallbackWarning, RuntimeWarning)
    torch.manual_seed(0)
    x = torch.randn(2, 4, 3, 3)
    m = it.InPlaceABNSync(4).train(training)
    with pytest.warns(RuntimeWarning, match="not initialised"):
        out = m(x.clone())
    torch.testing.assert_close(out, it.InPlaceABN(4).train(training)(x.clone()))


def test_set_active_group_reaches_every_sync_layer():
    net = nn.Sequential(it.InPlaceABNSync(3), nn.Sequential(it.InPlaceABNSync(3)),
                        it.InPlaceABN(3))
    group = object()
    it.set_active_group(net, group)
    assert net[0].group is group and net[1][0].group is group
    assert not hasattr(net[2], "group")


def test_active_group_single_process():
    dist = torch.distributed
    with pytest.raises(IABNError, match="init_process_group"):
        it.active_group(True)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        assert it.active_group(True) is dist.group.WORLD
        assert it.active_group(False) is None
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------- official-style models
class _AbsPlusEps(torch.autograd.Function):
    """gamma = |w| + eps, with d|w|/dw = +1 at w = 0 (the official convention): lets a
    BatchNorm reference follow iabn's parametrization through zero and negative weights."""

    @staticmethod
    def forward(ctx, w, eps):
        ctx.save_for_backward(w)
        return w.abs() + eps

    @staticmethod
    def backward(ctx, g):
        (w,) = ctx.saved_tensors
        return torch.where(w < 0, -g, g), None


class BNAct(nn.BatchNorm2d):
    """Standard BatchNorm followed by the activation, with the official modules' attributes
    (so `m.activation = "identity"` works on it too). in_place=True: its scale is
    |weight| + eps, InPlaceABN's; else `weight` itself, ABN's."""

    def __init__(self, c, activation="leaky_relu", activation_param=0.01, in_place=True):
        super().__init__(c)
        self.activation, self.activation_param, self.in_place = (activation, activation_param,
                                                                  in_place)

    def forward(self, x):
        w = _AbsPlusEps.apply(self.weight, self.eps) if self.in_place else self.weight
        if self.training:
            self.num_batches_tracked.add_(1)
        y = F.batch_norm(x, self.running_mean, self.running_var, w, self.bias, self.training,
                         self.momentum, self.eps)
        if self.activation == "leaky_relu":
            return F.leaky_relu(y, self.activation_param)
        if self.activation == "elu":
            return F.elu(y, self.activation_param)
        return y


def _pair(kind, norm):
    """(model through `inplace_abn` imports, the same model with BNAct, its zero weights)."""
    inplace_abn = importlib.import_module("inplace_abn")
    models = importlib.import_module("inplace_abn_models")
    act = dict(activation="leaky_relu", activation_param=0.01)
    torch.manual_seed(0)
    model = models.Net(kind, partial(getattr(inplace_abn, norm), **act)).double()
    ref = models.Net(kind, partial(BNAct, in_place=norm == "InPlaceABN", **act)).double()
    ref.load_state_dict(model.state_dict())  # the same keys as nn.BatchNorm2d
    zeros = {n: (p == 0).clone() for n, p in model.named_parameters() if n.endswith("weight")
             and p.dim() == 1 and bool((p == 0).any())}
    return model, ref, zeros


TOL = 1e-8  # float64; gamma = eps at zero weights amplifies rounding 1e5-fold in xhat


# ABN is torch's own batch_norm: one memory format is enough for it.
@pytest.mark.parametrize("norm,fmt", [("InPlaceABN", torch.contiguous_format),
                                      ("InPlaceABN", torch.channels_last),
                                      ("ABN", torch.contiguous_format)],
                         ids=["InPlaceABN-nchw", "InPlaceABN-channels_last", "ABN-nchw"])
@pytest.mark.parametrize("kind", ["preact_resnet", "resnext_zero_init_last", "densenet",
                                  "deeplabv3"])
def test_official_style_models_train_like_batchnorm(clean_modules, kind, norm, fmt):
    _register()
    model, ref, zeros = _pair(kind, norm)
    model, ref = model.to(memory_format=fmt), ref.to(memory_format=fmt)
    assert sum(isinstance(m, it.ABN) for m in model.modules()) >= 4
    assert (kind == "resnext_zero_init_last") == bool(zeros)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 12, 12, generator=g, dtype=torch.float64)
    x = x.contiguous(memory_format=fmt)
    with torch.no_grad():
        target = torch.randn_like(model(x.clone()))
    model.load_state_dict(ref.state_dict())  # undo that forward's running-stat update
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (model, ref)]
    params = dict(ref.named_parameters())
    for step in range(3):
        losses = []
        for m, opt in zip((model, ref), opts):
            opt.zero_grad()
            loss = F.mse_loss(m(x.clone()), target)
            loss.backward()
            losses.append(loss.item())
        assert rel_error(losses[0], losses[1]) <= TOL, (step, losses)
        for name, p in model.named_parameters():
            assert rel_error(p.grad.numpy(), params[name].grad.numpy()) <= TOL, (step, name)
        for opt in opts:
            opt.step()
    for name, want in ref.state_dict().items():
        got = model.state_dict()[name]
        assert rel_error(got.double().numpy(), want.double().numpy()) <= TOL, name
    for name, was_zero in zeros.items():  # zero_init_last weights left zero and train
        assert torch.all(dict(model.named_parameters())[name][was_zero] != 0), name
    model.eval(), ref.eval()
    with torch.no_grad():
        assert rel_error(model(x.clone()).numpy(), ref(x.clone()).numpy()) <= TOL


# ---------------------------------------------------------------------------------- timm
def _import_timm():
    try:
        return importlib.import_module("timm")
    except Exception as exc:  # ImportError, or torchvision failing to load its operators
        pytest.skip(f"timm cannot be imported here ({type(exc).__name__}: {exc}); timm needs "
                    "torchvision, whose PyPI wheels do not load beside the CPU torch build")


@pytest.mark.parametrize("act_layer", ["leaky_relu", nn.ELU, "identity"])
def test_timm_inplace_abn_layer_runs_on_iabn(clean_modules, act_layer):
    """timm's InplaceAbn imports `inplace_abn.functions`; after register_inplace_abn() it
    runs on iabn, and matches BatchNorm + the activation, zero-initialised weights included."""
    _register()
    with warnings.catch_warnings():  # timm's own import-time deprecation notices
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        _import_timm()
        timm_iabn = importlib.import_module("timm.layers.inplace_abn")
    assert timm_iabn.has_iabn and timm_iabn.inplace_abn is it.inplace_abn
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    c = 6
    layer = timm_iabn.InplaceAbn(c, act_layer=act_layer, act_param=0.1)
    name = layer.act_name
    ref = BNAct(c, activation=name, activation_param=layer.act_param)
    conv_a = nn.Conv2d(3, c, 3, padding=1, bias=False)  # a bias before BN gets only noise
    conv_b = nn.Conv2d(3, c, 3, padding=1, bias=False)
    conv_b.load_state_dict(conv_a.state_dict())
    net = nn.Sequential(conv_a, layer).double().to(device)
    ref_net = nn.Sequential(conv_b, ref).double().to(device)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([0.0, 0.0, 0.5, -0.5, 1.0, 2.0]))  # zero-initialised too
        ref.weight.copy_(layer.weight)
        layer.bias.uniform_(-0.5, 0.5)
        ref.bias.copy_(layer.bias)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64, device=device)
    t = torch.randn(4, c, 8, 8, dtype=torch.float64, device=device)
    for m in (net, ref_net):
        F.mse_loss(m(x), t).backward()
    assert torch.all(layer.weight.grad[:2] != 0)
    for a, b in zip(net.parameters(), ref_net.parameters()):
        assert rel_error(a.grad.cpu().numpy(), b.grad.cpu().numpy()) <= TOL
    for stat in ("running_mean", "running_var"):
        assert rel_error(getattr(layer, stat).cpu().numpy(),
                         getattr(ref, stat).cpu().numpy()) <= TOL, stat

"""revert_model / to_batchnorm(model): every ABN / InPlaceABN / InPlaceABNSync back to
BatchNorm -> (add) -> activation, same function in train and eval as the iabn model, same
state_dict keys; the result exports (torch.jit.script/trace, torch.onnx where it imports).
And where torch's exporters meet an in-place layer, the error names revert_model."""
from __future__ import annotations

import copy
import io
import operator
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import iabn.torch as it
import timm_like as tm
import torchvision_like as tv
from iabn.torch import IABNError
from test_torch_convert import SLOPE, assert_same_function, leaky, n_bn, quiet_convert, randomize


def n_abn(model):
    return sum(isinstance(m, it.ABN) for m in model.modules())


def converted_resnet():
    torch.manual_seed(0)
    orig = randomize(tv.resnet("resnet50", leaky, width=4)).double()
    return orig, quiet_convert(copy.deepcopy(orig))


class HandBuilt(nn.Module):
    """Official-style code: iabn layers called by the model's own forward, one with the fused
    residual, one ABN, one InPlaceABNSync, one on (N, C) inputs."""

    def __init__(self):
        super().__init__()
        conv = lambda: nn.Conv2d(4, 4, 1, bias=False)  # noqa: E731 - a bias before BN: grad 0
        self.c1 = nn.Conv2d(3, 4, 1, bias=False)
        self.b1 = it.InPlaceABN(4, activation="elu", activation_param=0.5)
        self.c2, self.b2 = conv(), it.InPlaceABN(4)
        self.c3, self.b3 = conv(), it.ABN(4, activation="relu")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.c4, self.b4 = conv(), it.InPlaceABNSync(4, activation_param=0.2)
        self.fc, self.b5 = nn.Linear(4, 6, bias=False), it.InPlaceABN(6, activation="identity")

    def forward(self, x):
        h = self.b1(self.c1(x))
        h = self.b2(self.c2(h), residual=h)
        h = self.b4(self.c4(self.b3(self.c3(h))))
        return self.b5(self.fc(h.mean((2, 3))))


def hand_built():
    torch.manual_seed(0)
    m = HandBuilt().double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for b in m.modules():
            if isinstance(b, it.ABN):
                b.weight.copy_(torch.rand(b.num_features, generator=g) + 0.5)
                b.bias.copy_(torch.randn(b.num_features, generator=g) * 0.2)
                b.running_mean.copy_(torch.randn(b.num_features, generator=g) * 0.1)
    return m


def loss(y):
    return y.square().mean()


def test_whole_converted_resnet_reverts_fused_layers_included():
    orig, conv = converted_resnet()
    keys = list(conv.state_dict())
    ref = copy.deepcopy(conv)
    rev = it.revert_model(conv)
    assert rev is conv and n_abn(rev) == 0 and n_bn(rev) == n_bn(orig)
    assert list(rev.state_dict()) == keys  # same keys, same order
    nodes = list(rev.graph.nodes)
    assert not any("residual" in n.kwargs for n in nodes)
    # 53 BNs, 4 of them residuals (identity); 16 fused layers are BN -> add -> act again
    assert sum(n.target is F.leaky_relu for n in nodes) == 49
    assert sum(n.target is operator.add for n in nodes) == 16
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    assert_same_function(ref, rev, x, loss)  # eval, then training steps


def test_to_batchnorm_takes_a_whole_model():
    _, conv = converted_resnet()
    ref = copy.deepcopy(conv).eval()
    seq = nn.Sequential(conv)  # a Sequential: a TypeError before
    rev = it.to_batchnorm(seq).eval()
    assert n_abn(rev) == 0
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(rev(x.clone()), ref(x.clone()))
    with pytest.raises(TypeError, match="bn_class applies to a single ABN layer"):
        it.to_batchnorm(seq, nn.BatchNorm2d)


def test_hand_built_model_reverts_by_module_swap():
    model = hand_built()
    ref = copy.deepcopy(model)
    rev = it.revert_model(model)
    kinds = {n: type(m) for n, m in rev.named_modules() if isinstance(m, nn.BatchNorm2d) or
             isinstance(m, nn.modules.batchnorm._BatchNorm)}
    assert set(kinds.values()) == {it.BatchNormAct} and len(kinds) == 5
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", it.SyncFallbackWarning)
        assert_same_function(ref, rev, x, loss)


def test_norm_act_modules_revert_with_their_activation():
    leaky_layer = lambda inplace=False: nn.LeakyReLU(SLOPE, inplace)  # noqa: E731
    orig = randomize(nn.Sequential(nn.Conv2d(3, 4, 1), tm.BatchNormAct2d(4, leaky_layer))).double()
    conv = quiet_convert(copy.deepcopy(orig))
    rev = it.revert_model(conv)
    assert type(rev[1]) is it.BatchNormAct and rev[1].activation == "leaky_relu"
    assert_same_function(orig, rev, torch.randn(2, 3, 4, 4, dtype=torch.float64), loss)


def test_sync_layers_stay_synchronised_only_when_asked():
    _, conv = converted_resnet()
    sync = it.convert_model(conv, sync=True)
    rev = it.revert_model(copy.deepcopy(sync), sync=True)
    assert all(type(m) is nn.SyncBatchNorm for m in rev.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm))
    rev = it.revert_model(copy.deepcopy(sync))
    assert all(type(m) is nn.BatchNorm2d for m in rev.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm))
    with pytest.raises(TypeError, match="sync must be a bool"):
        it.revert_model(sync, sync=None)


def test_bad_arguments_name_themselves():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        it.revert_model(object())
    with pytest.raises(TypeError, match="single ABN layer.*to_batchnorm"):
        it.revert_model(it.InPlaceABN(3))


# ------------------------------------------------------------------------------------------
# Export of the reverted model
# ------------------------------------------------------------------------------------------
def exportable_models():
    _, conv = converted_resnet()
    return {"graph": (conv, torch.randn(2, 3, 64, 64, dtype=torch.float64)),
            "modules": (hand_built(), torch.randn(2, 3, 5, 5, dtype=torch.float64))}


@pytest.mark.parametrize("kind", ["graph", "modules"])
@pytest.mark.parametrize("how", ["script", "trace"])
def test_reverted_model_compiles_with_torchscript(kind, how):
    model, x = exportable_models()[kind]
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", it.SyncFallbackWarning)
        with torch.no_grad():
            want = model(x.clone())
    rev = it.revert_model(model)
    with warnings.catch_warnings():
        # torch's own notice about GraphModule.__init__'s annotations, not about this model
        warnings.filterwarnings("ignore", "The TorchScript type system", UserWarning)
        jit = torch.jit.script(rev) if how == "script" else torch.jit.trace(rev, x.clone())
    with torch.no_grad():
        torch.testing.assert_close(jit(x.clone()), want)


@pytest.mark.parametrize("dynamo", [False, True])
def test_reverted_model_exports_to_onnx(dynamo):
    onnx = pytest.importorskip("onnx", reason="onnx is not installed (optional)")
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (optional)")
    if dynamo:
        pytest.importorskip("onnxscript", reason="onnxscript is not installed (optional)")
    model, x = exportable_models()["graph"]
    model = model.float().eval()
    x = x.float()
    with torch.no_grad():
        want = model(x.clone())
    rev = it.revert_model(model)
    f = io.BytesIO()
    with warnings.catch_warnings():  # torch's notices: the legacy exporter's deprecation, ...
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(rev, (x,), dynamo=True, verbose=False).save(f)
        else:
            torch.onnx.export(rev, (x,), f, dynamo=False)
    onnx.checker.check_model(onnx.load_from_string(f.getvalue()))
    sess = ort.InferenceSession(f.getvalue(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------
# Exporters meeting an in-place layer: the error names the fix
# ------------------------------------------------------------------------------------------
def iabn_model():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return nn.Sequential(nn.Conv2d(3, 4, 1), it.InPlaceABN(4), nn.Conv2d(4, 4, 1),
                             it.InPlaceABNSync(4)).eval()


@pytest.mark.parametrize("how", ["script", "trace", "onnx-legacy"])
def test_exporters_name_revert_model(how):
    m, x = iabn_model(), torch.randn(2, 3, 5, 5)
    with warnings.catch_warnings(), pytest.raises(IABNError, match=r"iabn\.torch\.revert_model"):
        warnings.simplefilter("ignore")
        if how == "script":
            torch.jit.script(m)
        elif how == "trace":
            torch.jit.trace(m, x)
        else:
            torch.onnx.export(m, (x,), io.BytesIO(), dynamo=False)


def test_onnx_dynamo_names_revert_model():
    """The ONNX dynamo exporter captures with torch.export, which reaches the op's fake kernel;
    that kernel raises only while an ONNX export runs."""
    pytest.importorskip("onnxscript", reason="onnxscript is not installed (optional)")
    m, x = iabn_model(), torch.randn(2, 3, 5, 5)
    with warnings.catch_warnings(), pytest.raises(Exception, match=r"iabn\.torch\.revert_model"):
        warnings.simplefilter("ignore")
        torch.onnx.export(m, (x,), dynamo=True, verbose=False)


def test_torch_export_still_works():
    m, x = iabn_model(), torch.randn(2, 3, 5, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(m, (x,))
        torch.testing.assert_close(ep.module()(x.clone()), m(x.clone()))

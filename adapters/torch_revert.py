"""revert_model: every ABN / InPlaceABN / InPlaceABNSync in a model back to BatchNorm followed
by its activation, for inference and export (ONNX, TorchScript) with standard torch ops.

Two structures, chosen by what the model is:
  * a torch.fx.GraphModule (what convert_model returns when it fused a residual or changed the
    code): its graph is rewritten. Each layer becomes the BatchNorm class it was converted
    from (when unknown, a layer built by hand: a rank-agnostic BatchNormAct with the identity
    activation, or nn.SyncBatchNorm) at the same module path, then,
    where the layer was called with residual=r, an add of r, then the activation as a
    function call (F.leaky_relu / F.elu / F.relu) in the graph. A fused layer is
    BN -> add -> activation again.
  * any other module (the model's own forward calls the layers): each layer is swapped, at
    the same path, for a `BatchNormAct` (or `SyncBatchNormAct` for InPlaceABNSync): a BatchNorm
    subclass that applies the activation itself, and adds `residual` when it is passed one.

Either way the state_dict keys stay the same (weight, bias, running_mean, running_var,
num_batches_tracked, at the same paths); the in-place layers' `weight` values become the BN
scale |w| + eps. The model is changed in place and returned, as convert_sync_batchnorm does.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from iabn_core.validate import IABNError

from .torch_fx_nodes import _set_module
from .torch_layer_convert import _batchnorm_from
from .torch_layer_convert import to_batchnorm as _layer_to_batchnorm
from .torch_modules import ABN, InPlaceABNSync, _activation_repr

__all__ = ["revert_model", "to_batchnorm", "BatchNormAct", "SyncBatchNormAct"]


def _activate(y: Tensor, activation: str, param: float) -> Tensor:
    if activation == "leaky_relu":
        return F.leaky_relu(y, param)
    if activation == "elu":
        return F.elu(y, param)
    if activation == "relu":
        return F.relu(y)
    return y


# What _revert_graph calls for each activation (_activate spells it out: TorchScript compiles it).
_ACTIVATION_FUNCTIONS = {"leaky_relu": F.leaky_relu, "elu": F.elu, "relu": F.relu}


def _act_repr(m: nn.Module, bn_repr: str) -> str:
    return f"{bn_repr}, activation={_activation_repr(m)}"


class BatchNormAct(_BatchNorm):
    """BatchNorm (any input rank >= 2), then + residual when given, then the activation, from
    standard torch ops: what `revert_model` puts where the model's own code calls an ABN
    layer. Same arguments, state_dict keys and call signature as ABN; `weight` is the BN
    scale itself. Scripts and traces with torch.jit and exports to ONNX."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 activation: str = "leaky_relu", activation_param: float = 0.01, **factory):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, **factory)
        self.activation = activation
        self.activation_param = float(activation_param)

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected an input of 2 or more dimensions (N, C, *), got "
                             f"{input.dim()}D")

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        # nn.BatchNorm's own rules, written out: TorchScript cannot compile super().forward.
        self._check_input_dim(x)
        momentum = 0.0 if self.momentum is None else float(self.momentum)
        count = self.num_batches_tracked
        if self.training and self.track_running_stats and count is not None:
            count.add_(1)
            if self.momentum is None:  # cumulative average over the batches counted
                momentum = 1.0 / float(count)
        keep = self.track_running_stats or not self.training
        y = F.batch_norm(x, self.running_mean if keep else None,
                         self.running_var if keep else None, self.weight, self.bias,
                         self.training or self.running_mean is None, momentum, self.eps)
        if residual is not None:
            y = y + residual
        return _activate(y, self.activation, self.activation_param)

    def extra_repr(self) -> str:
        return _act_repr(self, super().extra_repr())


class SyncBatchNormAct(nn.SyncBatchNorm):
    """nn.SyncBatchNorm, then + residual, then the activation: `revert_model`'s counterpart of
    an InPlaceABNSync called by the model's own code (statistics synchronised over the same
    process group in training, as before)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 activation: str = "leaky_relu", activation_param: float = 0.01,
                 process_group=None, **factory):
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         process_group, **factory)
        self.activation = activation
        self.activation_param = float(activation_param)

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        y = super().forward(x)
        if residual is not None:
            y = y + residual
        return _activate(y, self.activation, self.activation_param)

    def extra_repr(self) -> str:
        return _act_repr(self, super().extra_repr())


def _act_module(m: ABN, sync: bool) -> _BatchNorm:
    cls = SyncBatchNormAct if sync and isinstance(m, InPlaceABNSync) else BatchNormAct
    return _batchnorm_from(m, cls, m.activation, m.activation_param)


def _plain_bn(m: ABN, sync: bool) -> _BatchNorm:
    cls = getattr(m, "_bn_class", None)
    if sync and isinstance(m, InPlaceABNSync):
        cls = nn.SyncBatchNorm  # takes any input rank, as the layer did
    elif cls is not None and issubclass(cls, nn.SyncBatchNorm):
        cls = None  # not synchronised: the rank it was built for is unknown
    if cls is None:  # e.g. a layer built by hand: its input rank is unknown, take any
        return _batchnorm_from(m, BatchNormAct, "identity")
    return _batchnorm_from(m, cls)


def _revert_graph(gm: fx.GraphModule, sync: bool) -> fx.GraphModule:
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        m = gm.get_submodule(node.target)
        if not isinstance(m, ABN):
            continue
        residual = node.kwargs.get("residual", node.args[1] if len(node.args) > 1 else None)
        _set_module(gm, node.target, _plain_bn(m, sync))
        users = list(node.users)
        with graph.inserting_after(node):
            out = node
            node.args, node.kwargs = (node.args[0],), {}
            if residual is not None:
                out = graph.call_function(operator.add, (out, residual))
            if m.activation != "identity":
                with graph.inserting_after(out):
                    args = (out,) if m.activation == "relu" else (out, m.activation_param)
                    out = graph.call_function(_ACTIVATION_FUNCTIONS[m.activation], args)
        for u in users:
            u.replace_input_with(node, out)
    graph.lint()
    gm.recompile()
    return gm


def revert_model(model: nn.Module, sync: bool = False) -> nn.Module:
    """Turn every ABN, InPlaceABN and InPlaceABNSync in `model` back into BatchNorm followed by
    its activation (convert_model's inverse), undoing the fused residual too: a layer called
    with residual=r becomes BN -> add r -> activation. Train and eval compute what the iabn
    layers computed (to rounding); state_dict keys are kept, the in-place layers' weights
    written as the BN scale |w| + eps. Changes the model in place and returns it (a
    GraphModule's graph is rewritten; see the module docstring for the two structures).

    sync=False (for export and single-process use) makes InPlaceABNSync layers plain BN too;
    sync=True keeps them synchronised (nn.SyncBatchNorm / SyncBatchNormAct over the same
    group), as convert_model(sync=True) made them; nn.SyncBatchNorm does not script.

    Use it before torch.onnx.export, torch.jit.script/trace, or to deploy with plain BN."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"revert_model: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(sync, bool):
        raise TypeError(f"revert_model: sync must be a bool, got {sync!r}")
    if isinstance(model, ABN):
        raise TypeError("revert_model: model is a single ABN layer, which cannot be replaced "
                        "in place; use to_batchnorm(layer) (an nn.Sequential(BN, activation))")
    if isinstance(model, fx.GraphModule):
        return _revert_graph(model, sync)
    for name, m in list(model.named_modules()):
        if name and isinstance(m, ABN):
            _set_module(model, name, _act_module(m, sync))
    return model


def to_batchnorm(m: nn.Module, bn_class: Optional[type] = None, sync: bool = False) -> nn.Module:
    """One ABN/InPlaceABN layer: an equivalent nn.Sequential(BatchNorm, activation) of standard
    modules (bn_class: the class it was converted from, else nn.BatchNorm2d). Any other model:
    `revert_model(m, sync)` (bn_class must then be None)."""
    if isinstance(m, ABN):
        return _layer_to_batchnorm(m, bn_class)
    if bn_class is not None:
        raise TypeError("to_batchnorm: bn_class applies to a single ABN layer; a whole model "
                        "keeps the BatchNorm class each layer was converted from")
    return revert_model(m, sync)


# ------------------------------------------------------------------------------------------
# Exporters meeting an in-place layer
# ------------------------------------------------------------------------------------------
_FIX = ("InPlaceABN computes in place with its own kernels, which {tool} cannot record. "
        "Export the equivalent BatchNorm model instead: model = iabn.torch.revert_model(model) "
        "(same outputs, same state_dict keys)")


def _refuse_tracing(layer):
    raise IABNError(f"{type(layer).__name__}: " + _FIX.format(
        tool="torch.jit.trace (and torch.onnx.export(dynamo=False), which traces)"))


def _refuse_scripting(layer):
    raise IABNError(f"{type(layer).__name__}: " + _FIX.format(tool="torch.jit.script"))

"""What an fx node is, for convert_model (adapters/torch_convert.py): which activation it
applies, whether it makes a fresh tensor or modifies one in place, whether it adds a residual.
Pure classification of single nodes; the conversion decisions live in torch_convert.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .torch_modules import ABN

_FRESH_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                  nn.ConvTranspose3d, nn.Linear)
# Ops whose output is a new tensor that their own backward does not keep.
_FRESH_FUNCTIONS = {F.conv1d, F.conv2d, F.conv3d, F.linear, torch.conv1d, torch.conv2d,
                    torch.conv3d, torch.cat, torch.concat, operator.add, torch.add}
_ADDS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}
_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv}
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
             nn.FeatureAlphaDropout)
_DROPOUT_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
                      F.feature_alpha_dropout}
# timm's stochastic-depth and drop-block modules, recognised by name and attribute so that
# timm need not be imported. Their forward branches on self.training in Python: traced
# through, the branch of the mode at conversion time would be baked into the graph, so they
# stay call nodes (leaves).
_DROP_RATE_MODULES = ("DropPath", "DropBlock2d")


def _drop_rate_module(m: nn.Module) -> bool:
    return type(m).__name__ in _DROP_RATE_MODULES and hasattr(m, "drop_prob")


class _Tracer(fx.Tracer):
    """Keeps BatchNorm (incl. norm+act subclasses), ABN and timm's drop modules as single
    call nodes."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (isinstance(m, (_BatchNorm, ABN)) or _drop_rate_module(m)
                or super().is_leaf_module(m, qualname))


def drop_rate(m: nn.Module) -> Optional[float]:
    """The drop probability of a dropout-like module (nn.Identity: 0), None for any other."""
    if type(m) is nn.Identity:
        return 0.0
    if isinstance(m, _DROPOUTS):
        return float(m.p)
    if _drop_rate_module(m):
        return float(m.drop_prob or 0.0)
    return None


def _drop_rate_of_node(node: fx.Node, modules: dict) -> Optional[float]:
    if node.op == "call_module":
        return drop_rate(modules[node.target])
    if node.op == "call_function" and node.target in _DROPOUT_FUNCTIONS:
        p = _arg(node, 1, "p", 0.5)
        return float(p) if isinstance(p, (int, float)) else None
    return None


def _pass_through(node: fx.Node, modules: dict) -> Optional[str]:
    """'' if the node returns its input's values unchanged in training and in eval
    (nn.Identity; a dropout, DropPath or DropBlock with rate 0); a reason if it is a dropout
    that is not the identity in training; None if it is no dropout-like op at all."""
    p = _drop_rate_of_node(node, modules)
    if p is None:
        return None
    if p == 0.0:
        return ""
    return (f"{_describe(node, modules)} with drop probability {p:g}, which zeroes values "
            "in training (InPlaceABN applies the activation right after the normalisation)")


def _past_identities(node: fx.Node, modules: dict) -> tuple[fx.Node, list]:
    """The first op at or after `node` that is not a pass-through op, following single users,
    and the pass-through nodes on the way (a pass-through node with other than one user ends
    the walk: it is returned as the op)."""
    passed = []
    while _pass_through(node, modules) == "" and len(node.users) == 1:
        passed.append(node)
        node = next(iter(node.users))
    return node, passed


@dataclass
class _Act:
    name: str  # "identity" | "leaky_relu" | "elu" | "relu" | "other"
    param: float = 0.01
    what: str = ""  # for messages


def _act_of_module(m: nn.Module) -> _Act:
    if type(m) is nn.Identity:
        return _Act("identity", 0.01, "Identity")
    if type(m) is nn.LeakyReLU:
        return _Act("leaky_relu" if m.negative_slope > 0 else "other",
                    float(m.negative_slope), "LeakyReLU")
    if type(m) is nn.ELU:
        return _Act("elu" if m.alpha > 0 else "other", float(m.alpha), "ELU")
    if type(m) is nn.ReLU:
        return _Act("relu", 0.0, "ReLU")
    return _Act("other", 0.0, type(m).__name__)


def _arg(node: fx.Node, i: int, key: str, default):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(key, default)


def _act_of_node(node: fx.Node, modules: dict) -> Optional[_Act]:
    """The activation a node computes from its first argument, or None if it is not one."""
    if node.op == "call_module":
        act = _act_of_module(modules[node.target])
        return None if act.name == "other" else act
    if node.op == "call_function":
        t = node.target
        if t in (F.relu, torch.relu, torch.relu_):
            return _Act("relu", 0.0, "relu")
        if t in (F.leaky_relu, F.leaky_relu_):
            slope = _arg(node, 1, "negative_slope", 0.01)
            ok = isinstance(slope, (int, float)) and slope > 0  # not a traced value
            return _Act("leaky_relu" if ok else "other", float(slope) if ok else 0.0, "leaky_relu")
        if t in (F.elu, F.elu_):
            alpha = _arg(node, 1, "alpha", 1.0)
            ok = isinstance(alpha, (int, float)) and alpha > 0
            return _Act("elu" if ok else "other", float(alpha) if ok else 0.0, "elu")
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return _Act("relu", 0.0, node.target)
    return None


def _modifies_in_place(user: fx.Node, node: fx.Node, modules: dict) -> bool:
    """True if `user` writes into `node`'s tensor."""
    if not user.args or user.args[0] is not node:
        return False
    if user.op == "call_function":
        if user.target in _INPLACE_OPERATORS or getattr(user.target, "__name__", "").endswith("_"):
            return True
        return bool(user.kwargs.get("inplace", False)) or (
            user.target in (F.relu, F.leaky_relu, F.elu, F.hardtanh, F.relu6)
            and len(user.args) > 1 and user.args[-1] is True)
    if user.op == "call_method":
        return user.target.endswith("_")
    if user.op == "call_module":
        return bool(getattr(modules[user.target], "inplace", False))
    return False


def _fresh(node: Any, modules: dict) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_module":
        return isinstance(modules[node.target], _FRESH_MODULES)
    if node.op == "call_function":
        return node.target in _FRESH_FUNCTIONS
    return node.op == "call_method" and node.target == "add"


def _describe(node: fx.Node, modules: dict) -> str:
    if node.op == "call_module":
        return f"{type(modules[node.target]).__name__} ({node.target})"
    if node.op == "placeholder":
        return "the model's input"
    return getattr(node.target, "__name__", str(node.target))


def _is_add_of(node: fx.Node, x: fx.Node) -> Optional[fx.Node]:
    """If `node` is x + r (either order, in place or not), the other operand r."""
    is_add = ((node.op == "call_function" and node.target in _ADDS)
              or (node.op == "call_method" and node.target in _ADD_METHODS))
    if not is_add or len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    other = b if a is x else a if b is x else None
    # a parameter/buffer operand (get_attr) is a broadcast bias, not a residual like x
    if isinstance(other, fx.Node) and other is not x and other.op != "get_attr":
        return other
    return None


def _set_module(root: nn.Module, path: str, m: nn.Module) -> None:
    """Put `m` at `path` in place of what is there (through _modules: no __setattr__ rules,
    the same slot in the parent's order)."""
    parent, _, name = path.rpartition(".")
    (root.get_submodule(parent) if parent else root)._modules[name] = m

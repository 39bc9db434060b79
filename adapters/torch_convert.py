"""convert_model: BatchNorm -> activation (and BatchNorm -> add -> activation) to InPlaceABN,
found in the model's data flow with torch.fx.

The pass traces the model symbolically (BN, ABN and norm+act modules stay leaves), walks the
graph once and converts a BN when the data flow makes it exact and safe:
  * its input is the fresh output of a conv/linear/cat/add that nothing else reads (the op
    overwrites it), and the BN module is called once;
  * its only consumer is an invertible activation (module, functional or method form, in place
    or not), or, with fuse_residual, an add whose other operand r is a tensor and whose only
    consumer is such an activation: `act(bn(x) + r)` becomes one `bn(x, residual=r)`;
  * norm+act modules (a BatchNorm subclass with an `act` module, like timm's BatchNormAct2d)
    convert as a unit;
  * nothing modifies the converted output (or the residual) in place afterwards: InPlaceABN
    saves them for backward.
A BN whose only consumer is a fused add's residual operand becomes an identity InPlaceABN: its
output is what the fused layer saves anyway.
When the rewrite only swaps modules (BN -> InPlaceABN, its activation module -> Identity), the
model is changed in place and returned (as the Sequential-only converter before it did);
otherwise the result is a torch.fx.GraphModule over a copy of the model's modules (same
module names, containers and state_dict keys, so checkpoints load), and the original model is
left as it was. Use the returned model.
"""
from __future__ import annotations

import copy
import operator
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .torch_fx_nodes import (_Act, _Tracer, _act_of_module, _act_of_node, _describe, _fresh,
                             _is_add_of, _modifies_in_place)
from .torch_modules import (IABNConversionWarning, IN_PLACE_MODULES, _unrepresentable,
                            from_batchnorm, to_sync)

__all__ = ["convert_model"]


@dataclass
class _Plan:
    bn: fx.Node
    act: _Act
    act_node: Optional[fx.Node] = None  # None: inside the norm+act module, or identity
    add: Optional[fx.Node] = None
    residual: Optional[fx.Node] = None
    relu_replaced: bool = False


@dataclass
class _State:
    modules: dict
    calls: dict  # module target -> number of call nodes
    fuse_residual: bool
    replace_relu: Optional[float]
    plans: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    claimed: dict = field(default_factory=dict)  # add node -> plan of the fused BN


def _norm_act_parts(m: nn.Module):
    """(act module, reason it cannot convert) of a norm+act module; (None, None) for plain BN."""
    act = getattr(m, "act", None)
    if not isinstance(act, nn.Module):
        return None, None
    drop = getattr(m, "drop", None)
    if drop is not None and type(drop) is not nn.Identity:
        return act, f"its {type(drop).__name__} between norm and activation is not supported"
    return act, None


def _check_input(node: fx.Node, st: _State) -> Optional[str]:
    x = node.args[0] if node.args else None
    if not isinstance(x, fx.Node):
        return "its input is not a traced tensor"
    if x.op == "placeholder":
        return ("its input is the model's input, which the caller may still use, so it must "
                "not be overwritten")
    if not _fresh(x, st.modules):
        return (f"its input comes from {_describe(x, st.modules)}, whose output may be kept for "
                "its own backward or used elsewhere, so it must not be overwritten")
    if len(x.users) > 1:
        return (f"its input ({_describe(x, st.modules)}) is also used elsewhere, which "
                "overwriting it would corrupt")
    return None


def _resolve_act(act: _Act, st: _State, where: str) -> tuple[Optional[_Act], Optional[str], bool]:
    if act.name == "relu":
        if st.replace_relu is None:
            return None, (f"{where} ReLU, which is not invertible (convert_model(..., "
                          "replace_relu=0.01) turns it into LeakyReLU(0.01))"), False
        return _Act("leaky_relu", float(st.replace_relu), "ReLU"), None, True
    if act.name == "other":
        return None, (f"{where} {act.what}, which is not an invertible activation "
                      "(LeakyReLU or ELU with a positive parameter, or Identity)"), False
    return act, None, False


def _in_place_users(node: fx.Node, st: _State) -> Optional[str]:
    for u in node.users:
        if _modifies_in_place(u, node, st.modules):
            return _describe(u, st.modules)
    return None


def _analyse(node: fx.Node, st: _State) -> Optional[str]:
    """Plan the conversion of one BN call node, or return why it stays as it is."""
    m = st.modules[node.target]
    if st.calls[node.target] > 1:
        return "the module is called more than once"
    if _unrepresentable(m):
        return "has channels with gamma <= eps, which InPlaceABN cannot represent"
    inner, why = _norm_act_parts(m)
    if why:
        return why
    why = _check_input(node, st)
    if why:
        return why
    if inner is not None and _act_of_module(inner).name != "identity":
        act, why, replaced = _resolve_act(_act_of_module(inner), st, "its activation is")
        if why:
            return why
        return _finish(st, _Plan(node, act, relu_replaced=replaced), node)
    users = list(node.users)
    if len(users) != 1:
        return f"its output feeds {len(users)} ops, not one activation"
    u = users[0]
    add_plan = st.claimed.get(u)
    if add_plan is not None and add_plan.residual is node:
        # The residual of a fused layer: an identity InPlaceABN saves what that layer saves.
        return _finish(st, _Plan(node, _Act("identity", 0.01, "Identity")), node)
    act = _act_of_node(u, st.modules)
    if act is not None:
        act, why, replaced = _resolve_act(act, st, "followed by")
        if why:
            return why
        return _finish(st, _Plan(node, act, u, relu_replaced=replaced), u)
    r = _is_add_of(u, node)
    if r is None:
        return f"followed by {_describe(u, st.modules)}, not an activation"
    if not st.fuse_residual:
        return "followed by an add (fuse_residual=False)"
    if u in st.claimed:
        return "its add is already fused with another BatchNorm"
    after = list(u.users)
    act = _act_of_node(after[0], st.modules) if len(after) == 1 else None
    if act is None:
        return "followed by an add that is not followed by exactly one activation"
    act, why, replaced = _resolve_act(act, st, "followed by an add and")
    if why:
        return why
    if _in_place_users(r, st):
        return f"its residual is modified in place by {_in_place_users(r, st)}"
    plan = _Plan(node, act, after[0], u, r, replaced)
    why = _finish(st, plan, after[0])
    if why is None:
        st.claimed[u] = plan
    return why


def _finish(st: _State, plan: _Plan, out: fx.Node) -> Optional[str]:
    who = _in_place_users(out, st)
    if who:
        return (f"its activated output is modified in place afterwards by {who}; InPlaceABN "
                "saves that output for backward")
    st.plans.append(plan)
    return None


_OPERATORS = {operator.add, operator.sub, operator.mul, operator.truediv}


def _module_only(plan: _Plan, st: _State) -> bool:
    """True if the plan is a pure module swap (no change to the forward code).

    fx records `z += 1` as operator.add: the graph cannot tell it from `z = z + 1`. The
    original code would then modify the saved output in place, so a converted output with an
    arithmetic-operator user keeps the regenerated (out-of-place) code of a GraphModule."""
    if plan.add is not None:
        return False
    x = plan.bn.args[0]  # `h += y; bn(h)` is traced as a fresh add, but h's storage is reused
    if x.op == "call_function" and x.target in _OPERATORS:
        return False
    out = plan.act_node or plan.bn
    if any(u.op == "call_function" and u.target in _OPERATORS and u.args[0] is out
           for u in out.users):
        return False
    if plan.act_node is None:
        return True  # a norm+act module, or a residual's BN: the module swap is all
    return plan.act_node.op == "call_module" and st.calls[plan.act_node.target] == 1


def _set_module(root: nn.Module, path: str, m: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    owner = root.get_submodule(parent) if parent else root
    owner._modules[name] = m


def _swap(root: nn.Module, plan: _Plan, st: _State) -> None:
    bn = st.modules[plan.bn.target]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IABNConversionWarning)  # representability checked above
        new = from_batchnorm(bn, plan.act.name, plan.act.param)
    if _norm_act_parts(bn)[0] is not None:  # to_batchnorm rebuilds a plain torch BN class
        new._bn_class = next(c for c in type(bn).__mro__ if c.__module__.startswith("torch.nn"))
    _set_module(root, plan.bn.target, new)


def _rewrite(graph: fx.Graph, plan: _Plan) -> None:
    if plan.add is not None:
        # The add's operands as they are now: an earlier rewrite may have replaced r's node.
        r = _is_add_of(plan.add, plan.bn)
        plan.add.prepend(plan.bn)  # after both x and r in the graph's order
        plan.bn.args = (plan.bn.args[0],)
        plan.bn.kwargs = {"residual": r}
    if plan.act_node is not None:
        plan.act_node.replace_all_uses_with(plan.bn)
        graph.erase_node(plan.act_node)
    if plan.add is not None:
        graph.erase_node(plan.add)


def _graph_module(model: nn.Module, graph: fx.Graph) -> fx.GraphModule:
    """A GraphModule running `graph` whose children are the model's own containers (so
    `gm.layer1[0]` still works, unused modules stay, and state_dict order is unchanged)."""
    gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
    gm._modules.clear()
    gm._modules.update(model._modules)
    for name in ("_parameters", "_buffers"):
        getattr(gm, name).update(getattr(model, name))
    # Buffers the model keeps out of its state_dict stay out of it (else checkpoints of the
    # original miss a key), and the model's own hooks and plain attributes carry over.
    gm._non_persistent_buffers_set = set(model._non_persistent_buffers_set)
    own = vars(gm)
    for name, value in vars(model).items():
        if "hook" in name and isinstance(value, dict):
            own[name].update(value)
        elif "hook" in name or not (name in own or name.startswith("_")
                                    or hasattr(type(gm), name)):  # e.g. a patched forward
            own[name] = value  # the full-backward-hook flag; e.g. `num_classes`
    # Only the top-level flag: .train() would also reset submodules that had their own mode
    # (e.g. a frozen BatchNorm in eval inside a model being trained).
    gm.training = model.training
    return gm


def convert_model(model: nn.Module, sync: bool = False, group: Optional[Any] = None, *,
                  fuse_residual: bool = True, replace_relu: Optional[float] = None) -> nn.Module:
    """Convert, where exact and safe, every BatchNorm -> invertible activation in the model's
    data flow to InPlaceABN, and with fuse_residual every BatchNorm -> add(., r) -> activation
    to one InPlaceABN called with residual=r. Returns the converted model (see the module
    docstring: the same object when only modules change, else a torch.fx.GraphModule with
    the same module names and state_dict keys).

    replace_relu=s also converts ReLU after BN (or BN + add) into LeakyReLU(s): this changes
    the function (for training from scratch or fine-tuning) and is warned about. Every BN left
    as it is, and why, is listed in one IABNConversionWarning; a model torch.fx cannot trace is
    returned unchanged with a warning.

    sync=True makes the in-place layers InPlaceABNSync over `group` (None: the default group),
    including InPlaceABN layers already in the model."""
    if replace_relu is not None and not (isinstance(replace_relu, (int, float))
                                         and replace_relu > 0):
        raise ValueError(f"replace_relu must be a positive slope or None, got {replace_relu!r}")
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # noqa: BLE001 - any tracing failure means: leave the model alone
        warnings.warn(f"convert_model: torch.fx cannot trace {type(model).__name__} "
                      f"({type(e).__name__}: {e}); the model is returned unchanged",
                      IABNConversionWarning, stacklevel=2)
        return model
    modules = dict(model.named_modules())
    calls: dict = {}
    for n in graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    st = _State(modules, calls, fuse_residual, replace_relu)
    for n in list(graph.nodes):
        if n.op == "call_module" and isinstance(modules[n.target], _BatchNorm):
            why = _analyse(n, st)
            if why:
                st.skipped.append(f"{n.target}: {why}")
    out = model
    if all(_module_only(p, st) for p in st.plans):
        for p in st.plans:
            _swap(model, p, st)
            if p.act_node is not None:
                _set_module(model, p.act_node.target, nn.Identity())
    else:
        # The forward code changes: the original model is left as it is (its forward would
        # not match converted layers), and the result runs on a copy of its modules.
        for p in st.plans:
            _rewrite(graph, p)
        graph.lint()
        copied = copy.deepcopy(model)
        st.modules = dict(copied.named_modules())
        for p in st.plans:
            _swap(copied, p, st)
        out = _graph_module(copied, graph)
    if sync:
        for name, m in list(out.named_modules()):
            if isinstance(m, IN_PLACE_MODULES) and name:
                _set_module(out, name, to_sync(m, group))
    if st.skipped:
        warnings.warn("convert_model left these BatchNorm layers unchanged:\n  "
                      + "\n  ".join(st.skipped), IABNConversionWarning, stacklevel=2)
    relu = [p.bn.target for p in st.plans if p.relu_replaced]
    if relu:
        warnings.warn(f"convert_model replaced the ReLU after {len(relu)} BatchNorm layers by "
                      f"LeakyReLU({replace_relu}): this changes the function the model computes "
                      "(meant for training from scratch or fine-tuning): " + ", ".join(relu),
                      IABNConversionWarning, stacklevel=2)
    return out

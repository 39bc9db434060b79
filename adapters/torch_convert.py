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
                             _is_add_of, _modifies_in_place, _pass_through, _past_identities,
                             _set_module, drop_rate)
from .torch_layer_convert import _in_place_from, to_sync
from .torch_modules import IABNConversionWarning, IN_PLACE_MODULES
from .torch_checkpoint import ScaleChange, scale_change
from .torch_convert_precision import fused_precision_warning

__all__ = ["convert_model"]


@dataclass
class _Plan:
    bn: fx.Node
    act: _Act
    act_node: Optional[fx.Node] = None  # None: inside the norm+act module, or identity
    add: Optional[fx.Node] = None
    residual: Optional[fx.Node] = None
    relu_replaced: bool = False
    # pass-through ops (Identity, dropout with rate 0) between the BN and its add or
    # activation, and between the add and its activation: removed with them
    before: list = field(default_factory=list)
    after: list = field(default_factory=list)


@dataclass
class _State:
    modules: dict
    calls: dict  # module target -> number of call nodes
    fuse_residual: bool
    replace_relu: Optional[float]
    exact: bool = False
    plans: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    claimed: dict = field(default_factory=dict)  # add node -> plan of the fused BN
    scales: dict = field(default_factory=dict)  # BN target -> scale_change (one sync each)


def _norm_act_parts(m: nn.Module):
    """(act module, reason it cannot convert) of a norm+act module; (None, None) for plain BN."""
    act = getattr(m, "act", None)
    if not isinstance(act, nn.Module):
        return None, None
    drop = getattr(m, "drop", None)
    if drop is None:
        return act, None
    p = drop_rate(drop) if isinstance(drop, nn.Module) else None
    if p is None:
        return act, f"its {type(drop).__name__} between norm and activation is not supported"
    if p > 0:
        return act, (f"its {type(drop).__name__} between norm and activation has drop "
                     f"probability {p:g}, which zeroes values in training")
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
    st.scales[node.target] = scale_change(m)
    why = _scale_refusal(st.scales[node.target], st.exact)
    if why:
        return why
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
    # Identity placeholders and dropouts with rate 0 (timm's drop_block, drop_path) are
    # looked past: the op after them decides.
    u, before = _past_identities(users[0], st.modules)
    last = before[-1] if before else node  # the tensor u reads (the BN output's values)
    add_plan = st.claimed.get(u)
    if add_plan is not None and add_plan.residual is last:
        # The residual of a fused layer: an identity InPlaceABN saves what that layer saves.
        return _finish(st, _Plan(node, _Act("identity", 0.01, "Identity")), last)
    act = _act_of_node(u, st.modules)
    if act is not None:
        act, why, replaced = _resolve_act(act, st, "followed by")
        if why:
            return why
        return _finish(st, _Plan(node, act, u, relu_replaced=replaced, before=before), u)
    why = _pass_through(u, st.modules)
    if why:
        return f"followed by {why}"
    r = _is_add_of(u, last)
    if r is None:
        if before:  # BN -> Identity -> any op: an identity InPlaceABN, as for an Identity act
            plan = _Plan(node, _Act("identity", 0.01, "Identity"), before[-1],
                         before=before[:-1])
            return _finish(st, plan, before[-1])
        return f"followed by {_describe(u, st.modules)}, not an activation"
    if not st.fuse_residual:
        return "followed by an add (fuse_residual=False)"
    if u in st.claimed:
        return "its add is already fused with another BatchNorm"
    users = list(u.users)
    if len(users) != 1:
        return "followed by an add that is not followed by exactly one activation"
    a, after = _past_identities(users[0], st.modules)
    act = _act_of_node(a, st.modules)
    if act is None:
        why = _pass_through(a, st.modules)
        return f"followed by an add and {why}" if why else (
            f"followed by an add and {_describe(a, st.modules)}, not an activation")
    act, why, replaced = _resolve_act(act, st, "followed by an add and")
    if why:
        return why
    if _in_place_users(r, st):
        return f"its residual is modified in place by {_in_place_users(r, st)}"
    plan = _Plan(node, act, a, u, r, replaced, before, after)
    why = _finish(st, plan, a)
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


def _scale_refusal(change: Optional[ScaleChange], exact: bool) -> Optional[str]:
    """Why a BN's scales (their scale_change) rule out InPlaceABN (scale |w| + eps > eps): any
    channel with gamma <= eps under exact=True; a negative gamma always (its sign would flip)."""
    if change is None:
        return None
    if change.negative:
        return (f"has {change.negative} channels with negative gamma (down to "
                f"{change.min_gamma:.3g}); InPlaceABN's scale |w| + eps is positive, so the "
                f"output would change by up to {change.bound:.3g}*|x_hat|")
    if exact:
        return (f"has {change.channels} channels with 0 <= gamma <= eps, which InPlaceABN "
                f"cannot represent exactly (their scale would become eps, a change of up to "
                f"{change.bound:.3g}*|x_hat|; exact=True refuses it)")
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


def _swap(root: nn.Module, plan: _Plan, st: _State) -> None:
    bn = st.modules[plan.bn.target]
    # No warning of its own: _analyse measured the scales and convert_model reports them.
    new = _in_place_from(bn, plan.act.name, plan.act.param, warn=False)
    if _norm_act_parts(bn)[0] is not None:  # to_batchnorm rebuilds a plain torch BN class
        new._bn_class = next(c for c in type(bn).__mro__ if c.__module__.startswith("torch.nn"))
    _set_module(root, plan.bn.target, new)


def _rewrite(graph: fx.Graph, plan: _Plan) -> None:
    if plan.add is not None:
        # The add's operands as they are now: an earlier rewrite may have replaced r's node.
        r = _is_add_of(plan.add, plan.before[-1] if plan.before else plan.bn)
        plan.add.prepend(plan.bn)  # after both x and r in the graph's order
        plan.bn.args = (plan.bn.args[0],)
        plan.bn.kwargs = {"residual": r}
    # Erased from the last op back to the BN, so that each node has lost its users first.
    doomed = [plan.act_node] if plan.act_node is not None else []
    doomed += plan.after[::-1] + ([plan.add] if plan.add is not None else [])
    doomed += plan.before[::-1]
    if plan.act_node is not None:
        plan.act_node.replace_all_uses_with(plan.bn)
    for n in doomed:
        graph.erase_node(n)


def _unused_activations(gm: fx.GraphModule, plans: list) -> None:
    """An activation module whose every call the rewrite removed becomes nn.Identity, so a
    printed model does not show a ReLU it no longer applies (and a submodule method that
    still calls it, e.g. a backbone's `features`, computes what the converted model does)."""
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    for p in plans:
        n = p.act_node
        if n is not None and n.op == "call_module" and n.target not in called:
            m = gm.get_submodule(n.target)
            if not any(True for _ in m.parameters()) and not any(True for _ in m.buffers()):
                _set_module(gm, n.target, nn.Identity())


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
                  fuse_residual: bool = True, replace_relu: Optional[float] = None,
                  exact: bool = False) -> nn.Module:
    """Convert, where exact and safe, every BatchNorm -> invertible activation in the model's
    data flow to InPlaceABN, and with fuse_residual every BatchNorm -> add(., r) -> activation
    to one InPlaceABN called with residual=r. Returns the converted model (see the module
    docstring: the same object when only modules change, else a torch.fx.GraphModule with
    the same module names and state_dict keys).

    replace_relu=s also converts ReLU after BN (or BN + add) into LeakyReLU(s): this changes
    the function (for training from scratch or fine-tuning) and is warned about. Every BN left
    as it is, and why, is listed in one IABNConversionWarning; a model torch.fx cannot trace is
    returned unchanged with a warning.

    InPlaceABN's scale is |w| + eps, never below eps. A BN with channels whose gamma lies in
    [0, eps] (timm's zero_init_last starts the last BN of every block at 0) converts with
    those scales raised to eps: its output changes by at most (eps - gamma)*|x_hat| <=
    eps*|x_hat| (x_hat the normalised input), and a warning lists each such layer with its
    bound. exact=True refuses any change of function (those layers stay BN). A negative
    gamma is always refused. Fused layers whose BN output scale is small (zero-initialised
    gamma) are listed in a warning: under 16-bit autocast their gradients are mostly rounding.

    sync=True makes the in-place layers InPlaceABNSync over `group` (None: the default group),
    including InPlaceABN layers already in the model."""
    if not isinstance(exact, bool):
        raise TypeError(f"exact must be a bool, got {exact!r}")
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
    st = _State(modules, calls, fuse_residual, replace_relu, exact)
    for n in list(graph.nodes):
        if n.op == "call_module" and isinstance(modules[n.target], _BatchNorm):
            why = _analyse(n, st)
            if why:
                st.skipped.append(f"{n.target}: {why}")
    changed = [(p.bn.target, c) for p in st.plans if (c := st.scales[p.bn.target]) is not None]
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
        _unused_activations(out, st.plans)
    if sync:
        for name, m in list(out.named_modules()):
            if isinstance(m, IN_PLACE_MODULES) and name:
                _set_module(out, name, to_sync(m, group))
    if st.skipped:
        warnings.warn("convert_model left these BatchNorm layers unchanged:\n  "
                      + "\n  ".join(st.skipped), IABNConversionWarning, stacklevel=2)
    if changed:
        worst = max(c.bound for _, c in changed)
        warnings.warn(
            f"convert_model changed the function of {len(changed)} BatchNorm layers by at most "
            f"{worst:.3g}*|x_hat| (x_hat: the normalised input): their channels with 0 <= "
            "gamma <= eps get InPlaceABN's smallest scale, eps (exact=True keeps them BN):\n  "
            + "\n  ".join(c.line(name) for name, c in changed),
            IABNConversionWarning, stacklevel=2)
    fused = {p.bn.target: modules[p.bn.target] for p in st.plans if p.add is not None}
    if msg := fused_precision_warning(fused):
        warnings.warn(msg, IABNConversionWarning, stacklevel=2)
    relu = [p.bn.target for p in st.plans if p.relu_replaced]
    if relu:
        warnings.warn(f"convert_model replaced the ReLU after {len(relu)} BatchNorm layers by "
                      f"LeakyReLU({replace_relu}): this changes the function the model computes "
                      "(meant for training from scratch or fine-tuning): " + ", ".join(relu),
                      IABNConversionWarning, stacklevel=2)
    return out

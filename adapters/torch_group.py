"""Process groups of the ranks that take part, as the official `inplace_abn.group` offers them.

    group = active_group(this_rank_has_data)   # collective: every rank of the world calls it
    set_active_group(model, group)             # every submodule with set_group() gets it

Typical use: at evaluation time only some ranks hold images, and synchronized layers must
reduce over exactly those ranks. Unlike the official version (CUDA tensors only), this works
with any torch.distributed backend iabn can run on: gloo and other CPU-capable backends
exchange a CPU tensor, NCCL a tensor on the current CUDA device.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from iabn_core.validate import IABNError

__all__ = ["active_group", "set_active_group"]

# Groups created so far, by the frozenset of member ranks; valid for one default (WORLD)
# group only, so a destroyed and re-initialised process group starts a fresh cache.
_cache: dict = {"world": None, "groups": {}}


def _exchange_device(dist) -> torch.device:
    """A device whose tensors the default group's backend can all-gather."""
    if "cpu:" in dist.get_backend_config():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def active_group(active: bool) -> Optional[Any]:
    """The process group of every rank that passes `active=True` (the same object on every
    call with the same members: groups are created once and cached).

    Every rank of the default group must call it, in the same order (it all-gathers the
    flags, and creating a group is itself collective). Returns the default group when all
    ranks are active and None when none is, as the official package does; a rank that is not
    a member gets torch's non-member placeholder and must not run synchronized layers."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        raise IABNError("active_group needs an initialised torch.distributed process group "
                        "(call torch.distributed.init_process_group first)")
    world = dist.group.WORLD
    size, rank = dist.get_world_size(), dist.get_rank()
    if _cache["world"] is not world:
        _cache["world"] = world
        _cache["groups"] = {frozenset(range(size)): world, frozenset(): None}
    flag = torch.tensor([rank if active else -1], dtype=torch.long,
                        device=_exchange_device(dist))
    flags = [torch.empty_like(flag) for _ in range(size)]
    dist.all_gather(flags, flag)
    members = frozenset(int(f) for f in flags if int(f) >= 0)
    groups = _cache["groups"]
    if members not in groups:  # every rank sees the same members, so all create it together
        groups[members] = dist.new_group(sorted(members))
    return groups[members]


def set_active_group(module: nn.Module, group: Optional[Any]) -> None:
    """Give `group` to every submodule of `module` (itself included) that has `set_group`,
    e.g. InPlaceABNSync. Never call it between a forward and its backward."""
    def visit(m):
        if hasattr(m, "set_group"):
            m.set_group(group)

    module.apply(visit)

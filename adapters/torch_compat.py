"""`import inplace_abn` served by iabn, for code that cannot be edited (timm, the official
package's scripts, segmentation repositories):

    import iabn.torch
    iabn.torch.register_inplace_abn()          # once, before anything imports inplace_abn
    from inplace_abn.functions import inplace_abn, inplace_abn_sync   # iabn's functions

It puts four module objects into sys.modules: `inplace_abn`, `inplace_abn.abn`,
`inplace_abn.functions` and `inplace_abn.group`, each holding iabn's objects under the
official public names (listed in `_PUBLIC`) and an `__all__`. Only this process is affected,
and nothing is imported from, or written to, an installed official package.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import threading
import types

from iabn_core.validate import IABNError

from . import torch_group, torch_modules, torch_ops

__all__ = ["register_inplace_abn"]

PACKAGE = "inplace_abn"
# Public names of each official module -> the attribute of iabn that provides it.
# Not provided: `inplace_abn.functions.InPlaceABN` (the official autograd.Function, outside
# that module's __all__; its apply() takes the official native backend's (group, world_size)
# pair), the compiled `inplace_abn._backend`, and `__version__` (the official package may
# lack it too: it reads a generated _version file and skips it when absent).
_PUBLIC = {
    PACKAGE: {"ABN": torch_modules, "InPlaceABN": torch_modules,
              "InPlaceABNSync": torch_modules, "active_group": torch_group,
              "set_active_group": torch_group},
    PACKAGE + ".abn": {"ABN": torch_modules, "InPlaceABN": torch_modules,
                       "InPlaceABNSync": torch_modules, "inplace_abn": torch_ops,
                       "inplace_abn_sync": torch_ops},
    PACKAGE + ".functions": {"inplace_abn": torch_ops, "inplace_abn_sync": torch_ops},
    PACKAGE + ".group": {"active_group": torch_group, "set_active_group": torch_group},
}
# `__file__` of each stand-in: the iabn file that defines what it serves (the package: this
# file, which makes the stand-ins), so tools that print or open a module's file (timm's own
# check prints inplace_abn.__file__) find a real file that explains where the objects live.
_FILES = {PACKAGE: sys.modules[__name__], PACKAGE + ".abn": torch_modules,
          PACKAGE + ".functions": torch_ops, PACKAGE + ".group": torch_group}
_MARK = "__iabn_alias__"  # set on every module made here; anything else is someone else's
_lock = threading.Lock()


def _ours(module) -> bool:
    return getattr(module, _MARK, False) is True


def _alias_names() -> list:
    return [n for n in sys.modules if n == PACKAGE or n.startswith(PACKAGE + ".")]


def _make(name: str) -> types.ModuleType:
    is_package = name == PACKAGE
    mod = types.ModuleType(name, f"iabn's stand-in for `{name}` (iabn.torch."
                                 "register_inplace_abn); the objects are iabn's.")
    # A spec with a location, as a module imported from a file has, but no loader: nothing
    # can (re)load these from that file, which holds iabn's code, not this module's.
    spec = importlib.machinery.ModuleSpec(name, None, origin=_FILES[name].__file__,
                                          is_package=is_package)
    spec.has_location = True
    mod.__spec__, mod.__loader__, mod.__file__ = spec, None, spec.origin
    mod.__package__ = PACKAGE
    if is_package:
        mod.__path__ = []  # a package with no files: unknown submodules fail to import
    for attr, source in _PUBLIC[name].items():
        setattr(mod, attr, getattr(source, attr))
    mod.__all__ = list(_PUBLIC[name])
    setattr(mod, _MARK, True)
    return mod


def _refuse_foreign(force: bool) -> None:
    """IABNError if registering would mix with, or silently shadow, another inplace_abn."""
    foreign = [n for n in _alias_names() if not _ours(sys.modules[n])]
    imported = [n for n in foreign if sys.modules[n] is not None]
    if imported:
        origin = getattr(sys.modules[imported[0]], "__file__", None) or "unknown location"
        raise IABNError(
            f"register_inplace_abn: `{imported[0]}` is already imported from {origin} and is "
            "not iabn's; objects from it may already be in use, so it cannot be replaced. "
            "Call register_inplace_abn() before anything imports inplace_abn (e.g. first "
            "thing in the program), or use the installed package instead of iabn.")
    if force:
        return
    if foreign:  # sys.modules[name] = None: someone blocked these imports on purpose
        raise IABNError(f"register_inplace_abn: imports of {', '.join(foreign)} are blocked "
                        "(sys.modules entry None); pass force=True to register anyway")
    if PACKAGE not in sys.modules:
        spec = importlib.util.find_spec(PACKAGE)
        if spec is not None:
            where = spec.origin or ", ".join(spec.submodule_search_locations or []) or "?"
            raise IABNError(
                f"register_inplace_abn: an `inplace_abn` package is installed ({where}); "
                "registering would shadow it in this process. Pass force=True to use iabn in "
                "its place, or uninstall it.")


def register_inplace_abn(force: bool = False) -> types.ModuleType:
    """Make `import inplace_abn` (and `.abn`, `.functions`, `.group`) resolve to iabn in this
    process, so code written for the official package runs unchanged; returns the package.

    Call it before the first import of inplace_abn. Calling it again is harmless (the same
    modules are kept). Refused with IABNError if an `inplace_abn` not made by iabn is
    already imported, and, unless force=True, if the official package is installed (it would
    be shadowed) or its import is blocked."""
    with _lock:
        _refuse_foreign(force)
        pkg = sys.modules.get(PACKAGE)
        if pkg is None or not _ours(pkg):
            pkg = _make(PACKAGE)
        for name in _PUBLIC:
            if name == PACKAGE:
                continue
            short = name.rpartition(".")[2]
            sub = sys.modules.get(name)
            if sub is None or not _ours(sub):  # absent (or blocked, with force=True)
                sub = getattr(pkg, short, None) or _make(name)
            setattr(pkg, short, sub)
            sys.modules[name] = sub
        sys.modules[PACKAGE] = pkg
        return pkg

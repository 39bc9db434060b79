"""Every kernel instantiation, generated from the dtype table (iabn_core.dtypes.PAIRS).

A compiled module is one kernel file for one (input, parameter) dtype pair; its name
expressions are listed here and nowhere else, so NVRTC, CuPy, the emulator and the tests can
never disagree on what exists.
"""
from __future__ import annotations

from dataclasses import dataclass

from .dtypes import PAIRS, Pair

ACTIVATIONS = {"identity": "iabn::Identity", "leaky_relu": "iabn::LeakyRelu", "elu": "iabn::Elu"}
LAYOUTS = {"ncs": "iabn::LayoutNCS", "nsc": "iabn::LayoutNSC"}
ITEMSIZE = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2}
VECTOR_BYTES = 16  # one 128-bit transaction


def max_vec(dtype: str) -> int:
    return VECTOR_BYTES // ITEMSIZE[dtype]


def vec_options(dtype: str) -> tuple[int, ...]:
    return (1, max_vec(dtype))


def batch_stats(p: Pair, layout: str, vec: int) -> str:
    return f"iabn_batch_stats<{p.c_x}, {LAYOUTS[layout]}, {vec}>"


def stats_finalize(p: Pair) -> str:
    return f"iabn_stats_finalize<{p.c_acc}, {p.c_param}>"


def forward(p: Pair, act: str, layout: str, vec: int) -> str:
    return f"iabn_forward<{p.c_x}, {p.c_param}, {ACTIVATIONS[act]}, {LAYOUTS[layout]}, {vec}>"


def backward_reduce(p: Pair, act: str, layout: str, vec: int) -> str:
    return f"iabn_backward_reduce<{p.c_x}, {p.c_param}, {ACTIVATIONS[act]}, {LAYOUTS[layout]}, {vec}>"


def backward_finalize(p: Pair) -> str:
    return f"iabn_backward_finalize<{p.c_acc}, {p.c_param}>"


def backward_elementwise(p: Pair, act: str, layout: str, vec: int) -> str:
    return (f"iabn_backward_elementwise<{p.c_x}, {p.c_param}, {ACTIVATIONS[act]}, "
            f"{LAYOUTS[layout]}, {vec}>")


@dataclass(frozen=True)
class ModuleSpec:
    filename: str
    pair: Pair

    @property
    def names(self) -> tuple[str, ...]:
        p, vecs = self.pair, vec_options(self.pair.x)
        if self.filename == "stats.cu":
            per = [batch_stats(p, lay, v) for lay in LAYOUTS for v in vecs]
            return tuple(per) + (stats_finalize(p),)
        if self.filename == "forward.cu":
            return tuple(forward(p, a, lay, v) for a in ACTIVATIONS for lay in LAYOUTS for v in vecs)
        if self.filename == "backward.cu":
            red = [backward_reduce(p, a, lay, v) for a in ACTIVATIONS for lay in LAYOUTS for v in vecs]
            ew = [backward_elementwise(p, a, lay, v) for a in ACTIVATIONS for lay in LAYOUTS for v in vecs]
            return tuple(red) + tuple(ew) + (backward_finalize(p),)
        raise ValueError(f"unknown kernel file {self.filename!r}")


KERNEL_FILES = ("stats.cu", "forward.cu", "backward.cu")


def module_for(filename: str, pair: Pair) -> ModuleSpec:
    return ModuleSpec(filename, pair)


def all_modules() -> tuple[ModuleSpec, ...]:
    return tuple(ModuleSpec(f, p) for p in PAIRS for f in KERNEL_FILES)

"""The one dtype table: which (input, parameter) pairs exist, their C types and accumulators.

Every kernel instantiation, every validation message about dtypes and every tolerance in the
tests is derived from ``PAIRS``. Adding a pair here is the only change needed to compile and
test it everywhere.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

try:  # bfloat16 for NumPy arrays; optional so the package imports without it
    import ml_dtypes as _ml_dtypes

    BFLOAT16 = np.dtype(_ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - ml_dtypes is a hard dependency in setup.cfg
    BFLOAT16 = None

# numpy dtype name -> C type spelled as the kernels and NVRTC see it
C_TYPES = {
    "float32": "float",
    "float64": "double",
    "float16": "__half",
    "bfloat16": "__nv_bfloat16",
}

# accumulator per input dtype: float for every 16/32-bit type, double for float64
ACC = {"float32": "float32", "float64": "float64", "float16": "float32", "bfloat16": "float32"}


@dataclass(frozen=True)
class Pair:
    """An (input dtype, parameter/statistics dtype) combination the kernels are built for."""

    x: str
    param: str

    @property
    def acc(self) -> str:
        return ACC[self.x]

    @property
    def c_x(self) -> str:
        return C_TYPES[self.x]

    @property
    def c_param(self) -> str:
        return C_TYPES[self.param]

    @property
    def c_acc(self) -> str:
        return C_TYPES[self.acc]

    @property
    def key(self) -> str:
        return f"{self.x}_{self.param}"


# Parameters are float32 or the input dtype; float64 inputs take float64 parameters only.
PAIRS = (
    Pair("float32", "float32"),
    Pair("float64", "float64"),
    Pair("float16", "float32"),
    Pair("float16", "float16"),
    Pair("bfloat16", "float32"),
    Pair("bfloat16", "bfloat16"),
)

INPUT_DTYPES = tuple(dict.fromkeys(p.x for p in PAIRS))


def dtype_name(dtype) -> str:
    """Canonical name of a NumPy/CuPy dtype (bfloat16 included)."""
    dt = np.dtype(dtype)
    if BFLOAT16 is not None and dt == BFLOAT16:
        return "bfloat16"
    return dt.name


def numpy_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        if BFLOAT16 is None:
            raise ImportError("bfloat16 needs the ml_dtypes package (pip install ml_dtypes)")
        return BFLOAT16
    return np.dtype(name)


def default_param(x_name: str) -> str:
    """Parameter dtype used when no weight/bias/running stats pin it."""
    return "float64" if x_name == "float64" else "float32"


def find_pair(x_name: str, param_name: str) -> Pair | None:
    for p in PAIRS:
        if p.x == x_name and p.param == param_name:
            return p
    return None


def allowed_params(x_name: str) -> tuple[str, ...]:
    return tuple(p.param for p in PAIRS if p.x == x_name)

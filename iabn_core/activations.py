"""Activation names, their parameters, and the checks that keep them invertible."""
from __future__ import annotations

import math
import numbers

import numpy as np

# name -> (parameter meaning, whether it must be > 0)
ACTIVATIONS = {
    "identity": None,
    "leaky_relu": "negative slope",
    "elu": "alpha",
}


def check_real(name: str, v, acc_dtype: str | None, fail) -> float:
    """v as the kernels will see it: converted to the accumulator dtype (float64 when None).
    The result may be Inf or NaN; ranges are the caller's to check."""
    if not isinstance(v, numbers.Real) or isinstance(v, (bool, np.bool_)):
        fail(f"{name} must be a real number, got {type(v).__name__} {v!r}")
    try:
        f = float(v)
    except (OverflowError, ValueError, TypeError):  # e.g. 10**400, a huge Fraction
        f = math.inf if v > 0 else -math.inf
    if acc_dtype is None or acc_dtype == "float64":
        return f
    with np.errstate(over="ignore"):
        return float(np.dtype(acc_dtype).type(f))


def check_activation(activation, param, fail, acc_dtype: str | None = None) -> None:
    """`activation` a known name; its parameter finite in the accumulator dtype (float64 when
    None, as for a module that does not know its input dtype yet). leaky_relu's slope and elu's
    alpha must be > 0 for the activation to be invertible, and normal with a normal reciprocal:
    the inverse multiplies by 1/param, and the GPU flushes subnormals to 0."""
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        fail(f"activation must be one of {', '.join(map(repr, ACTIVATIONS))}, got {activation!r}")
    what = ACTIVATIONS[activation]
    p = check_real("activation_param", param, acc_dtype, fail)
    if what is None:
        if not math.isfinite(p):
            fail(f"activation_param must be finite, got {param!r}")
        return
    tiny = float(np.finfo(acc_dtype or "float64").tiny)
    if not (math.isfinite(p) and tiny <= p <= 1.0 / tiny):
        fail(f"activation_param ({what} of {activation}) must be a finite number > 0 for the "
             f"activation to be invertible, with it and its reciprocal normal in "
             f"{acc_dtype or 'float64'} (in [{tiny:.4g}, {1.0 / tiny:.4g}]), got {param!r}")

"""Activation names, their parameters, and the checks that keep them invertible."""
from __future__ import annotations

import math
import numbers

# name -> (parameter meaning, whether it must be > 0)
ACTIVATIONS = {
    "identity": None,
    "leaky_relu": "negative slope",
    "elu": "alpha",
}


# (smallest normal, largest finite) of each accumulator dtype. Plain floats rather than
# np.finfo: torch.compile traces these checks and does not trace into NumPy.
NORMAL_RANGE = {"float32": (1.1754943508222875e-38, 3.4028234663852886e38),
                "float64": (2.2250738585072014e-308, 1.7976931348623157e308)}


def check_real(name: str, v, fail) -> float:
    """v as a Python float (+-Inf when it is too large even for that); a non-real fails."""
    if not isinstance(v, numbers.Real) or isinstance(v, bool):
        fail(f"{name} must be a real number, got {type(v).__name__} {show(v)}")
    try:
        return float(v)
    except (OverflowError, ValueError, TypeError):  # e.g. 10**400, a huge Fraction
        return math.inf if v > 0 else -math.inf


def show(v) -> str:
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


def check_activation(activation, param, fail, acc_dtype: str | None = None) -> None:
    """`activation` a known name; its parameter finite in the accumulator dtype (float64 when
    None, as for a module that does not know its input dtype yet). leaky_relu's slope and elu's
    alpha must be > 0 for the activation to be invertible, and normal with a normal reciprocal:
    the inverse multiplies by 1/param, and the GPU flushes subnormals to 0."""
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        fail(f"activation must be one of {', '.join(map(repr, ACTIVATIONS))}, "
             f"got {show(activation)}")
    what = ACTIVATIONS[activation]
    p = check_real("activation_param", param, fail)
    acc = acc_dtype or "float64"
    tiny, big = NORMAL_RANGE[acc]
    if what is None:  # unused, but still passed to the kernels as an accumulator scalar
        if not (math.isfinite(p) and abs(p) <= big):
            fail(f"activation_param must be finite in {acc}, got {show(param)}")
        return
    if not (math.isfinite(p) and tiny <= p <= 1.0 / tiny):
        fail(f"activation_param ({what} of {activation}) must be a finite number > 0 for the "
             f"activation to be invertible, with it and its reciprocal normal in {acc} "
             f"(in [{tiny:.4g}, {1.0 / tiny:.4g}]), got {show(param)}")

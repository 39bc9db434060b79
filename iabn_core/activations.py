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


def check_activation(activation, param, fail) -> None:
    if activation not in ACTIVATIONS:
        fail(f"activation must be one of {', '.join(map(repr, ACTIVATIONS))}, got {activation!r}")
    what = ACTIVATIONS[activation]
    if what is None:
        return
    if not (isinstance(param, numbers.Real) and not isinstance(param, bool) and math.isfinite(param) and param > 0):
        fail(f"activation_param ({what} of {activation}) must be a finite number > 0 for the "
             f"activation to be invertible, got {param!r}")

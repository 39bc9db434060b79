"""Layout detection: collapse x of shape (N, C, *) to (N, C, S) or (N, S, C) from its strides.

Only two memory orders are handled natively (see kernels/layout.cuh). Anything else is an
error, never a silent copy: the operation writes its output into x's own memory.
"""
from __future__ import annotations

import math

import numpy as np

from .arrays import strided_view


def _matches(shape, strides, order) -> bool:
    """True if dims taken in `order` (outermost first) are densely packed; size-1 dims are free."""
    expected = 1
    for d in reversed(order):
        if shape[d] != 1 and strides[d] != expected:
            return False
        expected *= shape[d]
    return True


def detect(shape, strides_bytes, itemsize) -> str | None:
    """'ncs', 'nsc', or None. S == 1 reports 'nsc' (the two orders coincide)."""
    nd = len(shape)
    s = math.prod(shape[2:])
    if math.prod(shape) == 0:
        # No element is ever addressed, so any strides will do (NumPy gives empty copies zero
        # strides); synchronized BN runs ranks that hold no samples.
        return "nsc" if s == 1 else "ncs"
    if any(st % itemsize for st in strides_bytes):
        return None
    strides = [s // itemsize for s in strides_bytes]
    if s == 1 and _matches(shape, strides, list(range(nd))):
        return "nsc"
    if _matches(shape, strides, list(range(nd))):
        return "ncs"
    if _matches(shape, strides, [0] + list(range(2, nd)) + [1]):
        return "nsc"
    return None


def view3(a, layout: str):
    """The (N, C, S) or (N, S, C) view the kernels see; shares memory with `a`."""
    n, c = a.shape[0], a.shape[1]
    s = math.prod(a.shape[2:])
    if isinstance(a, np.ndarray):
        # Fast path: a C-contiguous array (size-1 dims' strides ignored, as `detect` does)
        # reshapes without copying, by NumPy's rules; the channels-last order is C-contiguous
        # once C is moved last. Anything else takes the explicit strided view.
        if layout == "ncs" and a.flags.c_contiguous:
            return a.reshape(n, c, s)
        if layout == "nsc":
            t = a.transpose((0,) + tuple(range(2, a.ndim)) + (1,))
            if t.flags.c_contiguous:
                return t.reshape(n, s, c)
    if layout == "ncs":
        return strided_view(a, (n, c, s), (c * s, s, 1))
    return strided_view(a, (n, s, c), (c * s, c, 1))

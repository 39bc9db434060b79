"""What the core needs to know about an array, for NumPy and CuPy alike, without importing CuPy."""
from __future__ import annotations

import numpy as np



_KINDS: dict = {np.ndarray: "numpy"}  # array type -> kind; called ~35 times per layer step


def kind(a) -> str | None:
    """'numpy', 'cupy', or None for anything else, ndarray subclasses included: np.matrix
    keeps two dims through indexing and reductions, a masked array's reductions skip masked
    values, so the NumPy backend's arithmetic would silently differ (validate.check_array
    says to pass np.asarray(a), a plain view of the same memory)."""
    t = type(a)
    k = _KINDS.get(t, False)
    if k is False:
        if t.__module__.startswith("cupy") and hasattr(a, "data") and hasattr(a, "device"):
            k = "cupy"
        else:
            k = None
        _KINDS[t] = k
    return k


def device(a) -> str:
    return "cpu" if kind(a) == "numpy" else f"cuda:{a.device.id}"


def device_scope(a):
    """Context making a CuPy array's device current (kernels and workspaces must live there);
    nothing for NumPy arrays."""
    import contextlib

    return a.device if kind(a) == "cupy" else contextlib.nullcontext()


def data_ptr(a) -> int:
    return a.ctypes.data if kind(a) == "numpy" else a.data.ptr


def writeable(a) -> bool:
    return bool(a.flags.writeable) if kind(a) == "numpy" else True


def byte_span(a) -> tuple[int, int]:
    """[start, end) of the bytes the array can touch, from its strides (negative ones included)."""
    start = end = data_ptr(a)
    for n, st in zip(a.shape, a.strides):
        if n == 0:
            return start, start
        if st >= 0:
            end += (n - 1) * st
        else:
            start += (n - 1) * st
    return start, end + a.itemsize


def overlaps(a, b) -> bool:
    a0, a1 = byte_span(a)
    b0, b1 = byte_span(b)
    return a0 < b1 and b0 < a1 and a1 > a0 and b1 > b0


def strided_view(a, shape, strides_elems):
    """View of `a`'s buffer with the given shape/strides (in elements); never copies."""
    strides = tuple(s * a.itemsize for s in strides_elems)
    if kind(a) == "numpy":
        return np.lib.stride_tricks.as_strided(a, shape=shape, strides=strides)
    import cupy

    return cupy.lib.stride_tricks.as_strided(a, shape=shape, strides=strides)


def zeros(like, shape, dtype_name: str):
    """Zeros of a canonical dtype, on `like`'s kind of array and device."""
    from .dtypes import numpy_dtype

    if kind(like) == "numpy":
        return np.zeros(shape, dtype=numpy_dtype(dtype_name))
    import cupy

    return cupy.zeros(shape, dtype=numpy_dtype(dtype_name))


def empty_like(a):
    """New uninitialised array with a's shape, dtype, device and memory order (order="K")."""
    if kind(a) == "numpy":
        return np.empty_like(a, order="K")
    import cupy

    return cupy.empty_like(a, order="K")

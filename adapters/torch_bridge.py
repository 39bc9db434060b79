"""Tensor <-> core-array bridging for iabn.torch: dtypes, zero-copy views (NumPy on the CPU,
CuPy through DLPack on CUDA), the kernel backends whose workspaces torch allocates, the CUDA
device/stream scope, and the torch.distributed communicator of a group name."""
from __future__ import annotations

import contextlib
import os
from typing import Optional

import numpy as np
import torch
from torch.utils.dlpack import from_dlpack, to_dlpack

from iabn_core.dtypes import BFLOAT16
from iabn_core.validate import IABNError

# Canonical dtype names (iabn_core.dtypes) <-> torch dtypes.
TORCH_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_SUPPORTED = frozenset(TORCH_DTYPES.values())


# ------------------------------------------------------------------------------------------
# Zero-copy bridging. Every core array below views the tensor's own memory, so the core's
# in-place writes land in the tensor.
# ------------------------------------------------------------------------------------------
_cupy_module = None


def _cupy():
    global _cupy_module
    if _cupy_module is None:  # imported once: this runs for every tensor crossing
        from iabn_core.backends.cuda import import_cupy

        _cupy_module = import_cupy()
    return _cupy_module


def to_core(t: Optional[torch.Tensor]):
    """NumPy (CPU) or CuPy (CUDA) array sharing t's memory; None stays None."""
    if t is None:
        return None
    if t.requires_grad:
        t = t.detach()  # .numpy() refuses tensors that require grad; detach() shares memory
    bf16 = t.dtype is torch.bfloat16
    if bf16:
        # torch has no NumPy dtype for bfloat16 (and CuPy < 14 none either): hand over the same
        # bits as int16 and reinterpret them as ml_dtypes.bfloat16 on the array side.
        t = t.view(torch.int16)
    if t.is_cpu:
        a = t.numpy()
    elif t.is_cuda:
        a = _EXCHANGE.to_cupy(t)
    else:
        raise IABNError(f"iabn supports CPU and CUDA tensors, got a tensor on {t.device}")
    return a.view(BFLOAT16) if bf16 else a


def from_core(a) -> torch.Tensor:
    """Tensor sharing the memory of a NumPy/CuPy array the core returned (no copy)."""
    bf16 = BFLOAT16 is not None and a.dtype == BFLOAT16
    if bf16:
        a = a.view(np.int16)
    t = torch.from_numpy(a) if isinstance(a, np.ndarray) else _EXCHANGE.to_torch(a)
    return t.view(torch.bfloat16) if bf16 else t


class _CapsuleExchange:
    """DLPack between torch and CuPy on CUDA, without the protocol's per-call stream handshake.

    `cupy.from_dlpack(t)` makes torch's `__dlpack__` look up the current device and streams
    in Python and, when they differ by name, create and record an event: tens of microseconds
    per tensor, and a training step of one layer crosses ~18 tensors. iabn needs none of it:
    every kernel runs on torch's current stream (_device_scope) and every workspace comes from
    torch's allocator on that stream, so both sides already agree on ordering. The capsules
    are exchanged with stream -1 ("no synchronisation", DLPack's Python spec), still zero-copy.
    The first crossing each way is a probe: any error, warning or a view that is not the same
    memory switches that direction back to the plain protocol for the rest of the process."""

    def __init__(self):
        self.fast_in = self.fast_out = None  # None: not probed yet

    @staticmethod
    def _same(a, t) -> bool:
        return a.data.ptr == t.data_ptr() and tuple(a.shape) == tuple(t.shape)

    def _first(self, attr: str, fast, plain, same):
        """The first crossing of direction `attr`: try `fast` with warnings as errors and
        check its view with `same`; remember the verdict and fall back to `plain` on failure."""
        import warnings

        out = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                out = fast()
            out = out if same(out) else None
        except Exception:  # any failure: the plain protocol from now on
            out = None
        setattr(self, attr, out is not None)
        return plain() if out is None else out

    def to_cupy(self, t):
        if self.fast_in:
            return _cupy().from_dlpack(to_dlpack(t))
        if self.fast_in is None:
            return self._first("fast_in", lambda: _cupy().from_dlpack(to_dlpack(t)),
                               lambda: _cupy().from_dlpack(t), lambda a: self._same(a, t))
        return _cupy().from_dlpack(t)

    def to_torch(self, a):
        if self.fast_out:
            return from_dlpack(a.__dlpack__(stream=-1))
        if self.fast_out is None:
            return self._first("fast_out", lambda: from_dlpack(a.__dlpack__(stream=-1)),
                               lambda: torch.from_dlpack(a), lambda t: self._same(a, t))
        return torch.from_dlpack(a)


_EXCHANGE = _CapsuleExchange()


def _torch_workspace(device_of):
    """A workspace allocator for the kernel backend drawing on torch's allocator on
    `device_of()`: on CUDA torch's caching allocator on the current device (and, during
    CUDA-graph capture, the graph's pool), so CuPy's own pool never grows beside torch's."""
    def workspace(shape, dtype_name):
        shape = tuple(int(d) for d in shape)  # plans may hand NumPy integers
        return to_core(torch.empty(shape, dtype=TORCH_DTYPES[dtype_name], device=device_of()))

    return workspace


_cuda_backend_instance = None
_null_backend_instance = None


def _null_backend():
    """The `null` kernel backend (IABN_BACKEND=null: a measuring tool) with workspaces from
    torch's CPU allocator, so CPU tensors take the CUDA path's host code step for step."""
    global _null_backend_instance
    if _null_backend_instance is None:
        from iabn_core.backends.kernel_backend import KernelBackend
        from iabn_core.backends.null import NullRuntime

        cpu = torch.device("cpu")
        _null_backend_instance = KernelBackend(NullRuntime(allocator=_torch_workspace(lambda: cpu)))
    return _null_backend_instance


def _backend_for(t: torch.Tensor):
    """None for CPU tensors (the core picks `numpy`, or `emulator` when IABN_BACKEND says so;
    `null` gets a torch-allocating null backend); for CUDA tensors the kernel backend whose
    workspaces torch allocates."""
    global _cuda_backend_instance
    if t.device.type != "cuda":
        return _null_backend() if os.environ.get("IABN_BACKEND") == "null" else None
    if _cuda_backend_instance is None:
        from iabn_core.backends.cuda import CudaRuntime
        from iabn_core.backends.kernel_backend import KernelBackend

        # "cuda" is torch's current device, which _device_scope has made CuPy's too
        current = torch.device("cuda")
        _cuda_backend_instance = KernelBackend(CudaRuntime(allocator=_torch_workspace(
            lambda: current)))
    return _cuda_backend_instance


@contextlib.contextmanager
def _device_scope(t: torch.Tensor):
    """For CUDA tensors: make t's device current for torch and CuPy, and run CuPy on torch's
    current stream of that device, so kernels are ordered with torch's work without any host
    synchronisation (and are captured when torch captures a CUDA graph)."""
    if t.device.type != "cuda":
        yield
        return
    cupy = _cupy()
    with torch.cuda.device(t.device), cupy.cuda.Device(t.device.index):
        ts = torch.cuda.current_stream(t.device)
        if hasattr(cupy.cuda.Stream, "from_external") and hasattr(ts, "__cuda_stream__"):
            # CuPy >= 14 and a torch that speaks the CUDA stream protocol
            cs = cupy.cuda.Stream.from_external(ts)
        else:  # CuPy 13
            cs = cupy.cuda.ExternalStream(ts.cuda_stream, t.device.index)
        with cs:
            yield


def _comm(group_name: str):
    """The communicator of a torch.distributed group named by `group_name` ("" -> None).

    The custom ops take the group's name, not the group (custom-op arguments must be tensors
    or plain values; this is how torch's functional collectives pass groups too), and call
    the collectives from inside the op. That keeps the sync path one opaque op per stage,
    like the local one: torch.compile does not trace into it, and the unsynchronised path
    (group_name "") is unchanged."""
    if not group_name:
        return None
    from torch.distributed.distributed_c10d import _resolve_process_group

    from iabn_core.comm import TorchDistributedComm

    return TorchDistributedComm(_resolve_process_group(group_name))


def _acc_dtype(x_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if x_dtype == torch.float64 else torch.float32

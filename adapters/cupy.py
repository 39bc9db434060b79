"""Array-level InPlace-ABN for CuPy arrays (GPU) and NumPy arrays (CPU).

    ctx = iabn.cupy.forward(x, weight, bias, running_mean, running_var, training=True, ...)
    # x now holds z = act(gamma * (x - mean) / sqrt(var + eps) + bias), gamma = |weight| + eps
    dx, dweight, dbias = iabn.cupy.backward(ctx, z, dz)   # dx is dz's buffer; z unchanged

    # residual form, z = act(BN(x) + r): r is like x, only read, and passed again to backward
    ctx = iabn.cupy.forward(x, weight, bias, ..., residual=r)
    dx, dweight, dbias, dr = iabn.cupy.backward(ctx, z, dz, residual=r)   # dr = dy, new buffer

CuPy arrays run the CUDA kernels; NumPy arrays run the vectorized NumPy backend, or the CPU
emulator of the same CUDA kernels with backend="emulator" (or IABN_BACKEND=emulator).
"""
from __future__ import annotations

from iabn_core.ops import Context, backward, forward
from iabn_core.validate import IABNError

__all__ = ["forward", "backward", "Context", "IABNError"]

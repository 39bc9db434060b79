"""Worker for test_distributed.test_cupyx_matches_reference (needs >= 2 GPUs): one process per
GPU, cupyx.distributed NCCL, iabn.cupy.forward/backward(..., comm=CupyxComm(...)) on CuPy
arrays, compared with the float64 closed form on the concatenated batch."""
from __future__ import annotations

import traceback

import numpy as np


def run(rank, world, sizes, queue, port=13391):
    try:
        import cupy
        import cupyx.distributed

        import iabn.cupy as iabn_arrays
        from iabn_core import reference as ref
        from iabn_core.comm import CupyxComm

        cupy.cuda.Device(rank).use()
        comm = CupyxComm(cupyx.distributed.init_process_group(world, rank, port=port))
        rng = np.random.default_rng(3)
        n, c, s = sum(sizes), 6, 10
        x, dz = rng.normal(size=(n, c, s)) + 1, rng.normal(size=(n, c, s))
        w, b = rng.normal(size=c), rng.normal(size=c)
        off = np.cumsum([0] + list(sizes))
        sl = slice(off[rank], off[rank + 1])
        xr, dzr = cupy.asarray(x[sl]), cupy.asarray(dz[sl])
        rm, rv = cupy.zeros(c), cupy.ones(c)
        ctx = iabn_arrays.forward(xr, cupy.asarray(w), cupy.asarray(b), rm, rv,
                                  activation="elu", activation_param=1.0, comm=comm)
        dx, _, _ = iabn_arrays.backward(ctx, xr, dzr)
        e = ref.forward(x, w, b, np.zeros(c), np.ones(c), training=True, activation="elu",
                        param=1.0)
        g = ref.backward(e["z"], dz, e["invstd"], e["count"], w, b, training=True,
                         activation="elu", param=1.0)
        errs = [ref.rel_error(xr.get(), e["z"][sl]), ref.rel_error(dx.get(), g["dx"][sl]),
                ref.rel_error(rm.get(), e["running_mean"]),
                ref.rel_error(rv.get(), e["running_var"])]
        bad = cupy.ones((2, 4 + rank, 3))  # channel mismatch: an error on every rank
        try:
            iabn_arrays.forward(bad, comm=comm)
            mismatch = "no error"
        except iabn_arrays.IABNError as exc:
            mismatch = "ok" if "channel counts differ" in str(exc) else str(exc)
        ok = max(errs) <= 1e-10 and mismatch == "ok"
        queue.put("ok" if ok else f"rank {rank}: errors {errs}, mismatch: {mismatch}")
    except Exception:
        queue.put(f"rank {rank}: {traceback.format_exc()}")

"""Bugs found by the review of the core (buffer-level ops, validation, signature cache,
kernels), each with the smallest reproducer."""
from __future__ import annotations

import numpy as np
import pytest

from iabn_core import ops, reference as ref, signature
from iabn_core.validate import IABNError

BACKENDS = ["numpy", "emulator"]


def _inputs(seed=0, shape=(3, 4, 5)):
    rng = np.random.default_rng(seed)
    c = shape[1]
    x = rng.normal(size=shape).astype(np.float32)
    w = rng.uniform(0.5, 1.5, c).astype(np.float32)
    b = rng.normal(size=c).astype(np.float32)
    return x, w, b, np.zeros(c, np.float32), np.ones(c, np.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cached", [False, True])
def test_backward_with_out_only_reads_dz_so_a_read_only_dz_is_accepted(backend, cached):
    """README: `backward(ctx, z, dz, out=buf)`: dx into buf, dz only read. A read-only dz was
    refused ("dz is read-only; backward writes dx into dz's buffer") on both the cached and
    the uncached path, although nothing writes it."""
    if not cached:
        signature.clear()
    x, w, b, rm, rv = _inputs()
    x0 = x.copy()
    if cached:  # make the signature a hit
        ops.forward(x.copy(), w, b, rm.copy(), rv.copy(), backend=backend)
    ctx = ops.forward(x, w, b, rm, rv, backend=backend)
    dz = np.random.default_rng(1).normal(size=x.shape).astype(np.float32)
    dz0 = dz.copy()
    dz.flags.writeable = False
    out = np.empty_like(x)
    dx, dw, db = ops.backward(ctx, x, dz, out=out)
    assert dx is out and dz.tobytes() == dz0.tobytes()
    st = ref.forward(x0.astype(np.float64), w, b, training=True, eps=1e-5,
                     activation="leaky_relu", param=0.01)
    exp = ref.backward(x.astype(np.float64), dz0.astype(np.float64), st["invstd"], st["count"],
                       w, b, training=True, eps=1e-5, activation="leaky_relu", param=0.01)
    for got, want in ((dx, exp["dx"]), (dw, exp["dweight"]), (db, exp["dbias"])):
        assert ref.rel_error(got, want) < 1e-4
    # without out=, dx goes over dz: a read-only dz is still refused
    with pytest.raises(IABNError, match="^dz is read-only"):
        ops.backward(ctx, x, dz)

"""Fixed-order, count-weighted merge of per-piece (count, mean, biased var) statistics.

Shared by the core (for CuPy arrays) and the NumPy backend, so both merge identically.
"""
from __future__ import annotations

import numpy


def merge_partials(partials, xp=numpy):
    """Merge (R, 3, C) partials (rows count, mean, biased var) into (3, C).

    Chan's parallel formula, pieces folded strictly left to right (piece 0, then 1, ...), so
    the result is bitwise reproducible for a given R regardless of how pieces were produced:
        n = na + nb, delta = mean_b - mean_a
        mean = mean_a + delta * nb / n
        var  = (var_a * na + var_b * nb + delta^2 * na * nb / n) / n
    A piece with count 0 drops out: its mean/var (possibly garbage or NaN) are never selected,
    and no 0/0 is ever evaluated. All pieces empty gives (0, 0, 0).
    Computes in the dtype of ``partials``; vectorized over C, looped over R.
    """
    if partials.ndim != 3 or partials.shape[1] != 3:
        raise ValueError(f"partials must be (R, 3, C), got shape {tuple(partials.shape)}")
    r, _, c = partials.shape
    zero = xp.zeros((c,), dtype=partials.dtype)
    if r == 1:
        # One piece: the loop below takes it verbatim where its count is > 0 (n = 0 + n_b is
        # exact) and (0, 0, 0) elsewhere; the same values, bit for bit, in five operations.
        take = partials[0, 0] > 0
        return xp.stack([xp.where(take, partials[0, k], zero) for k in range(3)])
    n_a, mean_a, var_a = zero, zero, zero
    for i in range(r):
        n_b, mean_b, var_b = partials[i, 0], partials[i, 1], partials[i, 2]
        n = n_a + n_b
        safe_n = xp.where(n > 0, n, xp.ones_like(n))  # denominators only; masked below
        delta = mean_b - mean_a
        frac_b = n_b / safe_n
        mean = mean_a + delta * frac_b
        var = (var_a * n_a + var_b * n_b + delta * delta * n_a * frac_b) / safe_n
        # First non-empty piece: take it verbatim (mean_a is a placeholder 0 there).
        first = n_a <= 0
        mean = xp.where(first, mean_b, mean)
        var = xp.where(first, var_b, var)
        # Empty piece: keep the accumulator untouched, whatever mean_b/var_b hold.
        take = n_b > 0
        mean_a = xp.where(take, mean, mean_a)
        var_a = xp.where(take, var, var_a)
        n_a = xp.where(take, n, n_a)
    return xp.stack([n_a, mean_a, var_a])

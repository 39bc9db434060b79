"""Per-signature call plans for adapters that hold raw pointers (iabn.torch's eager path).

A `ForwardCall` / `BackwardCall` is made once per call signature, after a call of that
signature passed full validation (iabn_core.signature, validate). Per call it takes the
buffers' pointers as integers and makes, on those integers alone, every check that depends on
this call's memory (element alignment, overlap between what is written and anything else)
before it hands out the launch program of the pointers' alignment class
(iabn_core.program). A check that fails returns None: the caller then takes the full path,
whose validation raises the error that names the argument. Nothing here allocates or writes.
"""
from __future__ import annotations

from .backends.base import STATS_ROWS
from .backends.kernel_backend import KernelBackend
from .backends.recording import ALIGN_INPUTS
from .dtypes import numpy_dtype
from .instantiations import VECTOR_BYTES
from .program import Program
from .signature import Signature

_V = VECTOR_BYTES - 1


class ForwardCall:
    """Pointers, in order: x, weight, bias, running_mean, running_var, residual,
    num_batches_tracked (0: absent; the counter is an int64 the forward kernel increments)."""

    __slots__ = ("be", "prob", "training", "has_residual", "xsize", "psize", "param_bytes",
                 "acc_size", "present", "spans", "vector", "stats_bytes", "_progs",
                 "_param_ext")

    def __init__(self, sig: Signature, be: KernelBackend, training: bool, has_residual: bool,
                 present: tuple):
        self.be, self.prob = be, sig.prob
        self.training, self.has_residual = training, has_residual
        self.xsize = numpy_dtype(self.prob.x_dtype).itemsize
        self.psize = numpy_dtype(self.prob.param_dtype).itemsize
        self.param_bytes = self.psize * self.prob.c  # one (C,) parameter or running stat
        self.acc_size = numpy_dtype(self.prob.acc_dtype).itemsize
        self.spans = sig.spans  # x's, then each present parameter's (start, end) offsets
        self.present = present  # indices (1-4, into the pointers) of the parameters given
        self.vector = be._widest(self.prob) > 1  # else one program serves every alignment
        self.stats_bytes = STATS_ROWS * self.prob.c * self.acc_size  # the workspace's head
        self._progs: dict[int, Program] = {}
        # parameter pointers (w, b, running stats, counter) -> their extents, once checked:
        # a layer's parameters are the same buffers call after call, and layers that share
        # a signature each keep their entry
        self._param_ext: dict[tuple, tuple] = {}

    def _check_params(self, ptrs):
        """Alignment of the parameters (and the batch counter) and their pairwise
        disjointness; returns their extents, or None when a check fails."""
        _, w, b, m, v, _, n = ptrs
        ps = self.psize
        if w % ps or b % ps or m % ps or v % ps or n % 8:
            return None
        ext = sorted((ptrs[i] + plo, ptrs[i] + phi)
                     for i, (plo, phi) in zip(self.present, self.spans[1:]))
        for (_, end), (start, _) in zip(ext, ext[1:]):
            if start < end:
                return None
        if len(self._param_ext) >= 256:  # freed and reallocated parameters: start over
            self._param_ext.clear()
        ext = tuple(ext)
        self._param_ext[(w, b, m, v, n)] = ext
        return ext

    def max_ws_elems(self) -> int:
        """The largest workspace (accumulator elements) any alignment class needs."""
        return _max_ws(self.be, self.prob, ("forward",), self.training, self.has_residual,
                       self.vector, self.acc_size)

    def program(self, ptrs: tuple):
        """The program for these pointers, or None when a buffer check fails."""
        x, w, b, m, v, r, n = ptrs
        xs = self.xsize
        if x % xs or r % xs:
            return None
        param_ext = self._param_ext.get((w, b, m, v, n))
        if param_ext is None:  # parameter buffers not seen yet: their own checks, once
            param_ext = self._check_params(ptrs)
            if param_ext is None:
                return None
        lo, hi = self.spans[0]
        x0, x1 = x + lo, x + hi
        for p0, p1 in param_ext:  # x is written: it overlaps no parameter
            if p0 < x1 and x0 < p1:
                return None
        if r:  # read only: it must not share memory with what the call writes
            r0, r1 = r + lo, r + hi
            if r0 < x1 and x0 < r1:
                return None
            if self.training:
                for p in (m, v):
                    if p and r0 < p + self.param_bytes and p < r1:
                        return None
        mask = 0
        if self.vector:
            mask = (not x & _V) | (not r & _V) << 1
        prog = self._progs.get(mask)
        if prog is None:
            prog = self._progs[mask] = self.be.program(self.prob, "forward", self.training,
                                                       self.has_residual, mask)
        return prog


class BackwardCall:
    """Pointers, in order: z, dz, dx, stats, weight, bias, residual, dresidual, dweight,
    dbias. dx, dresidual, dweight and dbias are the caller's fresh allocations, and z, dz,
    residual only read, so the checks are the alignment of what the caller was handed."""

    __slots__ = ("be", "prob", "training", "has_residual", "xsize", "vector", "acc_size",
                 "_progs")

    def __init__(self, fwd: ForwardCall):
        self.be, self.prob = fwd.be, fwd.prob
        self.training, self.has_residual = fwd.training, fwd.has_residual
        self.xsize, self.vector, self.acc_size = fwd.xsize, fwd.vector, fwd.acc_size
        self._progs: dict[tuple, Program] = {}

    def max_ws_elems(self) -> int:
        """The largest scratch (accumulator elements) any alignment class needs."""
        return _max_ws(self.be, self.prob, ("backward", "backward_inplace"), self.training,
                       self.has_residual, self.vector, self.acc_size)

    def program(self, ptrs: tuple, inplace: bool):
        z, dz, dx, _, _, _, r, dr, _, _ = ptrs
        xs = self.xsize
        if z % xs or dz % xs or r % xs:
            return None
        mask = 0
        if self.vector:
            mask = ((not z & _V) | (not dz & _V) << 1 | (not dx & _V) << 2 | (not r & _V) << 3
                    | (not dr & _V) << 4)
        prog = self._progs.get((mask, inplace))
        if prog is None:
            kind = "backward_inplace" if inplace else "backward"
            prog = self._progs[(mask, inplace)] = self.be.program(
                self.prob, kind, self.training, self.has_residual, mask)
        return prog


def _max_ws(be, prob, kinds, training, has_residual, vector, acc_size) -> int:
    """The workspace size is set by the grids, which depend on the vector width alone: the
    all-aligned and the unaligned program bound every class."""
    sizes = []
    for k in kinds:
        full = (1 << len(ALIGN_INPUTS["forward" if k == "forward" else "backward"])) - 1
        for m in ((0, full) if vector else (0,)):
            sizes.append(be.program(prob, k, training, has_residual, m).ws_bytes)
    return max(sizes) // acc_size


def disjoint_writes(span: tuple, written: tuple, read: tuple, small: tuple) -> bool:
    """Whether no written x-like buffer (pointers in `written`, each spanning `span` from its
    pointer) shares a byte with another written one, with a read x-like one (`read`), or with
    a small buffer ((start, end) pairs in `small`). 0 pointers are absent. For callers that
    are handed their output buffers (a custom op's body) rather than allocating them."""
    lo, hi = span
    for i, w in enumerate(written):
        if not w:
            continue
        a0, a1 = w + lo, w + hi
        for j, o in enumerate(written + read):
            if o and j != i and o + lo < a1 and a0 < o + hi:
                return False
        for s0, s1 in small:
            if s0 < a1 and a0 < s1:
                return False
    return True

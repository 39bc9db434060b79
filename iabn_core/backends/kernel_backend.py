"""The backend that runs the CUDA kernels, shared by the GPU (CuPy), the CPU emulator and the
`null` measuring runtime.

Everything but the engine is common: picking the instantiation, planning the grid, allocating
the small per-channel buffers and marshalling arguments. A `Runtime` supplies the engine:
  function(spec, name) -> launchable kernel   (called as k(grid, block, args): the stages)
  handle(fn), launch_packed(handle, gx, gy, gz, bx, by, bz, smem, stream, params, extra)
                                              (the driver-shaped launch programs replay)
  empty(shape, dtype_name) -> array           (uninitialised; every kernel writes all it reads)
  sm_count, ptr(array), null (the value passed for a null pointer), stream()

The stage methods (batch_stats, finalize, forward, ...) launch at once; synchronized BN runs
them one by one with its exchanges between. The unsynchronised sequences, forward_all and
backward_all, run as launch programs (iabn_core.program): recorded once per problem, flags
and alignment class by running the same stage code over named buffers, then replayed per call
with this call's pointers. The optional residual (and its gradient) is a null pointer when
absent: the same instantiations serve both forms, with a block-uniform branch in the loop body.
Kernel handles, grids, packed scalar arguments and programs are derived once per Problem and
kept in `prob.memo` (see iabn_core.signature).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from .. import instantiations as inst
from .. import plan as planning
from ..dtypes import find_pair, numpy_dtype
from ..program import Program
from .base import PARTIAL_ROWS, STATS_ROWS, SUM_ROWS, Composites, Problem

MODE_MERGE, MODE_TRAIN, MODE_EVAL = 0, 1, 2  # FinalizeMode in kernels/finalize.cuh
_MODE = (np.int32(MODE_MERGE), np.int32(MODE_TRAIN), np.int32(MODE_EVAL))
_FLAG = (np.int32(0), np.int32(1))

# kernel file and instantiation-name builder of each grid-stride stage
_STAGES = {
    "batch_stats": ("stats.cu", lambda p, prob, v: inst.batch_stats(p, prob.layout, v)),
    "forward": ("forward.cu", lambda p, prob, v: inst.forward(p, prob.activation, prob.layout, v)),
    "backward_reduce": ("backward.cu", lambda p, prob, v: inst.backward_reduce(
        p, prob.activation, prob.layout, v)),
    "backward_elementwise": ("backward.cu", lambda p, prob, v: inst.backward_elementwise(
        p, prob.activation, prob.layout, v)),
}


class Recipe(NamedTuple):
    """A launch minus its buffers: kernel, grid, block, and the packed scalar arguments that
    come before (`scalars`) and after (`shape`: N, C, S, seg) the per-call ones; `count` is
    N * S in the accumulator dtype (the eval count the finalize step takes)."""

    fn: object
    grid: tuple
    block: tuple
    scalars: tuple
    shape: tuple
    g: int
    count: object = None


class KernelBackend(Composites):
    def __init__(self, runtime):
        self.rt = runtime
        self.name = runtime.name
        self.launches = 0  # kernel launches so far; tests assert per-step counts

    def prepare(self, prob: Problem, filenames) -> None:
        """Compile/load the modules a call will use, before it writes anything."""
        key = (self.rt, "prepared", tuple(filenames))
        if key in prob.memo:
            return
        pair = self._pair(prob)
        for f in filenames:
            spec = inst.module_for(f, pair)
            self.rt.function(spec, spec.names[0])
        prob.memo[key] = True

    # -- what is derived once per problem --------------------------------------------------
    def _pair(self, prob: Problem):
        return find_pair(prob.x_dtype, prob.param_dtype)

    def _acc(self, prob: Problem, v: float):
        return numpy_dtype(prob.acc_dtype).type(v)

    def _recipe(self, prob: Problem, stage: str, vec: int) -> Recipe:
        key = (self.rt, stage, vec)
        r = prob.memo.get(key)
        if r is None:
            filename, name_of = _STAGES[stage]
            pair = self._pair(prob)
            plan = planning.elementwise(prob, vec, self.rt.sm_count)
            fn = self.rt.function(inst.module_for(filename, pair), name_of(pair, prob, vec))
            scalars = () if stage == "batch_stats" else (
                self._acc(prob, prob.eps), self._acc(prob, prob.activation_param))
            i64 = np.int64
            shape = (i64(prob.n), i64(prob.c), i64(prob.s), i64(plan.seg))
            r = prob.memo[key] = Recipe(fn, plan.grid, plan.block, scalars, shape, plan.g,
                                        self._acc(prob, prob.count))
        return r

    def _per_channel(self, prob: Problem, filename: str, name_of) -> Recipe:
        """Recipe of a one-thread-per-channel finalize kernel."""
        key = (self.rt, filename, "per_channel")
        r = prob.memo.get(key)
        if r is None:
            pair = self._pair(prob)
            grid, block = planning.per_channel(prob.c)
            fn = self.rt.function(inst.module_for(filename, pair), name_of(pair))
            scalars = (self._acc(prob, prob.eps), self._acc(prob, prob.count))
            r = prob.memo[key] = Recipe(fn, grid, block, scalars, (np.int64(prob.c),), 1)
        return r

    def _widest(self, prob: Problem) -> int:
        """The vector width the problem's inner extent allows; pointers may still force 1."""
        key = (self.rt, "vec")
        v = prob.memo.get(key)
        if v is None:
            v = planning.choose_vec(prob, ())
            prob.memo[key] = v
        return v

    # -- per call ---------------------------------------------------------------------------
    def _vec(self, prob: Problem, *arrays) -> int:
        """planning.choose_vec, with the pointer-independent half memoized; None entries (an
        absent residual) are skipped."""
        v = self._widest(prob)
        if v > 1:
            ptr = self.rt.ptr
            for a in arrays:
                if a is not None and ptr(a) % inst.VECTOR_BYTES:
                    return 1
        return v

    def _run(self, r: Recipe, args) -> None:
        self.launches += 1
        r.fn(r.grid, r.block, args)

    def _opt(self, a):
        return self.rt.null if a is None else a

    def _acc_empty(self, prob: Problem, *rows):
        """One allocation of the accumulator dtype, cut into (r, C) / (r, g, C)-shaped pieces
        (each piece a tuple of leading dims), in order."""
        c = prob.c
        sizes = [math.prod(r) * c for r in rows]
        ws = self.rt.empty((sum(sizes),), prob.acc_dtype)
        out, o = [], 0
        for r, n in zip(rows, sizes):
            out.append(ws[o:o + n].reshape(r + (c,)))
            o += n
        return out

    # -- statistics --------------------------------------------------------------------------
    def _batch_stats_into(self, r: Recipe, x3, partials):
        self._run(r, (x3, partials) + r.shape)

    def batch_stats(self, prob: Problem, x3):
        r = self._recipe(prob, "batch_stats", self._vec(prob, x3))
        (partials,) = self._acc_empty(prob, (r.g, PARTIAL_ROWS))
        self._batch_stats_into(r, x3, partials)
        return partials

    def _finalize_into(self, prob, out, partials, running_mean, running_var, momentum, mode):
        r = self._per_channel(prob, "stats.cu", inst.stats_finalize)
        nrows = 0 if partials is None else partials.shape[0]
        # Eval only reads the running stats, through the kernel's const pointers, so read-only
        # running stats are fine there (the same rule validate applies for every backend).
        rm, rv = self._opt(running_mean), self._opt(running_var)
        nz = self._opt(None)
        read, update = ((rm, rv), (nz, nz)) if mode == MODE_EVAL else ((nz, nz), (rm, rv))
        self._run(r, (self._opt(partials), np.int64(nrows)) + r.shape + (out,) + read + update
                  + (self._acc(prob, momentum),) + r.scalars + (_MODE[mode],))

    def merge_stats(self, prob: Problem, partials):
        (out,) = self._acc_empty(prob, (PARTIAL_ROWS,))
        self._finalize_into(prob, out, partials, None, None, 0.0, MODE_MERGE)
        return out

    def finalize(self, prob: Problem, partials, running_mean, running_var, momentum, training):
        (out,) = self._acc_empty(prob, (STATS_ROWS,))
        self._finalize_into(prob, out, partials, running_mean, running_var, momentum,
                            MODE_TRAIN if training else MODE_EVAL)
        return out

    # -- forward / backward ------------------------------------------------------------------
    def _forward_with(self, prob, vec, x3, stats, weight, bias, residual3=None, mode=MODE_MERGE,
                      partials=None, running_mean=None, running_var=None, momentum=0.0,
                      batches=None):
        """mode MODE_MERGE: stats given; MODE_TRAIN / MODE_EVAL: the kernel finalizes the
        stats itself from the partials / the running stats (kernels/forward.cu)."""
        r = self._recipe(prob, "forward", vec)
        nz = self._opt(None)
        rm, rv = self._opt(running_mean), self._opt(running_var)
        read, update = ((rm, rv), (nz, nz)) if mode == MODE_EVAL else ((nz, nz), (rm, rv))
        nrows = 0 if partials is None else partials.shape[0]
        self._run(r, (x3, stats, self._opt(weight), self._opt(bias)) + r.scalars + r.shape
                  + (self._opt(residual3), self._opt(partials), np.int64(nrows)) + read + update
                  + (self._acc(prob, momentum), r.count, _MODE[mode], self._opt(batches)))

    def forward(self, prob: Problem, x3, stats, weight, bias, residual3=None):
        self._forward_with(prob, self._vec(prob, x3, residual3), x3, stats, weight, bias,
                           residual3)

    def forward_all(self, prob: Problem, x3, running_mean, running_var, momentum, training,
                    weight, bias, residual3=None):
        """The unsynchronised forward as one launch program (`_forward_sequence`): returns the
        stats (4, C), the head of the one workspace allocation."""
        ptr = self._ptr
        ptrs = (ptr(x3), ptr(weight), ptr(bias), ptr(running_mean), ptr(running_var),
                ptr(residual3), 0)
        prog = self.program(prob, "forward", training, residual3 is not None,
                            self.align_mask(prob, ptrs[0], ptrs[5]))
        ws = self.rt.empty((prog.ws_bytes // _itemsize(prob.acc_dtype),), prob.acc_dtype)
        prog.run(ptrs, ptr(ws), float(momentum), self.rt.stream())
        return ws[:STATS_ROWS * prob.c].reshape(STATS_ROWS, prob.c)

    def _forward_sequence(self, prob: Problem, x3, running_mean, running_var, momentum, training,
                          weight, bias, residual3=None, batches=None):
        """The unsynchronised forward's launches: 2 in training (batch_stats, then forward
        finalizing for itself; 3 when the partials are too many for every block to merge them,
        plan.fuse_merge: batch_stats, finalize, forward), 1 in eval, and one workspace: the
        stats at its head and, behind them, the block partials (G x 3 x C accumulators, a few
        KiB at most, which stay allocated as long as the stats do)."""
        vec = self._vec(prob, x3, residual3)  # batch_stats reads x alone: its width may differ
        vec_stats = vec if vec > 1 or residual3 is None else self._vec(prob, x3)
        if training:
            r = self._recipe(prob, "batch_stats", vec_stats)
            stats, partials = self._acc_empty(prob, (STATS_ROWS,), (r.g, PARTIAL_ROWS))
            self._batch_stats_into(r, x3, partials)
            if planning.fuse_merge(prob, r.g, vec):
                self._forward_with(prob, vec, x3, stats, weight, bias, residual3, MODE_TRAIN,
                                   partials, running_mean, running_var, momentum, batches)
            else:  # many partials (small C): one split merge, not one per block
                self._finalize_into(prob, stats, partials, running_mean, running_var, momentum,
                                    MODE_TRAIN)
                self._forward_with(prob, vec, x3, stats, weight, bias, residual3,
                                   batches=batches)
        else:
            (stats,) = self._acc_empty(prob, (STATS_ROWS,))
            self._forward_with(prob, vec, x3, stats, weight, bias, residual3, MODE_EVAL, None,
                               running_mean, running_var, batches=batches)
        return stats

    def _reduce_into(self, r, z3, dz3, partials, weight, bias, residual3=None):
        self._run(r, (z3, dz3, partials, self._opt(weight), self._opt(bias)) + r.scalars
                  + r.shape + (self._opt(residual3),))

    def backward_reduce(self, prob: Problem, z3, dz3, stats, weight, bias, residual3=None):
        r = self._recipe(prob, "backward_reduce", self._vec(prob, z3, dz3, residual3))
        (partials,) = self._acc_empty(prob, (r.g, SUM_ROWS))
        self._reduce_into(r, z3, dz3, partials, weight, bias, residual3)
        return partials

    def _param_grads(self, prob: Problem):
        """dweight and dbias (None when absent): outputs the caller keeps, each its own
        allocation so that neither keeps the other (or a workspace) alive."""
        dweight = self.rt.empty((prob.c,), prob.param_dtype) if prob.has_weight else None
        dbias = self.rt.empty((prob.c,), prob.param_dtype) if prob.has_bias else None
        return dweight, dbias

    def _backward_finalize_into(self, prob, partial_sums, sums, weight, dweight, dbias):
        r = self._per_channel(prob, "backward.cu", inst.backward_finalize)
        self._run(r, (partial_sums, np.int64(partial_sums.shape[0])) + r.shape
                  + (sums, self._opt(weight), self._opt(dweight), self._opt(dbias)))

    def backward_finalize(self, prob: Problem, partial_sums, weight, bias):
        (sums,) = self._acc_empty(prob, (SUM_ROWS,))
        dweight, dbias = self._param_grads(prob)
        self._backward_finalize_into(prob, partial_sums, sums, weight, dweight, dbias)
        return sums, dweight, dbias

    def _elementwise_with(self, prob, vec, z3, dz3, dx3, stats, sums, weight, bias, training,
                          residual3=None, dresidual3=None, partials=None, dweight=None,
                          dbias=None):
        """With `partials`, the kernel sums them itself (instead of reading `sums`) and stores
        dweight/dbias (kernels/backward.cu)."""
        r = self._recipe(prob, "backward_elementwise", vec)
        nrows = 0 if partials is None else partials.shape[0]
        self._run(r, (z3, dz3, dx3, stats, self._opt(sums), self._opt(weight), self._opt(bias))
                  + r.scalars + (_FLAG[1 if training else 0],) + r.shape
                  + (self._opt(residual3), self._opt(dresidual3), self._opt(partials),
                     np.int64(nrows), self._opt(dweight), self._opt(dbias)))

    def backward_elementwise(self, prob: Problem, z3, dz3, stats, sums, weight, bias, training,
                             dx3=None, residual3=None, dresidual3=None):
        dx3 = dz3 if dx3 is None else dx3
        vec = self._vec(prob, z3, dz3, dx3, residual3, dresidual3)
        self._elementwise_with(prob, vec, z3, dz3, dx3, stats, sums, weight, bias, training,
                               residual3, dresidual3)

    def backward_all(self, prob: Problem, z3, dz3, stats, weight, bias, training, dx3=None,
                     residual3=None, dresidual3=None):
        """The unsynchronised backward as one launch program (`_backward_sequence`); returns
        (dweight, dbias), each its own allocation (None where absent)."""
        ptr = self._ptr
        inplace = dx3 is None or dx3 is dz3
        dweight, dbias = self._param_grads(prob)
        ptrs = (ptr(z3), ptr(dz3), ptr(dz3 if inplace else dx3), ptr(stats), ptr(weight),
                ptr(bias), ptr(residual3), ptr(dresidual3), ptr(dweight), ptr(dbias))
        mask = self.align_mask(prob, *ptrs[:3], ptrs[6], ptrs[7])
        prog = self.program(prob, "backward_inplace" if inplace else "backward", training,
                            residual3 is not None, mask)
        ws = self.rt.empty((prog.ws_bytes // _itemsize(prob.acc_dtype),), prob.acc_dtype)
        prog.run(ptrs, ptr(ws), 0.0, self.rt.stream())
        return dweight, dbias

    def _backward_sequence(self, prob: Problem, z3, dz3, stats, weight, bias, training, dx3=None,
                           residual3=None, dresidual3=None):
        """The unsynchronised backward's launches: the reduction, then the elementwise kernel
        summing its partials itself and storing dweight/dbias (2 launches; 1 in eval without
        parameters; 3 with a finalize launch between them when plan.fuse_merge says the
        partials are too many), with one workspace (partials and sums) besides the parameter
        gradients."""
        dx3 = dz3 if dx3 is None else dx3
        # the reduction's width; dx3 and the residual's gradient may narrow the other's
        vec = self._vec(prob, z3, dz3, residual3)
        vec_ew = vec if vec == 1 else self._vec(prob, None if dx3 is dz3 else dx3, dresidual3)
        sums = dweight = dbias = None
        merge = (None, None, None)  # what the elementwise kernel merges and stores itself
        if training or prob.has_weight or prob.has_bias:
            r = self._recipe(prob, "backward_reduce", vec)
            (partials, sums) = self._acc_empty(prob, (r.g, SUM_ROWS), (SUM_ROWS,))
            self._reduce_into(r, z3, dz3, partials, weight, bias, residual3)
            dweight, dbias = self._param_grads(prob)
            if planning.fuse_merge(prob, r.g, vec_ew):
                merge = (partials, dweight, dbias)
            else:  # many partials (small C): one split merge, see _forward_sequence
                self._backward_finalize_into(prob, partials, sums, weight, dweight, dbias)
        self._elementwise_with(prob, vec_ew, z3, dz3, dx3, stats, sums, weight, bias, training,
                               residual3, dresidual3, *merge)
        return dweight, dbias

    # -- launch programs ---------------------------------------------------------------------
    def _ptr(self, a) -> int:
        return 0 if a is None else self.rt.ptr(a)

    def align_mask(self, prob: Problem, *ptrs) -> int:
        """Bit i set when the i-th big buffer (recording.ALIGN_INPUTS order) allows vector
        access; 0 when the problem's inner extent allows none anyway (one program)."""
        if self._widest(prob) == 1:
            return 0
        mask = 0
        for i, p in enumerate(ptrs):
            if not p % inst.VECTOR_BYTES:
                mask |= 1 << i
        return mask

    def program(self, prob: Problem, kind: str, training: bool, has_residual: bool,
                mask: int) -> Program:
        """The launch program of `kind` ("forward", "backward" or "backward_inplace") for this
        problem, built on first use by recording the sequence over named buffers."""
        key = (self.rt, "program", kind, training, has_residual, mask)
        prog = prob.memo.get(key)
        if prog is None:
            from .recording import Recorder  # once per problem and class, not per call

            prog = prob.memo[key] = Recorder(self, prob, kind, mask).build(training,
                                                                            has_residual)
        return prog


def _itemsize(dtype_name: str) -> int:
    return numpy_dtype(dtype_name).itemsize

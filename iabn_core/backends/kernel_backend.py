"""The backend that runs the CUDA kernels, shared by the GPU (CuPy) and the CPU emulator.

Everything but the engine is common: picking the instantiation, planning the grid, allocating
the small per-channel buffers and marshalling arguments. A `Runtime` supplies the engine:
  function(spec, name) -> launchable kernel   (called as k(grid, block, args))
  empty(shape, dtype_name) -> array           (uninitialised; every kernel writes all it reads)
  sm_count, ptr(array), null (the value passed for a null pointer)
"""
from __future__ import annotations

import numpy as np

from .. import instantiations as inst
from .. import plan as planning
from ..dtypes import find_pair, numpy_dtype
from .base import PARTIAL_ROWS, STATS_ROWS, SUM_ROWS, Problem

MODE_MERGE, MODE_TRAIN, MODE_EVAL = 0, 1, 2  # FinalizeMode in kernels/stats.cu


class KernelBackend:
    def __init__(self, runtime):
        self.rt = runtime
        self.name = runtime.name
        self.launches = 0  # kernel launches so far; tests assert per-step counts

    def prepare(self, prob: Problem, filenames) -> None:
        """Compile/load the modules a call will use, before it writes anything."""
        pair = self._pair(prob)
        for f in filenames:
            spec = inst.module_for(f, pair)
            self.rt.function(spec, spec.names[0])

    # -- helpers ---------------------------------------------------------------------------
    def _launch(self, prob: Problem, filename: str, name: str, grid, block, args):
        fn = self.rt.function(inst.module_for(filename, self._pair(prob)), name)
        self.launches += 1
        fn(grid, block, tuple(self.rt.null if a is None else a for a in args))

    def _acc(self, prob: Problem, v: float):
        return numpy_dtype(prob.acc_dtype).type(v)

    def _plan(self, prob: Problem, *arrays) -> planning.Plan:
        vec = planning.choose_vec(prob, [self.rt.ptr(a) for a in arrays])
        return planning.elementwise(prob, vec, self.rt.sm_count)

    def _shape_args(self, prob: Problem, plan: planning.Plan):
        i64 = np.int64
        return (i64(prob.n), i64(prob.c), i64(prob.s), i64(plan.seg))

    def _pair(self, prob: Problem):
        return find_pair(prob.x_dtype, prob.param_dtype)

    # -- statistics --------------------------------------------------------------------------
    def batch_stats(self, prob: Problem, x3):
        plan = self._plan(prob, x3)
        partials = self.rt.empty((plan.g, PARTIAL_ROWS, prob.c), prob.acc_dtype)
        name = inst.batch_stats(self._pair(prob), prob.layout, plan.vec)
        self._launch(prob, "stats.cu", name, plan.grid, plan.block,
                     (x3, partials) + self._shape_args(prob, plan))
        return partials

    def _finalize(self, prob, partials, rows, running_mean, running_var, momentum, mode, count):
        out = self.rt.empty((rows, prob.c), prob.acc_dtype)
        grid, block = planning.per_channel(prob.c)
        r = 0 if partials is None else partials.shape[0]
        # Eval only reads the running stats, through the kernel's const pointers, so read-only
        # running stats are fine there (the same rule validate applies for every backend).
        read = (running_mean, running_var) if mode == MODE_EVAL else (None, None)
        update = (None, None) if mode == MODE_EVAL else (running_mean, running_var)
        self._launch(prob, "stats.cu", inst.stats_finalize(self._pair(prob)), grid, block,
                     (partials, np.int64(r), np.int64(prob.c), out) + read + update + (
                      self._acc(prob, momentum), self._acc(prob, prob.eps), self._acc(prob, count),
                      np.int32(mode)))
        return out

    def merge_stats(self, prob: Problem, partials):
        return self._finalize(prob, partials, PARTIAL_ROWS, None, None, 0.0, MODE_MERGE, 0)

    def finalize(self, prob: Problem, partials, running_mean, running_var, momentum, training):
        mode = MODE_TRAIN if training else MODE_EVAL
        return self._finalize(prob, partials, STATS_ROWS, running_mean, running_var, momentum,
                              mode, prob.count)

    # -- forward / backward ------------------------------------------------------------------
    # The optional residual (and its gradient) is a null pointer when absent: the same
    # instantiations serve both forms, with a block-uniform branch in the loop body.
    def forward(self, prob: Problem, x3, stats, weight, bias, residual3=None):
        plan = self._plan(prob, x3, *_present(residual3))
        name = inst.forward(self._pair(prob), prob.activation, prob.layout, plan.vec)
        self._launch(prob, "forward.cu", name, plan.grid, plan.block,
                     (x3, stats, weight, bias, self._acc(prob, prob.eps),
                      self._acc(prob, prob.activation_param)) + self._shape_args(prob, plan)
                     + (residual3,))

    def backward_reduce(self, prob: Problem, z3, dz3, stats, weight, bias, residual3=None):
        plan = self._plan(prob, z3, dz3, *_present(residual3))
        partials = self.rt.empty((plan.g, SUM_ROWS, prob.c), prob.acc_dtype)
        name = inst.backward_reduce(self._pair(prob), prob.activation, prob.layout, plan.vec)
        self._launch(prob, "backward.cu", name, plan.grid, plan.block,
                     (z3, dz3, partials, weight, bias, self._acc(prob, prob.eps),
                      self._acc(prob, prob.activation_param)) + self._shape_args(prob, plan)
                     + (residual3,))
        return partials

    def backward_finalize(self, prob: Problem, partial_sums, weight, bias):
        sums = self.rt.empty((SUM_ROWS, prob.c), prob.acc_dtype)
        dweight = self.rt.empty((prob.c,), prob.param_dtype) if prob.has_weight else None
        dbias = self.rt.empty((prob.c,), prob.param_dtype) if prob.has_bias else None
        grid, block = planning.per_channel(prob.c)
        self._launch(prob, "backward.cu", inst.backward_finalize(self._pair(prob)), grid, block,
                     (partial_sums, np.int64(partial_sums.shape[0]), np.int64(prob.c), sums,
                      weight, dweight, dbias))
        return sums, dweight, dbias

    def backward_elementwise(self, prob: Problem, z3, dz3, stats, sums, weight, bias, training,
                             dx3=None, residual3=None, dresidual3=None):
        dx3 = dz3 if dx3 is None else dx3
        plan = self._plan(prob, z3, dz3, dx3, *_present(residual3, dresidual3))
        name = inst.backward_elementwise(self._pair(prob), prob.activation, prob.layout, plan.vec)
        self._launch(prob, "backward.cu", name, plan.grid, plan.block,
                     (z3, dz3, dx3, stats, sums, weight, bias, self._acc(prob, prob.eps),
                      self._acc(prob, prob.activation_param), np.int32(1 if training else 0))
                     + self._shape_args(prob, plan) + (residual3, dresidual3))


def _present(*arrays):
    """The given arrays that are not None (their alignment decides the vector width too)."""
    return tuple(a for a in arrays if a is not None)

"""Recording launch programs: KernelBackend's own stage sequences run over named buffers
(program.Ref) instead of arrays, their launches kept and packed into an iabn_core.program
Program. The stage code is the code that runs, so a program cannot drift from it; this
happens once per problem, flags and alignment class (KernelBackend.program memoizes it)."""
from __future__ import annotations

import math

from ..program import MOMENTUM, NULL, WORKSPACE, Launch, Program, Ref
from .base import Problem
from .kernel_backend import KernelBackend, Recipe, _itemsize


# num_batches_tracked: the module's counter, which the forward kernel increments (0: none).
FORWARD_INPUTS = ("x", "weight", "bias", "running_mean", "running_var", "residual",
                  "num_batches_tracked")
BACKWARD_INPUTS = ("z", "dz", "dx", "stats", "weight", "bias", "residual", "dresidual",
                   "dweight", "dbias")
# The big buffers whose 16-byte alignment picks the vector width, in align_mask's bit order.
ALIGN_INPUTS = {"forward": ("x", "residual"), "backward": ("z", "dz", "dx", "residual",
                                                           "dresidual")}


class Recorder(KernelBackend):
    """Runs a sequence over named buffers (program.Ref) instead of arrays and keeps its
    launches: the stage code is the one that runs, so a program cannot drift from it."""

    def __init__(self, be: KernelBackend, prob: Problem, kind: str, mask: int):
        super().__init__(be.rt)
        self.owner, self.prob, self.kind = be, prob, kind
        names = ALIGN_INPUTS["forward" if kind == "forward" else "backward"]
        self.aligned = {n for i, n in enumerate(names) if mask >> i & 1}
        self.recorded: list[Launch] = []
        self.ws_bytes = 0

    def build(self, training: bool, has_residual: bool) -> Program:
        prob = self.prob
        w = Ref("weight") if prob.has_weight else None
        b = Ref("bias") if prob.has_bias else None
        r = Ref("residual") if has_residual else None
        if self.kind == "forward":
            # absent running stats arrive as null pointers (0): the kernels test the pointer
            self._forward_sequence(prob, Ref("x"), Ref("running_mean"), Ref("running_var"),
                                   MOMENTUM, training, w, b, r, Ref("num_batches_tracked"))
            inputs = FORWARD_INPUTS
        else:
            dz = Ref("dz")
            dx = dz if self.kind == "backward_inplace" else Ref("dx")
            self._backward_sequence(prob, Ref("z"), dz, Ref("stats"), w, b, training, dx, r,
                                    Ref("dresidual") if has_residual else None)
            inputs = BACKWARD_INPUTS
        check = getattr(self.rt, "check_packed", None)  # the emulator checks the packing
        if check is not None:
            for ln in self.recorded:
                check(ln.fn, ln.args)
        return Program(self.rt, inputs, self.recorded, self.ws_bytes, prob.acc_dtype,
                       counter=self.owner)

    # -- the recording overrides -------------------------------------------------------------
    def _run(self, r: Recipe, args) -> None:
        self.recorded.append(Launch(r.fn, r.grid, r.block, tuple(args)))

    def _opt(self, a):
        return NULL if a is None else a

    def _acc(self, prob: Problem, v):
        return MOMENTUM if v is MOMENTUM else super()._acc(prob, v)

    def _vec(self, prob: Problem, *refs) -> int:
        v = self._widest(prob)
        for a in refs:
            if a is not None and a.name not in self.aligned:
                return 1
        return v

    def _acc_empty(self, prob: Problem, *rows):
        size = _itemsize(prob.acc_dtype)
        out = []
        for r in rows:
            shape = r + (prob.c,)
            out.append(Ref(WORKSPACE, self.ws_bytes, shape))
            self.ws_bytes += math.prod(shape) * size
        return out

    def _param_grads(self, prob: Problem):
        return (Ref("dweight") if prob.has_weight else None,
                Ref("dbias") if prob.has_bias else None)

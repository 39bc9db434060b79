"""The stage interface every backend implements, and the problem descriptor it receives.

The core collapses x of logical shape (N, C, *) to a 3-D view at its boundary:
  layout "ncs": (N, C, S), S contiguous (standard contiguous tensors)
  layout "nsc": (N, S, C), C contiguous (channels-last tensors)
so kernels and backends handle exactly these two layouts. S == 1 is always "nsc".

Per-channel state travels in small accumulator-dtype arrays ("acc" = float32, float64 for
float64 inputs):
  partials: (R, 3, C)  rows count, mean, biased var of R disjoint pieces of the batch
  stats:    (4, C)     rows count, mean, biased var, inverse std (1/sqrt(var + eps))
  sums:     (2, C)     rows sum(dy), sum(dy * xhat)
A piece with count 0 drops out of every merge.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

STATS_ROWS = 4  # count, mean, var, invstd
PARTIAL_ROWS = 3  # count, mean, var
SUM_ROWS = 2  # sum_dy, sum_dy_xhat


@dataclass(frozen=True)
class Problem:
    """Everything a stage needs to know besides the buffers. Built only by iabn_core.validate."""

    n: int
    c: int
    s: int
    layout: str  # "ncs" or "nsc"
    x_dtype: str  # canonical dtype names from iabn_core.dtypes
    param_dtype: str
    acc_dtype: str
    activation: str  # "identity" | "leaky_relu" | "elu"
    activation_param: float
    eps: float
    has_weight: bool
    has_bias: bool
    # What backends derive from the problem alone (plans per vector width, kernel handles,
    # packed scalar arguments), filled on first use. No part of equality or hashing: the
    # signature cache (iabn_core.signature) keeps a Problem per call signature, and with it this.
    memo: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def count(self) -> int:
        """Values per channel in this replica's batch (m = N * S)."""
        return self.n * self.s


class Backend(Protocol):
    """One implementation per execution engine (cuda, emulator, numpy).

    Arrays are the backend's own array type. x3/z3/dz3 are the 3-D views described above;
    weight/bias/running_* are 1-D (C,) arrays of the parameter dtype or None.
    No stage synchronises with the host. Besides the stages below, every backend has
    `forward_all` and `backward_all` (see Composites), the unsynchronised sequences.
    """

    name: str

    def prepare(self, prob: Problem, filenames) -> None:
        """Make ready (compile/load) the kernel files a call will use, before any write."""

    def batch_stats(self, prob: Problem, x3: Any) -> Any:
        """Partials (G, 3, C) of x over N and S; G is backend/plan dependent (>= 1)."""

    def merge_stats(self, prob: Problem, partials: Any) -> Any:
        """Merge (R, 3, C) partials into (3, C) in a fixed order (count-weighted Chan)."""

    def finalize(self, prob: Problem, partials: Any, running_mean: Any, running_var: Any,
                 momentum: float, training: bool) -> Any:
        """Stats (4, C). Training: merge partials, update running stats in place
        (r <- (1-momentum) r + momentum * stat, var unbiased by m/(m-1)).
        Eval: partials is None; mean/var come from the running stats, count = prob.count."""

    def forward(self, prob: Problem, x3: Any, stats: Any, weight: Any, bias: Any,
                residual3: Any = None) -> None:
        """x3 <- act(gamma * (x3 - mean) * invstd + bias [+ residual3]), gamma = |weight| + eps,
        in place. residual3 is a 3-D view like x3 that overlaps nothing written."""

    def backward_reduce(self, prob: Problem, z3: Any, dz3: Any, stats: Any,
                        weight: Any, bias: Any, residual3: Any = None) -> Any:
        """Per-piece partial sums (G, 2, C) of dy and dy * xhat, recovered from z and dz (and
        the forward's residual: xhat = (act^-1(z) - r - bias) / gamma)."""

    def backward_finalize(self, prob: Problem, partial_sums: Any, weight: Any,
                          bias: Any) -> tuple[Any, Any, Any]:
        """(sums (2, C), dweight or None, dbias or None); dweight = abs_slope(w) * sum(dy*xhat)."""

    def backward_elementwise(self, prob: Problem, z3: Any, dz3: Any, stats: Any, sums: Any,
                             weight: Any, bias: Any, training: bool, dx3: Any = None,
                             residual3: Any = None, dresidual3: Any = None) -> None:
        """dx3 <- dx (dx3 defaults to dz3: in place). Training uses sums and stats' count row;
        eval ignores sums. dx3 is dz3 itself or a buffer that overlaps neither z3 nor dz3.
        With a residual, also dresidual3 <- dy (a buffer that overlaps nothing else)."""


class Composites:
    """`forward_all` / `backward_all`: the stage sequences as one call each, so a backend may
    share one workspace between the stages (KernelBackend overrides them for unsynchronised
    calls). Synchronized BN runs these generic sequences with its exchanges between the
    stages: `gather` (the merged partials -> every replica's rows, in rank order) and
    `all_reduce` (the per-channel sums -> summed over replicas)."""

    def forward_all(self, prob: Problem, x3, running_mean, running_var, momentum, training,
                    weight, bias, residual3=None, gather=None):
        """Stats (4, C); x3 <- z in place (when it holds any value)."""
        if training:
            partials = self.batch_stats(prob, x3)
            if gather is not None:
                partials = gather(self.merge_stats(prob, partials))
            stats = self.finalize(prob, partials, running_mean, running_var, momentum, True)
        else:
            stats = self.finalize(prob, None, running_mean, running_var, momentum, False)
        if prob.count:
            self.forward(prob, x3, stats, weight, bias, residual3)
        return stats

    def backward_all(self, prob: Problem, z3, dz3, stats, weight, bias, training, dx3=None,
                     residual3=None, dresidual3=None, all_reduce=None):
        """(dweight, dbias), None where absent; dx3 (default dz3) <- dx, dresidual3 <- dy."""
        sums = dweight = dbias = None
        if training or prob.has_weight or prob.has_bias:
            partials = self.backward_reduce(prob, z3, dz3, stats, weight, bias, residual3)
            sums, dweight, dbias = self.backward_finalize(prob, partials, weight, bias)
            if all_reduce is not None:
                sums = all_reduce(sums)
        if prob.count:
            self.backward_elementwise(prob, z3, dz3, stats, sums, weight, bias, training, dx3,
                                      residual3, dresidual3)
        return dweight, dbias

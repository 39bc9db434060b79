"""Launch planning: vector width, block shape, tile size and grid for every kernel.

All elementwise/reduction kernels use 256-thread blocks (kBlockThreads in kernels/common.cuh).
G (gridDim.y) splits each channel's work over several blocks so that the grid fills the device
even when C is small. The plan depends on the shape, the device's SM count and the buffers'
16-byte alignment (which picks the vector width), so repeating a call on the same device with
the same buffers reduces in the same order: bitwise reproducible (no atomics anywhere).
"""
from __future__ import annotations

from dataclasses import dataclass

from .backends.base import Problem
from .instantiations import VECTOR_BYTES, max_vec

BLOCK_THREADS = 256
BLOCKS_PER_SM = 2048 // BLOCK_THREADS  # one full wave of resident 256-thread blocks
MAX_GRID_Y = 65535
MAX_UNROLL = 4  # vectors per thread per tile row in the NCS layout


@dataclass(frozen=True)
class Plan:
    vec: int
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    seg: int  # NCS: vectors per tile row; unused (0) for NSC

    @property
    def g(self) -> int:
        return self.grid[1]


def _pow2_at_least(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


def choose_vec(prob: Problem, ptrs) -> int:
    """Widest vector whose every access is aligned: the inner extent must be a multiple of it
    and every base pointer 16-byte aligned (rows then start aligned too)."""
    v = max_vec(prob.x_dtype)
    inner = prob.s if prob.layout == "ncs" else prob.c
    if inner % v == 0 and all(p % VECTOR_BYTES == 0 for p in ptrs):
        return v
    return 1


def elementwise(prob: Problem, vec: int, sm_count: int) -> Plan:
    target = max(1, sm_count * BLOCKS_PER_SM)
    if prob.layout == "ncs":
        sv = prob.s // vec
        bx = min(BLOCK_THREADS, _pow2_at_least(sv))
        by = BLOCK_THREADS // bx
        seg = bx * max(1, min(MAX_UNROLL, sv // bx))
        tiles = -(-sv // seg) * -(-prob.n // by)
        g = max(1, min(tiles, -(-target // prob.c), MAX_GRID_Y))
        return Plan(vec, (prob.c, g, 1), (bx, by, 1), seg)
    cv = prob.c // vec
    bx = min(32, _pow2_at_least(cv))
    by = BLOCK_THREADS // bx
    gx = -(-cv // bx)
    row_tiles = -(-(prob.n * prob.s) // by)
    g = max(1, min(row_tiles, -(-target // gx), MAX_GRID_Y))
    return Plan(vec, (gx, g, 1), (bx, by, 1), 0)


# kSerialRows, kFinalizeChannels and kFinalizeSplits in kernels/finalize.cuh.
SERIAL_MERGE_ROWS = 64
FINALIZE_CHANNELS, FINALIZE_SPLITS = 8, 32


def per_channel(c: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Grid and block of the finalize kernels: 8 channels per block, 32 threads splitting each
    channel's rows when there are more than SERIAL_MERGE_ROWS of them."""
    return (-(-c // FINALIZE_CHANNELS), 1, 1), (FINALIZE_CHANNELS, FINALIZE_SPLITS, 1)


def fuse_merge(prob: Problem, rows: int, vec: int) -> bool:
    """Whether the forward / backward-elementwise kernel should merge the `rows` block
    partials itself (every block, serially, for its channels: one thread does rows x its
    channel count of merges) instead of a separate finalize launch. Fusing saves a launch
    (~2 us) but costs every block that serial merge and its reads; beyond SERIAL_MERGE_ROWS
    merges per thread the separate, split merge is faster (kernels/finalize.cuh)."""
    per_thread = vec if prob.layout == "nsc" else 1
    return rows * per_thread <= SERIAL_MERGE_ROWS

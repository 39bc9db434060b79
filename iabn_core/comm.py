"""Communicators for synchronized InPlace-ABN, and the replica agreement check.

The core needs three collectives from whatever distributed engine the user already runs:
  all_gather(a (3, C)) -> (R, 3, C)   each replica's (count, mean, var), in rank order
  all_reduce(a (2, C)) -> (2, C)      [sum dy, sum dy*xhat] summed over replicas
  exchange_header(values, like) -> list of R tuples of ints, in rank order (host side)
`size` and `rank` describe the group. Arrays are the core's own (NumPy or CuPy, acc dtype).

Why a separate header exchange instead of riding on the stats all-gather: an all-gather of
(3, C) arrays whose C differs between ranks is undefined in NCCL (a hang or a read past a
buffer) and a timeout in gloo, and no header inside that payload can help, because the payload
sizes themselves disagree. A fixed-size header (status, C, count) always matches, so every rank
sees every rank's C and count and raises the same error in bounded time. The same header gives
the global count for the "more than 1 value per channel" check without reading the stats back.
Its price on GPUs is one tiny collective and one device->host read per synced forward (what
torch.nn.SyncBatchNorm also pays for its count check); it is skipped while a CUDA graph is
being captured, where a host read is impossible (eager warm-up runs have checked the shapes).

Implementations: TorchDistributedComm (torch.distributed: gloo, NCCL), CupyxComm
(cupyx.distributed NCCL), InProcessComm (R simulated ranks as threads, for tests).
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from . import arrays
from .validate import IABNError

HEADER_OK, HEADER_FAILED = 0, 1  # header status: this rank's arguments passed validation


class Communicator(Protocol):
    size: int
    rank: int

    def all_gather(self, a: Any) -> Any: ...

    def all_reduce(self, a: Any) -> Any: ...

    def exchange_header(self, values: Sequence[int], like: Any) -> list[tuple[int, ...]]: ...


class CommTimeout(RuntimeError):
    """An in-process collective was not joined by every rank in time."""


# ------------------------------------------------------------------------------------------
# The replica agreement check run before the statistics are exchanged
# ------------------------------------------------------------------------------------------
def capturing(like) -> bool:
    """True while a CUDA graph is being captured on CuPy's current stream (torch's, in the
    torch adapter): no host read may happen then."""
    if arrays.kind(like) != "cupy":
        return False
    import cupy

    return bool(cupy.cuda.get_current_stream().is_capturing())


def agree(comm, c: int | None, count: int | None, like, *, failed: bool = False):
    """Exchange (status, C, count) with every rank and raise the same IABNError on all of
    them if any rank failed validation, the channel counts differ, or the global count is 1
    (0 is an empty batch everywhere, as nn.BatchNorm allows; >= 2 gives a variance). Returns
    the global count (None while a CUDA graph is captured: no host exchange then). A rank that
    failed its own validation calls this with failed=True so its peers are not left waiting;
    it then raises its own error."""
    if capturing(like):
        return None
    mine = (HEADER_FAILED, 0, 0) if failed else (HEADER_OK, int(c), int(count))
    rows = [tuple(int(v) for v in r) for r in comm.exchange_header(mine, like)]
    if failed:
        return None
    bad = [r for r, row in enumerate(rows) if row[0] != HEADER_OK]
    if bad:
        raise IABNError(f"synchronized InPlace-ABN: rank(s) {bad} of {len(rows)} rejected their "
                        "arguments (see the error on those ranks); no statistics were exchanged")
    channels = [row[1] for row in rows]
    if len(set(channels)) > 1:
        raise IABNError(f"synchronized InPlace-ABN: channel counts differ between ranks "
                        f"(C per rank, in rank order: {channels}); every rank of the group must "
                        "call the same layer with the same number of channels")
    counts = [row[2] for row in rows]
    if sum(counts) == 1:
        raise IABNError(f"Expected more than 1 value per channel when training, got "
                        f"{sum(counts)} over all {len(rows)} ranks (values per channel in rank "
                        f"order: {counts})")
    return sum(counts)


# ------------------------------------------------------------------------------------------
# torch.distributed
# ------------------------------------------------------------------------------------------
class TorchDistributedComm:
    """Collectives of a torch.distributed process group (None: the default group).

    Core arrays are wrapped as tensors without copying (NumPy -> CPU tensor, CuPy -> CUDA
    tensor through DLPack), so gloo runs CPU arrays and NCCL CUDA ones. torch issues NCCL
    collectives on its internal stream ordered after the current stream, and a blocking call
    makes the current stream wait for it: nothing waits on the host."""

    def __init__(self, group=None):
        import torch
        import torch.distributed as dist

        self._torch, self._dist, self.group = torch, dist, group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if self.rank < 0:
            raise IABNError("this process is not a member of the process group given to "
                            "synchronized InPlace-ABN")

    def _tensor(self, a):
        if arrays.kind(a) == "numpy":
            return self._torch.from_numpy(np.ascontiguousarray(a))
        return self._torch.from_dlpack(a)

    @staticmethod
    def _array(t):
        if t.device.type == "cpu":
            return t.numpy()
        import cupy

        return cupy.from_dlpack(t)

    def _gather(self, t):
        # Flat buffers: backends differ on whether the output may carry an extra rank dim.
        # torch >= 2.13 names the single-tensor all-gather all_gather_single.
        gather = getattr(self._dist, "all_gather_single", None) or \
            self._dist.all_gather_into_tensor
        out = t.new_empty((self.size * t.numel(),))
        gather(out, t.contiguous().reshape(-1), group=self.group)
        return out.reshape((self.size,) + tuple(t.shape))

    def all_gather(self, a):
        return self._array(self._gather(self._tensor(a)))

    def all_reduce(self, a):
        t = self._tensor(a).clone()  # the caller's array stays as it was
        self._dist.all_reduce(t, group=self.group)
        return self._array(t)

    def exchange_header(self, values, like):
        torch = self._torch
        if arrays.kind(like) == "cupy":
            device = torch.device("cuda", like.device.id)
        elif self._dist.get_backend(self.group) == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())  # NCCL has no CPU tensors
        else:
            device = torch.device("cpu")
        t = torch.tensor(list(values), dtype=torch.int64, device=device)
        return [tuple(row) for row in self._gather(t).tolist()]


# ------------------------------------------------------------------------------------------
# cupyx.distributed (NCCL)
# ------------------------------------------------------------------------------------------
class CupyxComm:
    """Collectives of a `cupyx.distributed.init_process_group(...)` communicator (NCCL), on
    CuPy's current stream."""

    def __init__(self, comm):
        self.comm = comm
        self.size = int(comm._n_devices)  # cupyx keeps the group size only under this name
        self.rank = int(comm.rank)

    @staticmethod
    def _cupy():
        import cupy

        return cupy

    def all_gather(self, a):
        cupy = self._cupy()
        a = cupy.ascontiguousarray(a)
        out = cupy.empty((self.size,) + a.shape, dtype=a.dtype)
        self.comm.all_gather(a, out, a.size, stream=cupy.cuda.get_current_stream())
        return out

    def all_reduce(self, a):
        cupy = self._cupy()
        a = cupy.ascontiguousarray(a)
        out = cupy.empty_like(a)
        self.comm.all_reduce(a, out, op="sum", stream=cupy.cuda.get_current_stream())
        return out

    def exchange_header(self, values, like):
        cupy = self._cupy()
        mine = cupy.asarray(np.asarray(values, dtype=np.int64))
        return [tuple(row) for row in self.all_gather(mine).get().tolist()]


# ------------------------------------------------------------------------------------------
# In-process ranks (tests)
# ------------------------------------------------------------------------------------------
class InProcessGroup:
    """R simulated ranks in one process: run(fn) calls fn(comm) on R threads, one
    InProcessComm each, and returns the R results in rank order. Collectives meet at a
    condition variable; a rank that fails, or a collective not joined within `timeout`
    seconds, breaks the group so no rank waits forever."""

    def __init__(self, size: int, timeout: float = 60.0):
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.size, self.timeout = size, timeout
        self._cond = threading.Condition()
        self._slots: list = [None] * size
        self._arrived = 0
        self._generation = 0
        self._result: Any = None
        self._broken: str | None = None
        self.calls: list[str] = []  # collective names in order (rank 0's view), for tests

    def comms(self) -> list["InProcessComm"]:
        return [InProcessComm(self, r) for r in range(self.size)]

    def _collective(self, rank: int, name: str, value, combine: Callable[[list], Any]):
        with self._cond:
            if self._broken:
                raise CommTimeout(self._broken)
            gen = self._generation
            self._slots[rank] = value
            self._arrived += 1
            if rank == 0:
                self.calls.append(name)
            if self._arrived == self.size:
                try:
                    self._result = ("ok", combine(list(self._slots)))
                except Exception as exc:  # e.g. shapes that do not stack: every rank raises
                    self._result = ("error", exc)
                self._slots = [None] * self.size
                self._arrived = 0
                self._generation += 1
                self._cond.notify_all()
            elif not self._cond.wait_for(lambda: self._generation != gen or self._broken,
                                         self.timeout):
                self._break(f"in-process collective {name!r} not joined by every rank within "
                            f"{self.timeout} s")
            if self._generation == gen:  # woken by a break, not by completion
                raise CommTimeout(self._broken)
            # The next collective cannot complete without this rank, so _result is ours.
            status, value = self._result
            if status == "error":
                raise value
            return value

    def _break(self, why: str):
        with self._cond:
            self._broken = self._broken or why
            self._cond.notify_all()

    def run(self, fn: Callable[["InProcessComm"], Any]) -> list:
        results: list = [None] * self.size
        errors: list = [None] * self.size

        def body(comm):
            try:
                results[comm.rank] = fn(comm)
            except BaseException as exc:
                errors[comm.rank] = exc
                self._break(f"rank {comm.rank} raised {type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=body, args=(c,), daemon=True) for c in self.comms()]
        for t in threads:
            t.start()
        for t in threads:
            t.join(self.timeout * 4)
        if any(t.is_alive() for t in threads):
            self._break("InProcessGroup.run timed out")
            raise CommTimeout("InProcessGroup.run: a rank did not finish in time")
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise RankErrors(errors) from first
        return results


class RankErrors(RuntimeError):
    """At least one in-process rank raised; `errors` holds each rank's exception (or None)."""

    def __init__(self, errors):
        super().__init__("; ".join(f"rank {r}: {type(e).__name__}: {e}"
                                   for r, e in enumerate(errors) if e is not None))
        self.errors = errors


class InProcessComm:
    """One rank of an InProcessGroup. Results are fresh copies, so ranks never share memory."""

    def __init__(self, group: InProcessGroup, rank: int):
        self.group, self.rank, self.size = group, rank, group.size

    def all_gather(self, a):
        def combine(slots):
            return np.stack([np.asarray(s) for s in slots])

        return self.group._collective(self.rank, "all_gather", np.array(a), combine).copy()

    def all_reduce(self, a):
        def combine(slots):
            total = np.array(slots[0])
            for s in slots[1:]:  # rank order, like a deterministic reduction
                total = total + s
            return total

        return self.group._collective(self.rank, "all_reduce", np.array(a), combine).copy()

    def exchange_header(self, values, like):
        rows = self.group._collective(self.rank, "exchange_header", tuple(values), list)
        return [tuple(r) for r in rows]

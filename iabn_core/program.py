"""Launch programs: the kernel launches of one call signature, packed once, replayed per call.

A call's launches (kernel, grid, block, scalar arguments, which buffer goes where) depend only
on its signature (iabn_core.signature) and on which big buffers are 16-byte aligned (the
vector width). A `Program` holds them with every argument already in place in one block of
8-byte cells, the layout CUDA's `cuLaunchKernel(..., kernelParams, ...)` reads: per launch an
array of pointers, one per kernel parameter, each pointing at a cell. Scalars are written into
their cells when the program is built. What changes from call to call, the buffer pointers,
the workspace's pieces and momentum, lives in the first cells, written by ONE `struct.pack_into`
per call; then each launch is one native call. So a cache hit costs a dict lookup, the
pointers, integer checks, one allocation, one pack and one native call per launch.

Every runtime runs the same program: `cuda` hands the cells to the driver
(`cupy.cuda.driver.launchKernel` on the caller's stream), `emulator` hands the same pointer
array to the emulated kernel's entry point (so the CPU tests check the packing byte for byte:
a wrong cell gives a wrong result), `null` calls a C-level no-op in place of the driver.
"""
from __future__ import annotations

import ctypes
import functools
import struct
import threading
from typing import NamedTuple

import numpy as np


class Ref(NamedTuple):
    """A buffer argument while a program is recorded: the call's pointer `name`, plus
    `offset` bytes (workspace pieces); `shape` is the piece's shape (stages read its rows)."""

    name: str
    offset: int = 0
    shape: tuple = ()


class _Marker:
    def __init__(self, what: str):
        self.what = what

    def __repr__(self):
        return self.what


NULL = _Marker("NULL")  # a null pointer argument
MOMENTUM = _Marker("MOMENTUM")  # the one per-call scalar (momentum=None modules change it)
WORKSPACE = "ws"  # Ref name of the per-call workspace


class Launch(NamedTuple):
    """One recorded launch: `fn` is what the runtime's `function()` returned."""

    fn: object
    grid: tuple
    block: tuple
    args: tuple


class Program:
    """The launches of one signature. `run(ptrs, ws, momentum, stream)`: `ptrs` are the
    pointers of `inputs` in order (0 for an absent buffer), `ws` the workspace's pointer
    (`ws_bytes` long, allocated by the caller), `stream` the native stream handle."""

    __slots__ = ("inputs", "ws_bytes", "count", "_launches", "_cells", "_params", "_pack",
                 "_ws_offsets", "_lock", "_counter")

    def __init__(self, runtime, inputs: tuple, launches: list, ws_bytes: int,
                 momentum_dtype: str, counter):
        self.inputs = tuple(inputs)
        self.ws_bytes = int(ws_bytes)
        self.count = len(launches)
        self._counter = counter  # the backend: its `launches` attribute counts kernel launches
        ws_offsets = sorted({a.offset for ln in launches for a in ln.args
                             if isinstance(a, Ref) and a.name == WORKSPACE})
        self._ws_offsets = tuple(ws_offsets)
        slot = {name: i for i, name in enumerate(self.inputs)}
        base = len(self.inputs)
        slot.update({(WORKSPACE, o): base + i for i, o in enumerate(ws_offsets)})
        m_cell = base + len(ws_offsets)
        fmt = "=" + "Q" * m_cell + ("d" if momentum_dtype == "float64" else "f")
        self._pack = struct.Struct(fmt).pack_into
        statics: list[bytes] = []  # cells after the dynamic ones, in order
        static_slot: dict[bytes, int] = {}

        def cell_of(a) -> int:
            if isinstance(a, Ref):
                key = (WORKSPACE, a.offset) if a.name == WORKSPACE else a.name
                if a.name != WORKSPACE and a.offset:
                    raise ValueError(f"input {a.name} passed at an offset")
                return slot[key]
            if a is MOMENTUM:
                return m_cell
            raw = b"\0" * 8 if a is NULL else np.asarray(a).tobytes()
            if not isinstance(a, (np.generic, _Marker)) or len(raw) > 8:
                raise TypeError(f"cannot pack argument {a!r}")
            raw = raw.ljust(8, b"\0")
            if raw not in static_slot:
                static_slot[raw] = m_cell + 1 + len(statics)
                statics.append(raw)
            return static_slot[raw]

        cells_of = [[cell_of(a) for a in ln.args] for ln in launches]
        self._cells = cells = (ctypes.c_uint64 * (m_cell + 1 + len(statics)))()
        for i, raw in enumerate(statics):
            ctypes.memmove(ctypes.addressof(cells) + 8 * (m_cell + 1 + i), raw, 8)
        addr = ctypes.addressof(cells)
        self._params, launch_list = [], []
        for ln, idx in zip(launches, cells_of):
            params = (ctypes.c_void_p * max(1, len(idx)))(*[addr + 8 * i for i in idx])
            self._params.append(params)
            # Everything but the stream bound once (functools.partial is C: no frame).
            launch_list.append((functools.partial(runtime.launch_packed,
                                                  runtime.handle(ln.fn), *ln.grid, *ln.block,
                                                  0), ctypes.addressof(params)))
        self._launches = tuple(launch_list)
        self._lock = threading.Lock()  # the cells are shared: one pack+launch at a time

    def run(self, ptrs: tuple, ws: int, momentum: float, stream: int) -> None:
        with self._lock:  # the driver copies the cells at launch: reuse is safe after it
            self._pack(self._cells, 0, *ptrs, *map(ws.__add__, self._ws_offsets), momentum)
            for launch, params in self._launches:
                launch(stream, params, 0)
            self._counter.launches += self.count

    def cell_values(self) -> list[int]:
        """The cells as integers (tests read the packing through this)."""
        return list(self._cells)

"""Launches every kernel instantiation at least once, on awkward shapes, for compute-sanitizer.

    python -m benchmarks.sanitizer_driver [--backend cuda|emulator] [--json PATH]

For every dtype pair and layout it runs training and eval steps (forward + backward through
iabn_core.ops, the path every adapter takes) on three shapes per layout:
  vector:     aligned buffers whose inner extent takes 16-byte vectors (VEC > 1)
  misaligned: the same kind of shape, buffers one element past an aligned address (VEC = 1
              chosen because of the pointer, the case a vector kernel must never see)
  awkward:    C = 1 or an odd C, odd S, misaligned too (VEC = 1 from the extent)
and seven scenarios per shape (SCENARIOS), every activation among them: without weight and
bias; a synchronized step on one simulated rank (the stats-merge path); backward into a
separate `out` buffer; eval mode; no parameter arrays at all; the residual form
z = act(BN(x) + r), in training and eval. Every launched kernel name is
recorded and compared with the full instantiation list (iabn_core.instantiations), so a
kernel the driver never reaches is reported, not silently left unsanitized. Results are
compared with the NumPy backend (loose tolerance: the point is catching garbage that a clean
tool report would not reveal).

Under compute-sanitizer the CuPy memory pool is switched off, so every buffer is its own
cudaMalloc and an access one element past it is outside any allocation (a pool would hide it
inside a larger block). No CuPy kernel runs: data moves by memcpy only, so every report
belongs to an iabn kernel. Exit status: 0 clean, 1 a result mismatch or error, 2 coverage
incomplete.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time

import numpy as np

from iabn_core import backends, ops, signature
from iabn_core import instantiations as inst
from iabn_core.dtypes import PAIRS, numpy_dtype
from iabn_core.verify import TOL

# (name, logical (N, C, S), misaligned by one element)
SHAPES = {
    "ncs": (("vector", (3, 5, 24), False), ("misaligned", (2, 3, 40), True),
            ("awkward", (3, 1, 37), True)),
    "nsc": (("vector", (2, 16, 9), False), ("misaligned", (3, 16, 5), True),
            ("awkward", (5, 3, 7), True)),
}
# (activation, training, weight + bias, running stats, synchronized, dx into a separate
# buffer, residual z = act(BN(x) + r)). Without any parameter array the parameter dtype
# defaults to float32, so the scenario that leaves out weight and bias keeps the running
# stats (their dtype picks the pair), and the one with no parameter arrays at all runs the
# default pair. The residual form runs the same kernels with a non-null residual pointer.
SCENARIOS = (("identity", True, False, True, False, False, False),
             ("leaky_relu", True, True, True, True, False, False),
             ("elu", True, True, True, False, True, False),
             ("leaky_relu", False, True, True, False, False, False),
             ("elu", True, False, False, False, False, False),
             ("leaky_relu", True, True, True, False, True, True),
             ("elu", False, True, True, False, False, True))
ACT_PARAM = {"identity": 0.0, "leaky_relu": 0.1, "elu": 0.7}
LOOSE = 10  # x the per-dtype tolerance: a loose sanity bound, the matrix check is iabn.check


class OneRank:
    """A communicator of one rank: synchronized BN on it runs the merge kernel and the
    collectives' code path with nothing to exchange."""

    size, rank = 1, 0

    def all_gather(self, a):
        return a.reshape((1,) + a.shape)

    def all_reduce(self, a):
        return a

    def exchange_header(self, values, like):
        return [tuple(values)]


class Memory:
    """Places host arrays in the backend's memory at a chosen alignment, and reads them back
    without any device-side copy kernel (the whole underlying buffer travels by memcpy)."""

    def __init__(self, backend: str):
        self.gpu = backend == "cuda"
        if self.gpu:
            import cupy

            cupy.cuda.set_allocator(None)  # one cudaMalloc per buffer: exact bounds
            self.cp = cupy

    def place(self, a: np.ndarray, layout: str, shift: bool):
        """(device array with a's values in `layout` memory order, flat buffer behind it)."""
        n, c, s = a.shape
        off = 1 if shift else 0
        if self.gpu:
            flat_host = np.zeros(a.size + off, a.dtype)
        else:  # host memory: start on a 64-byte boundary, so off = 0 is really aligned
            raw = np.zeros(a.size + off + 64, a.dtype)
            start = (-raw.ctypes.data % 64) // a.itemsize
            flat_host = raw[start:start + a.size + off]
        body = flat_host[off:]
        order = (0, 1, 2) if layout == "ncs" else (0, 2, 1)
        body[:] = np.ascontiguousarray(a.transpose(order)).ravel()
        strides = (c * s, s, 1) if layout == "ncs" else (c * s, 1, c)
        flat = self.cp.asarray(flat_host) if self.gpu else flat_host
        return self._view(flat[off:], a.shape, strides), (flat, off, a.shape, strides)

    def _view(self, flat, shape, strides):
        st = tuple(x * flat.itemsize for x in strides)
        lib = self.cp.lib.stride_tricks if self.gpu else np.lib.stride_tricks
        return lib.as_strided(flat, shape=shape, strides=st)

    def read(self, handle) -> np.ndarray:
        flat, off, shape, strides = handle
        host = flat.get() if self.gpu else flat
        st = tuple(x * host.itemsize for x in strides)
        return np.lib.stride_tricks.as_strided(host[off:], shape, st).astype(np.float64)

    def vector(self, a):
        if a is None:
            return None
        return self.cp.asarray(a) if self.gpu else a.copy()

    def get(self, a):
        if a is None:
            return None
        return (a.get() if self.gpu else np.asarray(a)).astype(np.float64)


class _Recorded:
    """A kernel as the runtime returned it, noting its name at each stage launch; every
    other attribute (the CUfunction `ptr`, the emulated `kernel`) is the kernel's own."""

    def __init__(self, fn, name: str, launched: set):
        self._fn, self._name, self._launched = fn, name, launched

    def __call__(self, grid, block, args):
        self._launched.add(self._name)
        return self._fn(grid, block, args)

    def __getattr__(self, attr):
        return getattr(self._fn, attr)


def _clear_program_caches() -> None:
    """Drops every cached Problem, with the kernel handles and launch programs in its memo.
    A program binds rt.launch_packed when it is recorded (a functools.partial,
    iabn_core/program.py): one recorded before the block would bypass the recording, and
    one recorded inside it would keep calling the wrapper after the block. torch_fast's
    entries hold Problems and programs too; they are only made by torch calls, so that
    cache is cleared only where iabn.torch_fast is already loaded (no torch import here)."""
    signature.clear()
    fast = sys.modules.get("iabn.torch_fast")
    if fast is not None:
        fast.clear()


@contextlib.contextmanager
def record_launches(backend):
    """Within the block, the backend's kernel lookup and packed launch (launch programs,
    iabn_core/program.py) note every launched kernel name in the set it yields; the runtime
    is restored after (the backend is process-wide: tests run the driver in-process), and
    the program caches are emptied on the way in and out, so that the block's calls record
    their programs through the wrappers and no program outlives the block holding them."""
    _clear_program_caches()
    launched: set = set()
    rt = backend.rt
    lookup, packed = rt.function, rt.launch_packed
    names: dict = {}  # native handle -> kernel name
    own = {k: vars(rt)[k] for k in ("function", "launch_packed") if k in vars(rt)}

    def function(spec, name):
        fn = _Recorded(lookup(spec, name), name, launched)
        names[rt.handle(fn)] = name
        return fn

    def launch_packed(handle, *rest):
        # programs recorded before the block hold handles of their own: not this run's
        if handle in names:
            launched.add(names[handle])
        return packed(handle, *rest)

    rt.function, rt.launch_packed = function, launch_packed
    try:
        yield launched
    finally:
        for k in ("function", "launch_packed"):
            if k in own:
                setattr(rt, k, own[k])
            else:
                delattr(rt, k)
        _clear_program_caches()


def run_step(mem: Memory, backend: str, pair, layout, shape, shift, scenario, rng):
    """One forward + backward; returns {output name: (got float64, stored dtype)}."""
    act, training, affine, running, synced, use_out, with_residual = scenario
    xdt, pdt = numpy_dtype(pair.x), numpy_dtype(pair.param)
    c = shape[1]
    x0 = (rng.normal(size=shape) * 2 + 0.5).astype(xdt)
    dz0 = rng.normal(size=shape).astype(xdt)
    w = (rng.choice([-1.0, 1.0], c) * rng.uniform(0.5, 1.5, c)).astype(pdt) if affine else None
    b = rng.normal(size=c).astype(pdt) if affine else None
    rm = rng.normal(size=c).astype(pdt) if running else None
    rv = rng.uniform(0.5, 2.0, size=c).astype(pdt) if running else None
    x, xh = mem.place(x0, layout, shift)
    dz, dzh = mem.place(dz0, layout, shift)
    out, outh = mem.place(np.zeros_like(dz0), layout, shift) if use_out else (None, dzh)
    params = [mem.vector(a) for a in (w, b, rm, rv)]
    res = {}
    if with_residual:
        r, _ = mem.place(rng.normal(size=shape).astype(xdt), layout, shift)
        dr, drh = mem.place(np.zeros_like(dz0), layout, shift)
        res = dict(residual=r)
    ctx = ops.forward(x, *params, training=training, momentum=0.1, eps=1e-5, activation=act,
                      activation_param=ACT_PARAM[act], backend=None if mem.gpu else backend,
                      comm=OneRank() if synced else None, **res)
    if with_residual:
        res["residual_out"] = dr
    _, dw, db, *_ = ops.backward(ctx, x, dz, out=out, **res)
    got = {"z": (mem.read(xh), pair.x), "dx": (mem.read(outh), pair.x)}
    if with_residual:
        got["dresidual"] = (mem.read(drh), pair.x)
    for name, a in (("dweight", dw), ("dbias", db), ("running_mean", params[2]),
                    ("running_var", params[3])):
        if a is not None:
            got[name] = (mem.get(a), pair.param)
    return got


def compare(got: dict, want: dict) -> list[str]:
    bad = []
    for name, (g, dtype) in got.items():
        w = want[name][0]
        scale = max(float(np.max(np.abs(w))), 1e-30)
        err = float(np.max(np.abs(g - w))) / scale if g.size else 0.0
        if not np.isfinite(err) or err > LOOSE * TOL[dtype]:
            bad.append(f"{name}: relative error {err:.3g} > {LOOSE * TOL[dtype]:.3g}")
    return bad


def expected_kernels() -> set:
    return {name for spec in inst.all_modules() for name in spec.names}


def report(path, backend, steps, launched, problems, done: bool) -> dict:
    expected = expected_kernels()
    rep = dict(backend=backend, finished=done, steps=steps, kernels_expected=len(expected),
               kernels_launched=len(launched & expected), missing=sorted(expected - launched),
               problems=problems)
    if path:  # rewritten as it goes: a run killed under a slow tool still says how far it got
        with open(path, "w") as f:
            json.dump(rep, f, indent=1)
    return rep


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.sanitizer_driver",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--backend", choices=("cuda", "emulator"), default="cuda")
    ap.add_argument("--json", metavar="PATH", help="write launches, coverage and mismatches")
    args = ap.parse_args(argv)
    with record_launches(backends.get(args.backend)) as launched:
        return _drive(args, launched)


def _drive(args, launched: set) -> int:
    mem = Memory(args.backend)
    problems, steps, t0 = [], 0, time.time()
    for pair in PAIRS:
        for layout, shapes in SHAPES.items():
            for label, shape, shift in shapes:
                for scenario in SCENARIOS:
                    seed = steps  # a fresh, reproducible stream per step
                    where = f"{pair.key} {layout} {label} {shape} {scenario[0]} " \
                            f"{'train' if scenario[1] else 'eval'}"
                    try:
                        got = run_step(mem, args.backend, pair, layout, shape, shift, scenario,
                                       np.random.default_rng(seed))
                        want = run_step(Memory("numpy"), "numpy", pair, layout, shape, shift,
                                        scenario, np.random.default_rng(seed))
                        problems += [f"{where}: {p}" for p in compare(got, want)]
                    except Exception as exc:  # report and go on: one crash hides nothing else
                        problems.append(f"{where}: {type(exc).__name__}: {exc}")
                    steps += 1
            print(f"[driver] {pair.key} {layout}: {len(launched)} kernels launched so far "
                  f"({time.time() - t0:.1f} s)", flush=True)
            report(args.json, args.backend, steps, launched, problems, False)
    rep = report(args.json, args.backend, steps, launched, problems, True)
    print(f"[driver] {steps} forward+backward steps in {time.time() - t0:.1f} s; "
          f"{rep['kernels_launched']} of {rep['kernels_expected']} kernels launched; "
          f"{len(problems)} problems")
    for p in problems[:50]:
        print(f"[driver] PROBLEM {p}")
    for name in rep["missing"][:50]:
        print(f"[driver] NOT LAUNCHED {name}")
    if problems:
        return 1
    return 2 if rep["missing"] else 0


if __name__ == "__main__":
    sys.exit(main())

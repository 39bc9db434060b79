"""Where the host time of one iabn layer goes: a diagnostic, not a benchmark.

The first H200 run measured ~2 ms of wall time per training step of one layer whatever its
size, against ~0.4 ms for torch's BatchNorm, while the `null` path (the same host code with
no-op launches) costs ~0.4 ms: the difference lies in what only runs against CUDA (DLPack
bridging, CuPy's stream and device scopes, launches, torch-allocated workspaces). This times
those pieces one by one, wall clock per call with no synchronisation inside the loop, and
profiles the op bodies (in this thread: autograd runs CUDA backward in a worker thread, which
a profiler of this thread would miss).

    python -m benchmarks.profile_host [--out DIR] [--iters N]

On a machine without a GPU it runs the same on CPU tensors with IABN_BACKEND=null.
Writes DIR/profile_host.txt.
"""
from __future__ import annotations

import argparse
import importlib
import cProfile
import io
import os
import pstats
import statistics
import time
from pathlib import Path


def _timed(fn, iters: int, sync) -> float:
    """Median wall microseconds per call over batches of 10 calls."""
    for _ in range(10):
        fn()
    sync()
    per = []
    for _ in range(max(1, iters // 10)):
        t0 = time.perf_counter()
        for _ in range(10):
            fn()
        per.append((time.perf_counter() - t0) * 1e5)
    sync()
    return statistics.median(per)


def _pieces(device, iters: int) -> tuple[list[tuple[str, float]], object, object]:
    import torch

    importlib.import_module("iabn.torch")  # registers the ops
    from iabn.torch_bridge import _device_scope, from_core, to_core
    from iabn.torch_ops import _backward_impl, _forward_impl

    shape = (32, 64, 56, 56) if device.type == "cuda" else (2, 64, 4, 4)
    x0 = torch.randn(shape, device=device)
    w = torch.rand(shape[1], device=device) + 0.5
    b = torch.zeros(shape[1], device=device)
    rm, rv = torch.zeros_like(w), torch.ones_like(w)
    dz = torch.randn_like(x0)
    dx = torch.empty_like(x0)
    x = x0.clone()
    cfg = dict(eps=1e-5, activation="leaky_relu", activation_param=0.01, group_name="")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def forward():
        return _forward_impl(x, w, b, rm, rv, True, 0.1, cfg["eps"], cfg["activation"],
                             cfg["activation_param"], "")

    stats, sig = forward()

    def backward():
        return _backward_impl(x, dz, dx, stats, w, b, True, cfg["eps"], cfg["activation"],
                              cfg["activation_param"], "", sig=sig)

    def scope():
        with _device_scope(x):
            pass

    arr = to_core(x)
    rows = [
        ("torch.empty 256 floats", lambda: torch.empty((256,), device=device)),
        ("to_core (x -> CuPy/NumPy view)", lambda: to_core(x)),
        ("from_core (array -> tensor)", lambda: from_core(arr)),
        ("_device_scope enter+exit", scope),
        ("forward op body (2 launches)", forward),
        ("backward op body (2 launches)", backward),
    ]
    rows += _autograd_rows(device)
    if device.type == "cuda":  # the plain DLPack protocol, which to_core avoids when it can
        import cupy

        rows += [("cupy.from_dlpack(tensor), the protocol", lambda: cupy.from_dlpack(x)),
                 ("torch.from_dlpack(cupy array), the protocol", lambda: torch.from_dlpack(arr))]
    out = [(name, _timed(fn, iters, sync)) for name, fn in rows]
    return out, forward, backward


def _autograd_rows(device):
    """What autograd costs around any Python-defined layer, iabn's or not: a whole step
    (clone, forward, autograd.grad) of an identity autograd.Function, of torch's BN +
    LeakyReLU, and of iabn's InPlaceABN module, on a tiny input. On CUDA, autograd runs the
    backward on its device thread, so a Python backward also pays a thread handoff."""
    import torch
    import torch.nn.functional as F

    from iabn.torch import InPlaceABN

    class Identity(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, g):
            return g

    x0 = torch.randn(2, 8, 4, 4, device=device, requires_grad=True)
    dy = torch.randn(2, 8, 4, 4, device=device)
    bn = torch.nn.BatchNorm2d(8).to(device)
    abn = InPlaceABN(8).to(device)

    def identity():
        torch.autograd.grad(Identity.apply(x0 * 1), (x0,), dy)

    def torch_bn():
        y = F.leaky_relu(bn(x0.clone()), 0.01, inplace=True)
        torch.autograd.grad(y, (x0, bn.weight, bn.bias), dy)

    def iabn_step():
        torch.autograd.grad(abn(x0.clone()), (x0, abn.weight, abn.bias), dy)

    return [("step through an identity Python autograd.Function", identity),
            ("step of torch BatchNorm2d + leaky_relu", torch_bn),
            ("step of iabn InPlaceABN", iabn_step)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--iters", type=int, default=300)
    args = ap.parse_args(argv)

    import torch

    gpu = torch.cuda.is_available()
    if not gpu:
        os.environ["IABN_BACKEND"] = "null"
    device = torch.device("cuda" if gpu else "cpu")
    torch.set_num_threads(1)
    rows, forward, backward = _pieces(device, args.iters)
    lines = [f"# host time of one iabn layer ({'CUDA: ' + torch.cuda.get_device_name() if gpu else 'CPU, IABN_BACKEND=null'})",
             "", "median wall us per call, no synchronisation inside the loop:"]
    lines += [f"  {us:10.1f}  {name}" for name, us in rows]
    from iabn.torch_bridge import _EXCHANGE

    lines += ["", f"capsule exchange in use: to CuPy {_EXCHANGE.fast_in}, to torch "
                  f"{_EXCHANGE.fast_out} (None: not used on this device)"]

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.iters):
        forward()
        backward()
    prof.disable()
    if gpu:
        torch.cuda.synchronize()
    for key in ("tottime", "cumulative"):
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats(key).print_stats(30)
        lines += ["", f"cProfile of {args.iters} forward+backward op bodies, by {key}:",
                  buf.getvalue()]
    path = Path(args.out) / "profile_host.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    print("\n".join(lines[:3 + len(rows)]))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

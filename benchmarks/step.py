"""Whole-network training step: standard BN + LeakyReLU vs InPlaceABN, eager and compiled.

One step = zero_grad, forward, cross-entropy loss, backward, SGD-with-momentum update, on
ResNet-50 (224x224 images) and the DeepLab head (2048x64x64 features), batch 32, in two
precisions: "float16-cl" (autocast float16, channels_last model and input; no loss scaling,
which would only add the same few kernels to every kind) and "float32" (NCHW). Per network,
precision and kind it reports the median step time (CUDA events), images per second, the
peak allocated memory of one step and the first step's loss (the kinds start from the same
convolution weights, so their losses agree to rounding: a cheap check that the InPlaceABN
net computes the same function).

Kinds: "standard" and "iabn" (benchmarks.nets), and "iabn_fused" when iabn.torch's
convert_model accepts fuse_residual=True (the standard net converted with the residual add
fused into the layer before it); detected at run time, so this file needs no change when
that lands. Eager steps run first for every network and precision; torch.compile runs in a
second pass (compiled=True), so a time budget spends itself on eager figures first. That pass
is ResNet-50 only (a compile costs ~40 s) in two modes: "compiled" (torch.compile's default)
and "reduce-overhead" (the compiled graphs replayed as CUDA graphs; a CPU run reports it as
not run). The kernel profile of one step is in step_kernels.
"""
from __future__ import annotations

import functools
import gc
import inspect
import logging
import math
import time

import torch

from . import nets, report
from .cases import NetSetup, Settings

PRECISIONS = {"float16-cl": (torch.float16, torch.channels_last),
              "float32": (None, torch.contiguous_format)}
# Cost of one kind before any is measured (build + first step + timing), eager / compiled.
# A compiled ResNet-50 step took 38 s to its first loss on the H200 (2026 run).
GUESS_S = {False: 10.0, True: 60.0}
# torch.compile keyword arguments per compiled mode, in the order the pass measures them.
COMPILE_MODES = {"compiled": {}, "reduce-overhead": {"mode": "reduce-overhead"}}
COMPILED_NETS = ("resnet50",)


def fused_residual_available() -> bool:
    try:
        from iabn.torch import convert_model
    except ImportError:
        return False
    return "fuse_residual" in inspect.signature(convert_model).parameters


def kinds() -> list[str]:
    return ["standard", "iabn"] + (["iabn_fused"] if fused_residual_available() else [])


def build(setup: NetSetup, kind: str, device) -> torch.nn.Module:
    if kind == "iabn_fused":
        from iabn.torch import convert_model

        return convert_model(nets.build(setup, "standard", device), fuse_residual=True)
    return nets.build(setup, kind, device)


def _count_iabn(model) -> int:
    from iabn.torch import InPlaceABN

    return sum(isinstance(m, InPlaceABN) for m in model.modules())


@functools.lru_cache(maxsize=2)
def _host_batch(setup: NetSetup):
    """The (input, target) of a network on the host, drawn once: the DeepLab head's 1 GiB of
    features takes seconds to draw on a CPU, and every kind must see the same batch."""
    return nets.batch(setup, setup.batches[0], "cpu")


def _trainer(setup: NetSetup, precision: str, kind: str, mode: str, device):
    """(step, model): one training step of a fresh model on the network's fixed batch. The
    batch and parameters are the same tensors every step: CUDA graphs need static inputs."""
    amp_dtype, fmt = PRECISIONS[precision]
    model = build(setup, kind, device).to(memory_format=fmt)
    x, y = (t.to(device) for t in _host_batch(setup))
    x = x.contiguous(memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    fwd = model if mode == "eager" else torch.compile(model, **COMPILE_MODES[mode])
    dev_type = torch.device(device).type
    # a new step may overwrite the graphs' outputs of the last one; saying so up front keeps
    # cudagraph trees from guessing where a step begins
    begin = (torch.compiler.cudagraph_mark_step_begin if mode == "reduce-overhead"
             else lambda: None)

    def step(_=None):
        begin()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev_type, dtype=amp_dtype or torch.float32,
                            enabled=amp_dtype is not None):
            loss = nets.loss_of(fwd, x, y)
        loss.backward()
        opt.step()
        return loss

    return step, model


class _GraphSkips(logging.Handler):
    """Counts inductor's "skipping cudagraphs due to ..." messages while it is attached: a
    reduce-overhead figure taken without CUDA graphs would be a default-mode figure."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.reasons: list[str] = []
        self.logger = None

    def emit(self, record):
        self.reasons.append(record.getMessage())

    def __enter__(self):
        try:
            from torch._inductor import cudagraph_utils

            self.logger = cudagraph_utils.cudagraphs_log
            self.logger.addHandler(self)
        except (ImportError, AttributeError):  # another torch: the counter still works
            pass
        self.before = _skip_counter()
        return self

    def __exit__(self, *exc):
        if self.logger is not None:
            self.logger.removeHandler(self)
        self.count = _skip_counter() - self.before


def _skip_counter() -> int:
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return 0
    return counters["inductor"]["cudagraph_skips"]


def measure(setup: NetSetup, precision: str, kind: str, mode: str, device, timer,
            settings: Settings) -> dict:
    """One row: median step ms over settings.step_timing() steps, peak memory of one more.
    `mode`: "eager", "compiled" or "reduce-overhead"."""
    n = setup.batches[0]
    with _GraphSkips() as skips:
        step, model = _trainer(setup, precision, kind, mode, device)
        t0 = time.perf_counter()
        first_loss = step().detach().item()  # compiles when compiled; waits for the GPU
        first_s = time.perf_counter() - t0
        warmup, iters = settings.step_timing()  # warm-up steps also record the CUDA graphs
        ms = timer(lambda: None, step, warmup, iters)
        peak = None
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            step()
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device)
    out = dict(iabn_layers=_count_iabn(model), step_ms=ms, images_per_s=n / (ms * 1e-3),
               peak_bytes=peak, first_step_s=first_s, first_loss=first_loss)
    if mode == "reduce-overhead" and skips.count:
        reason = skips.reasons[0] if skips.reasons else "see the log"
        out["status"] = (f"no CUDA graphs (inductor skipped them {skips.count}x: {reason}); "
                         "the time is not a reduce-overhead figure")[:300]
    return out


def step_rows(settings: Settings, device, timer=None, compiled: bool = False,
              progress=print, rows=None, on_row=lambda: None) -> list[dict]:
    """Rows for every network x precision x kind, in one pass (eager, or the compiled modes
    on COMPILED_NETS), appended to `rows` as they come (on_row() after each, e.g. to save
    progress). Under a deadline, a kind that would not finish in the time left is reported
    as not run."""
    from .speed import CudaTimer, allow_recompiles

    timer = timer or CudaTimer(device)
    if compiled:
        allow_recompiles()
    modes = list(COMPILE_MODES) if compiled else ["eager"]
    setups = [s for s in settings.step_setups() if not compiled or s.net in COMPILED_NETS]
    cuda = torch.device(device).type == "cuda"
    rows = [] if rows is None else rows
    # what one kind costs: a guess until the first is measured, then the largest seen
    per_kind, seen = GUESS_S[compiled] if settings.deadline is not None else 0.0, 0
    for precision in settings.step_precisions:
        for setup in setups:
            for mode in modes:
                for kind in kinds():
                    row = dict(net=setup.net, input=nets_input(setup), batch=setup.batches[0],
                               precision=precision, mode=mode, kind=kind)
                    if mode == "reduce-overhead" and not cuda:
                        rows.append(dict(row, status="not run: reduce-overhead replays CUDA "
                                         "graphs; there is no CUDA device here"))
                    elif settings.time_left() < per_kind:
                        rows.append(dict(row, status="not run: time budget"))
                    else:
                        progress(f"  step {mode} {setup.net} {precision} {kind}")
                        t0 = time.monotonic()
                        rows.append(_row(row, setup, precision, kind, mode, device, timer,
                                         settings))
                        cost = time.monotonic() - t0
                        per_kind, seen = (max(per_kind, cost) if seen else cost), seen + 1
                    on_row()
    return rows


def _row(row, setup, precision, kind, mode, device, timer, settings) -> dict:
    try:
        return dict(row, status="ok") | measure(setup, precision, kind, mode, device, timer,
                                                settings)
    except torch.cuda.OutOfMemoryError:
        return dict(row, status="out of memory")
    except Exception as exc:  # that kind only; the others still run
        return dict(row, status=f"failed: {type(exc).__name__}: {exc}".splitlines()[0][:200])
    finally:
        gc.collect()
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()


def nets_input(setup: NetSetup) -> str:
    from .memory import _input_label

    return _input_label(setup)


# ------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------
def _groups(rows):
    out: dict = {}
    for r in rows:
        out.setdefault((r["net"], r["precision"], r["mode"]), {})[r["kind"]] = r
    return out


def section(rows: list[dict]) -> list[str]:
    """Markdown: per network, precision and mode, each kind's step time and peak memory."""
    ks = list(dict.fromkeys(r["kind"] for r in rows))
    header = ["net", "precision", "mode"] + [f"{k} ms" for k in ks] + [
        f"{k} / standard time" for k in ks[1:]] + [f"{k} peak GiB" for k in ks] + [
        f"{k} memory saving" for k in ks[1:]] + ["max loss diff"]
    body = []
    for (net, prec, mode), by in _groups(rows).items():
        ok = {k: r for k, r in by.items() if r.get("status") == "ok"}
        std = ok.get("standard", {})

        def ratio(k, key):
            a, b = ok.get(k, {}).get(key), std.get(key)
            return a / b if (a and b) else None

        losses = [r["first_loss"] for r in ok.values()]
        diff = (max(losses) - min(losses)) / abs(std["first_loss"]) if (
            len(losses) > 1 and std.get("first_loss")) else None
        body.append([net, prec, mode]
                    + [report._f(ok.get(k, {}).get("step_ms"), "{:.1f}") for k in ks]
                    + [report._f(ratio(k, "step_ms")) for k in ks[1:]]
                    + [report._f((ok.get(k, {}).get("peak_bytes") or math.nan) / report.GIB)
                       for k in ks]
                    + [report._f(None if ratio(k, "peak_bytes") is None else
                                 1 - ratio(k, "peak_bytes"), "{:.1%}") for k in ks[1:]]
                    + [report._f(diff, "{:.1e}")])
    lines = report._table(header, body)
    bad = [r for r in rows if r.get("status") != "ok"]
    lines += [f"- {r['net']} {r['precision']} {r['mode']} {r['kind']}: {r['status']}"
              for r in bad]
    return lines + ([""] if bad else [])


def plot(rows: list[dict], path, device: str) -> None:
    """Step time and peak memory per network/precision/mode, one bar per kind."""
    plt = report._plt()
    groups = _groups(rows)
    labels = [f"{n}\n{p}\n{m}" for n, p, m in groups]
    ks = list(dict.fromkeys(r["kind"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(labels) + 3), 4.5))
    width = 0.8 / len(ks)
    for ax, key, scale, unit in ((axes[0], "step_ms", 1.0, "ms per training step"),
                                 (axes[1], "peak_bytes", report.GIB, "peak allocated GiB")):
        for i, k in enumerate(ks):
            ys = [(g.get(k, {}).get(key) or math.nan) / scale for g in groups.values()]
            ax.bar([j + i * width for j in range(len(labels))], ys, width, label=k)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))])
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_ylabel(unit)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    fig.suptitle(f"Whole training step, batch 32 ({device})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

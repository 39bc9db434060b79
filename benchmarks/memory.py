"""Memory: bytes autograd saves for backward (any device) and GPU peak memory per training step.

All compare the same network built with standard BN + in-place LeakyReLU, with InPlaceABN, and
with InPlaceABN plus the fused residual (convert_model of the standard net; benchmarks.nets).
Saved bytes are exact and deterministic, so they run on the CPU and in CI; peak allocated
memory needs torch's CUDA caching allocator and runs only on a GPU.
"""
from __future__ import annotations

import gc
import time

import torch

from . import nets
from .cases import NetSetup, Settings

KINDS = ("standard", "iabn", "iabn_fused")


def saved_bytes(model: torch.nn.Module, x) -> int:
    """Bytes of the distinct storages autograd keeps for backward of model(x), parameters
    excluded (they live for the whole run either way).

    Storages are counted once however many saved tensors view them: the InPlace-ABN output
    saved by the layer and by the next conv is one buffer, as is an in-place activation's
    output. Only the forward pass runs: what is saved is fixed once forward returns.
    """
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    params |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params and st.nbytes():
            seen[st.data_ptr()] = st.nbytes()
        return t  # keeps the tensor (so its address) alive until the graph is dropped

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    del out
    return sum(seen.values())


def saved_bytes_rows(settings: Settings, device: str = "cpu") -> list[dict]:
    """One row per (network, batch): saved bytes for every kind, and the savings of iabn and
    iabn_fused relative to standard."""
    rows = []
    for setup in settings.net_setups(device):
        models = {k: nets.build(setup, k, device) for k in KINDS}
        for n in setup.batches:
            x, _ = nets.batch(setup, n, device)
            got = {k: saved_bytes(models[k], x) for k in KINDS}
            rows.append(dict(device=device, net=setup.net, input=_input_label(setup), batch=n,
                             standard_bytes=got["standard"], iabn_bytes=got["iabn"],
                             saving=1 - got["iabn"] / got["standard"],
                             iabn_fused_bytes=got["iabn_fused"],
                             saving_fused=1 - got["iabn_fused"] / got["standard"]))
    return rows


def _input_label(setup: NetSetup) -> str:
    if setup.net == "deeplabv3_resnet50":
        return f"3x{setup.size}x{setup.size} (width {setup.width}, output stride 8)"
    if setup.net == "resnet50":
        return f"3x{setup.size}x{setup.size} (width {setup.width})"
    crop = setup.size * 8
    return f"{setup.width}x{setup.size}x{setup.size} feats ({crop}x{crop} crop)"


# ------------------------------------------------------------------------------------------
# GPU peak memory
# ------------------------------------------------------------------------------------------
def _oom_types():
    return (torch.cuda.OutOfMemoryError,)


def peak_step_bytes(model, setup: NetSetup, n: int, device) -> tuple[int, int]:
    """(peak allocated bytes during one full training step, bytes allocated before it).

    One SGD-with-momentum step runs first so gradients and momentum buffers exist (steady
    state); the measured step then covers forward, loss, backward and the optimizer update.
    """
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x, y = nets.batch(setup, n, device)

    def step():
        opt.zero_grad(set_to_none=False)
        nets.loss_of(model, x, y).backward()
        opt.step()

    step()
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del opt, x, y
    return peak, base


def _measure(setup: NetSetup, kind: str, n: int, device):
    """peak_step_bytes on a fresh model, or None when the step runs out of memory."""
    model = nets.build(setup, kind, device)
    try:
        return peak_step_bytes(model, setup, n, device)
    except _oom_types():
        return None
    finally:
        del model
        gc.collect()
        torch.cuda.empty_cache()


class _Clock:
    """Longest measurement so far: under a deadline, one that might not finish is not begun."""

    def __init__(self, settings: Settings):
        self.settings, self.cost = settings, 0.0

    def allows(self, factor: float = 1.0) -> bool:
        return self.settings.time_left() >= factor * self.cost

    def timed(self, fn):
        t0 = time.monotonic()
        try:
            return fn()
        finally:
            self.cost = max(self.cost, time.monotonic() - t0)


def peak_memory_rows(settings: Settings, device="cuda") -> list[dict]:
    rows, clock = [], _Clock(settings)
    for setup in settings.net_setups("cuda"):
        for n in setup.batches:
            for kind in KINDS:
                row = dict(net=setup.net, input=_input_label(setup), batch=n, kind=kind)
                if not clock.allows():
                    rows.append(dict(row, peak_bytes=None, steady_bytes=None, oom=None,
                                     note="not run: time budget"))
                    continue
                got = clock.timed(lambda: _measure(setup, kind, n, device))
                rows.append(dict(row, peak_bytes=None if got is None else got[0],
                                 steady_bytes=None if got is None else got[1],
                                 oom=got is None))
    return rows


def max_batch_rows(settings: Settings, device="cuda") -> list[dict]:
    """Largest batch whose training step's peak allocated memory fits the budget: doubling,
    then bisection, each point a real measured step (an OOM counts as not fitting)."""
    budget = int(settings.memory_budget_gib * 2 ** 30)
    cap = 64 if settings.tiny else 4096
    rows, clock = [], _Clock(settings)
    for setup in settings.net_setups("cuda"):
        for kind in KINDS:
            if not clock.allows(factor=12):  # a search takes about a dozen measurements
                rows.append(dict(net=setup.net, input=_input_label(setup), kind=kind,
                                 budget_gib=settings.memory_budget_gib, max_batch=None,
                                 capped=False, note="not run: time budget"))
                continue

            def fits(n):
                if not clock.allows():
                    raise TimeoutError
                got = clock.timed(lambda: _measure(setup, kind, n, device))
                return got is not None and got[0] <= budget

            lo, hi, note = 0, 1, {}
            try:
                while hi <= cap and fits(hi):
                    lo, hi = hi, hi * 2
                hi = min(hi, cap + 1)
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    lo, hi = (mid, hi) if fits(mid) else (lo, mid)
            except TimeoutError:  # what was measured stands: a lower bound
                note = dict(note=f"at least {lo} (search cut by the time budget)")
            rows.append(dict(net=setup.net, input=_input_label(setup), kind=kind,
                             budget_gib=settings.memory_budget_gib, max_batch=lo,
                             capped=lo >= cap, **note))
    return rows

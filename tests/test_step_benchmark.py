"""The whole-network step part and the time budget of `python -m benchmarks`, exercised on the
CPU: the step code path at tiny sizes (its timings are never reported), the fused-residual
variant's feature detection, and budgeted parts leaving out work instead of overrunning."""
from __future__ import annotations

import dataclasses
import gzip
import json
import time

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("matplotlib")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_step_rows_on_cpu(tmp_path):
    from benchmarks import cases, speed, step

    settings = cases.Settings(tiny=True, compile=False)
    rows = step.step_rows(settings, "cpu", timer=speed.WallTimer(), progress=lambda s: None)
    kinds = step.kinds()
    assert [(r["net"], r["precision"], r["kind"]) for r in rows] == [
        (s.net, p, k) for p in settings.step_precisions for s in settings.step_setups()
        for k in kinds]
    for r in rows:
        assert r["status"] == "ok", r
        assert r["mode"] == "eager" and r["step_ms"] > 0 and r["peak_bytes"] is None
        assert (r["iabn_layers"] > 0) == r["kind"].startswith("iabn")
        assert torch.isfinite(torch.tensor(r["first_loss"]))
    # Same conv weights, same function: the head's losses agree to rounding (the tiny ResNet
    # has BN over 2 values per channel in its last stage, too ill-conditioned to compare).
    head = {(r["precision"], r["kind"]): r["first_loss"] for r in rows
            if r["net"] == "deeplab_head"}
    for prec in settings.step_precisions:
        for kind in kinds[1:]:
            assert abs(head[(prec, kind)] - head[(prec, "standard")]) <= 1e-3 * abs(
                head[(prec, "standard")]), (prec, kind)
    md = "\n".join(step.section(rows))
    assert "| net | precision | mode | standard ms | iabn ms |" in md
    assert md.count("| eager |") == 4
    step.plot(rows, tmp_path / "step.png", "cpu-test")
    assert (tmp_path / "step.png").read_bytes()[:8] == PNG_MAGIC


def test_fused_residual_variant_is_detected(monkeypatch):
    """When convert_model grows fuse_residual, the third kind appears and is built by
    converting the standard net with fuse_residual=True."""
    import iabn.torch as it
    from benchmarks import cases, step

    calls = []

    def convert_model(model, sync=False, group=None, fuse_residual=False):
        calls.append(fuse_residual)
        return model

    assert step.kinds() == (["standard", "iabn", "iabn_fused"] if step.fused_residual_available()
                            else ["standard", "iabn"])
    monkeypatch.setattr(it, "convert_model", convert_model)
    assert step.kinds() == ["standard", "iabn", "iabn_fused"]
    setup = cases.Settings(tiny=True).step_setups()[1]
    model = step.build(setup, "iabn_fused", "cpu")
    assert calls == [True] and model.training


def test_step_rows_leave_out_what_the_deadline_does_not_allow(monkeypatch):
    from benchmarks import cases, step

    def never(*args, **kwargs):
        raise AssertionError("measured after the deadline")

    monkeypatch.setattr(step, "measure", never)
    settings = cases.Settings(tiny=True, deadline=time.monotonic() - 1)
    rows = step.step_rows(settings, "cpu", progress=lambda s: None)
    assert rows and all(r["status"] == "not run: time budget" for r in rows)
    assert "not run: time budget" in "\n".join(step.section(rows))


def test_memory_parts_leave_out_what_the_deadline_does_not_allow(monkeypatch):
    from benchmarks import cases, memory

    calls = []
    monkeypatch.setattr(memory, "_measure", lambda *a: calls.append(a) or (2 ** 30, 0))
    late = cases.Settings(tiny=True, deadline=time.monotonic() - 1)
    peak = memory.peak_memory_rows(late)
    assert calls == [] and all(r["note"] == "not run: time budget" for r in peak)
    rows = memory.max_batch_rows(late)
    assert calls == [] and all(r["max_batch"] is None and r["note"] == "not run: time budget"
                               for r in rows)
    rows = memory.max_batch_rows(dataclasses.replace(late, deadline=None))
    assert calls and all(r["max_batch"] == 64 and r["capped"] for r in rows)  # 1 GiB fits


def test_prioritized_cases_cover_every_group_first():
    from benchmarks import cases, speed

    all_cases = cases.Settings().speed_cases()
    order = speed.prioritized(all_cases)
    assert sorted(order, key=all_cases.index) == all_cases  # a permutation
    groups = {(c.family, c.n, c.dtype, c.layout) for c in all_cases}
    first = order[:len(groups)]
    assert {(c.family, c.n, c.dtype, c.layout) for c in first} == groups


def test_add_compiled_leaves_out_cases_past_the_deadline(monkeypatch):
    from benchmarks import cases, speed

    monkeypatch.setattr(speed, "implementations", lambda with_compile: {"compiled": None})
    case = cases.BNCase("resnet50", 2, 8, 6, 6)
    rows = [dict(speed._base(case), mode=m, status="ok", iabn_ms=1.0) for m in speed.MODES]
    settings = cases.Settings(tiny=True, deadline=time.monotonic() - 1)
    assert speed.add_compiled(rows, settings, "cpu", timer=speed.WallTimer()) == 0
    assert all(r["compiled_error"] == "not run: time budget" for r in rows)


def test_time_budget_shares(monkeypatch):
    """Each budgeted part gets its share of the time left; a part whose share is below its
    floor is reported as not run with the numbers, instead of starting."""
    from benchmarks import cases
    from benchmarks.__main__ import TIME_FLOOR_S, Run

    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    run = Run(cases.Settings(), budget=90, parts=["speed", "memory", "compile"])
    s = run.settings_for("speed")  # 3 of 3 + 3 + 1 shares of 90 s
    assert s.deadline == pytest.approx(1000 + 90 * 3 / 7)
    now[0] += 60  # speed overran its share: 30 s left for memory and compile
    s = run.settings_for("memory")
    assert s.deadline == pytest.approx(1060 + 30 * 3 / 4)
    now[0] += 20
    assert run.settings_for("compile") is None  # 10 s left, the floor is 45 s
    assert run.status["compile"].startswith("not run: time budget (10 s of 10 s left")
    assert TIME_FLOOR_S["compile"] > 10
    assert Run(cases.Settings()).settings_for("speed").deadline is None  # no budget


def test_gpu_summary_renders_the_step_part(tmp_path):
    """write_outputs with step rows as a GPU run makes them (eager + compiled, one left out
    by the budget), so a GPU run cannot die formatting them."""
    from benchmarks import cases
    from benchmarks.__main__ import Run
    from benchmarks.summary import write_outputs

    gib = 2 ** 30
    rows = []
    for mode in ("eager", "compiled"):
        for kind, ms, peak in (("standard", 100.0, 10 * gib), ("iabn", 90.0, 7 * gib)):
            rows.append(dict(net="resnet50", input="3x224x224", batch=32, precision="float16-cl",
                             mode=mode, kind=kind, status="ok", iabn_layers=0, step_ms=ms,
                             images_per_s=320.0, peak_bytes=peak, first_step_s=1.0,
                             first_loss=6.9 + (kind == "iabn") * 1e-4))
    rows.append(dict(net="deeplab_head", input="2048x64x64", batch=32, precision="float32",
                     mode="compiled", kind="iabn", status="not run: time budget"))
    run = Run()
    run.attempt("step", lambda: rows)
    write_outputs(tmp_path, run, cases.Settings(), dict(device="stand-in"), True, [])
    md = (tmp_path / "summary.md").read_text()
    assert "## Whole training step, batch 32 (GPU, CUDA events)" in md
    line = next(l for l in md.splitlines() if l.startswith("| resnet50 | float16-cl | eager"))
    assert "| 100.0 | 90.0 | 0.90 | 10.00 | 7.00 | 30.0% | 1.4e-05 |" in line
    assert "- deeplab_head float32 compiled iabn: not run: time budget" in md
    assert (tmp_path / "step.png").read_bytes()[:8] == PNG_MAGIC
    assert len((tmp_path / "step.csv").read_text().splitlines()) == 6


def test_max_batch_search_cut_by_the_deadline_keeps_its_lower_bound(monkeypatch):
    """Each stand-in measurement takes 10 (fake) seconds; with 25 s the search measures
    batches 1 and 2, stops before 4, and says so; the next search is not started."""
    from benchmarks import cases, memory

    now = [0.0]

    def measure(setup, kind, n, device):
        now[0] += 10
        return (2 ** 20, 0)  # always fits

    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    monkeypatch.setattr(memory, "_measure", measure)
    rows = memory.max_batch_rows(cases.Settings(tiny=True, deadline=25.0))
    assert rows[0]["max_batch"] == 2
    assert rows[0]["note"] == "at least 2 (search cut by the time budget)"
    assert all(r["note"] == "not run: time budget" for r in rows[1:])


def test_compiled_passes_run_last_and_report(monkeypatch):
    """The torch.compile passes as a GPU run makes them (the measurements are stand-ins):
    each gets its deadline, its status says how much it covered, progress is saved after
    each, and a pass with nothing to add to gives its share to the others."""
    from benchmarks import cases, speed, step
    from benchmarks.__main__ import Run, compiled_passes

    seen = {}

    def add_compiled(rows, settings, device, progress=print):
        seen["speed"] = settings.deadline
        return 2

    def step_rows(settings, device, compiled=False, progress=print, rows=None,
                  on_row=lambda: None):
        seen["step"] = (compiled, settings.deadline)
        rows.append(dict(status="ok"))
        on_row()
        rows.append(dict(status="not run: time budget"))
        on_row()
        return rows

    monkeypatch.setattr(speed, "add_compiled", add_compiled)
    monkeypatch.setattr(step, "step_rows", step_rows)
    parts = ["speed", "step", "speed (torch.compile)", "step (torch.compile)"]
    run = Run(cases.Settings(), budget=600, parts=parts)
    run.data.update(speed=([dict(label=f"s{i}") for i in range(3)], 1.0), step=[])
    saves = []
    compiled_passes(run, gpu=True, save=lambda: saves.append(1))
    assert run.status == {"speed (torch.compile)": "ran: 2 of 3 shapes",
                          "step (torch.compile)": "ran: 1 of 2 runs"}
    assert seen["step"][0] is True and seen["speed"] < seen["step"][1]
    assert len(saves) == 4  # two rows of the step pass, and after each pass

    run = Run(cases.Settings(), budget=600, parts=parts[2:])
    run.data.update(step=[])  # no speed rows: its compiled pass is dropped, not scheduled
    compiled_passes(run, gpu=True)
    assert list(run.status) == ["step (torch.compile)"] and run.pending == []
    assert compiled_passes(Run(cases.Settings(compile=False)), gpu=True) is None


# ------------------------------------------------------------------------------------------
# the compiled pass (default and reduce-overhead) and the kernel profile, on the CPU
# ------------------------------------------------------------------------------------------
def _eager_compile(monkeypatch):
    """torch.compile with the eager backend (compiling ResNet-50 with inductor on 2 cores
    takes minutes); the keyword arguments each call got are recorded."""
    calls = []
    real = torch.compile

    def compile_(model, **kw):
        calls.append(kw)
        return real(model, backend="eager")

    monkeypatch.setattr(torch, "compile", compile_)
    return calls


def test_compiled_pass_modes_on_cpu(monkeypatch):
    """ResNet-50 only, every precision x mode x kind; torch.compile called with the mode's
    arguments; reduce-overhead is reported as not run on a CPU, with its reason, and never
    carries a figure."""
    from benchmarks import cases, speed, step

    calls = _eager_compile(monkeypatch)
    settings = cases.Settings(tiny=True)
    rows = step.step_rows(settings, "cpu", timer=speed.WallTimer(), compiled=True,
                          progress=lambda s: None)
    kinds = step.kinds()
    assert [(r["net"], r["precision"], r["mode"], r["kind"]) for r in rows] == [
        ("resnet50", p, m, k) for p in settings.step_precisions
        for m in ("compiled", "reduce-overhead") for k in kinds]
    for r in rows:
        if r["mode"] == "compiled":
            assert r["status"] == "ok" and r["step_ms"] > 0, r
        else:
            assert r["status"].startswith("not run: reduce-overhead replays CUDA graphs")
            assert "step_ms" not in r
    assert calls == [{}] * (len(kinds) * len(settings.step_precisions))
    md = "\n".join(step.section(rows))
    assert "| reduce-overhead |" in md and "resnet50 float32 reduce-overhead iabn: not run" in md


def test_reduce_overhead_without_cuda_graphs_is_not_reported_as_such(monkeypatch):
    """If inductor skips the CUDA graphs, the row keeps its time for the record but its
    status says it is not a reduce-overhead figure (so the summary table leaves it out)."""
    from torch._inductor.cudagraph_utils import log_cudagraph_skip_and_bump_counter

    from benchmarks import cases, speed, step

    calls = _eager_compile(monkeypatch)
    real_loss = step.nets.loss_of

    def loss_of(model, x, y):  # what inductor does when it cannot record a graph
        log_cudagraph_skip_and_bump_counter("skipping cudagraphs due to mutated inputs")
        return real_loss(model, x, y)

    monkeypatch.setattr(step.nets, "loss_of", loss_of)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: None)
    settings = cases.Settings(tiny=True)
    setup = settings.step_setups()[0]
    got = step.measure(setup, "float32", "iabn", "reduce-overhead", "cpu", speed.WallTimer(),
                       settings)
    assert calls == [{"mode": "reduce-overhead"}]
    assert got["status"].startswith("no CUDA graphs (inductor skipped them")
    assert "mutated inputs" in got["status"] and got["step_ms"] > 0
    got = step.measure(setup, "float32", "iabn", "compiled", "cpu", speed.WallTimer(), settings)
    assert "status" not in got  # the default mode has no graphs to miss


def test_kernel_profile_on_cpu(tmp_path):
    """The profiler pass behind the fused-residual anomaly: rows per kind (CPU ops by self
    time here, CUDA kernels on a GPU), the text report with the differences, the traces."""
    from benchmarks import cases, step, step_kernels

    settings = cases.Settings(tiny=True)
    rows = step_kernels.kernel_profile(settings, "cpu", tmp_path, steps=2,
                                       progress=lambda s: None)
    kinds = [k for k in step_kernels.PROFILE_KINDS if k in step.kinds()]
    assert kinds[0] == "iabn" and {r["kind"] for r in rows} == set(kinds)
    for kind in kinds:
        mine = [r for r in rows if r["kind"] == kind]
        assert mine and all(r["status"] == "ok" and r["timing"] == "CPU ops (self time)"
                            for r in mine)
        assert sum(r["share"] for r in mine) == pytest.approx(1.0)
        times = [r["us_per_step"] for r in mine]
        assert times == sorted(times, reverse=True) and times[0] > 0
        assert any("convolution" in r["name"] for r in mine)
        with gzip.open(tmp_path / f"step_kernels_{kind}.json.gz") as f:
            assert json.load(f)["traceEvents"]
    md = step_kernels.write_kernels(tmp_path, rows, "cpu-test")
    text = (tmp_path / "step_kernels.txt").read_text()
    assert "== iabn:" in text and len((tmp_path / "step_kernels.csv").read_text().splitlines()
                                      ) == len(rows) + 1
    if len(kinds) == 2:
        assert "== largest differences (iabn_fused - iabn, us per step)" in text
    assert md[0].startswith("## Kernel profile") and "== iabn:" in "\n".join(md)


def test_kernel_profile_leaves_out_what_the_deadline_does_not_allow(tmp_path, monkeypatch):
    from benchmarks import cases, step, step_kernels

    monkeypatch.setattr(step, "_trainer", lambda *a: pytest.fail("built past the deadline"))
    late = cases.Settings(tiny=True, deadline=time.monotonic() - 1)
    rows = step_kernels.kernel_profile(late, "cpu", tmp_path, progress=lambda s: None)
    assert rows and all(r["status"] == "not run: time budget" for r in rows)
    assert "iabn: not run: time budget" in "\n".join(step_kernels.kernel_report(rows, "cpu"))


def test_a_placed_compiled_pass_runs_there_and_only_once(monkeypatch):
    """--parts step_compiled runs the compiled step pass at its place (before the parts
    after it); the pass after every part then leaves it alone and runs only the rest."""
    from benchmarks import cases, speed, step
    from benchmarks.__main__ import Run, compiled_passes

    order = []
    monkeypatch.setattr(speed, "add_compiled", lambda *a, **k: order.append("speed") or 1)

    def step_rows(settings, device, compiled=False, progress=print, rows=None,
                  on_row=lambda: None):
        order.append("step")
        rows.append(dict(status="ok"))
        return rows

    monkeypatch.setattr(step, "step_rows", step_rows)
    parts = ["speed (torch.compile)", "step (torch.compile)"]
    run = Run(cases.Settings(), budget=600, parts=parts)
    run.data.update(speed=([dict(label="s0")], 1.0))  # no eager step rows: not needed
    compiled_passes(run, gpu=True, only="step")
    assert order == ["step"] and list(run.status) == ["step (torch.compile)"]
    compiled_passes(run, gpu=True)
    assert order == ["step", "speed"] and run.status["speed (torch.compile)"] == "ran: 1 of 1 shapes"
    run = Run(cases.Settings(), budget=600, parts=parts)
    compiled_passes(run, gpu=True, only="speed")  # nothing to add the baseline to
    assert run.status == {"speed (torch.compile)": "not run: the speed part did not run: no "
                          "rows to add a baseline to"}
    run = Run(cases.Settings(compile=False))
    compiled_passes(run, gpu=True, only="step")
    assert run.status == {"step (torch.compile)": "not run: --no-compile"}


def test_parts_run_in_the_order_given(tmp_path):
    """`python -m benchmarks --parts` keeps the order it is given (the GPU suite's order of
    importance), placed compiled passes included; without a GPU each says why it did not
    run."""
    import subprocess
    import sys
    from pathlib import Path

    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--cpu-only", "--tiny",
                           "--parts", "step_kernels,step_compiled,step,speed_compiled",
                           "--out", str(tmp_path)], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    status = json.loads((tmp_path / "environment.json").read_text())["status"]
    assert list(status.items()) == [(p, "not run: --cpu-only") for p in (
        "step_kernels", "step (torch.compile)", "step", "speed (torch.compile)")]

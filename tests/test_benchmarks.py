"""The benchmark suite: `python -m benchmarks --cpu-only --tiny` end to end, the numbers that
must not depend on the machine, and the GPU-only code paths exercised on the CPU (their output
is checked for shape, never reported)."""
from __future__ import annotations

import csv
import math
import json
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--cpu-only", "--tiny",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def test_outputs_exist(results):
    for name in ("summary.md", "environment.json", "traffic.csv", "launches.csv",
                 "compile.csv", "saved_bytes.csv", "overhead.csv"):
        assert (results / name).stat().st_size > 0, name
    assert (results / "saved_bytes_vs_batch.png").read_bytes()[:8] == PNG_MAGIC
    # GPU parts produce no files at all rather than placeholder numbers
    for name in ("speed.csv", "speed_ratio.png", "peak_memory.csv", "memory_vs_batch.png",
                 "step.csv", "step.png"):
        assert not (results / name).exists(), name


def test_summary_labels_what_did_not_run(results):
    md = (results / "summary.md").read_text()
    status = json.loads((results / "environment.json").read_text())["status"]
    assert status["speed"] == status["memory"] == status["step"] == "not run: --cpu-only"
    assert all(status[p] == "ran" for p in ("counts", "compile", "saved", "overhead"))
    assert md.count("No figures: not run: --cpu-only.") == 3
    assert "CPU only" in md and "measured on the CPU" in md
    assert "Warm (CuPy disk-cache hit + cubin load) is **not measured**" in md


def test_bytes_per_element_are_the_kernels_minimum(results):
    """Training forward = 2 reads + 1 write of x, backward = 4 reads + 1 write, eval forward =
    1 + 1, for every dtype pair and layout, plus only O(C) per-channel bytes."""
    rows = _csv(results / "traffic.csv")
    want = {"forward (train)": (2, 1, 2), "backward (train)": (4, 1, 2),
            "forward (eval)": (1, 1, 1),
            # residual form: + 1 read of r forward; + 2 reads of r and 1 write of dr backward
            "forward (train, residual)": (3, 1, 2), "backward (train, residual)": (6, 2, 2)}
    seen = set()
    for r in rows:
        if r["stage"] not in want:
            continue
        loads, stores, launches = want[r["stage"]]
        isz, c = int(r["itemsize"]), int(r["shape"].split("x")[1])
        numel = math.prod(int(d) for d in r["shape"].split("x"))
        per_elem = float(r["load_per_elem"]) + float(r["store_per_elem"])
        assert (int(r["tensor_loads"]), int(r["tensor_stores"])) == (loads, stores), r
        # O(C * G^2) besides: per-channel constants once per block, partials one row per
        # block, each consuming block merging its channel's G partials (tests/test_kernels.py)
        g = int(r["blocks"])
        per_channel = 2 * (g * g + g + 4) * c * 64
        assert int(r["per_channel_bytes"]) <= per_channel, r
        slack = per_channel / numel
        assert (loads + stores) * isz <= per_elem <= (loads + stores) * isz + slack, r
        assert int(r["launches"]) == launches, r
        seen.add((r["pair"], r["layout"]))
    assert len(seen) == 12  # 6 dtype pairs x 2 layouts


def test_launches_per_step(results):
    rows = {(r["path"], r["step"]): int(r["launches"]) for r in _csv(results / "launches.csv")}
    assert rows[("iabn_core.ops", "training step (forward + backward)")] == 4
    assert rows[("iabn.torch.InPlaceABN", "training step (forward + backward)")] == 4
    assert rows[("iabn_core.ops", "forward (eval)")] == 1
    assert rows[("iabn.torch.InPlaceABN", "forward (eval)")] == 1


def test_overhead_csv(results):
    rows = _csv(results / "overhead.csv")
    assert list(rows[0]) == ["impl", "path", "variant", "stage", "us_per_call", "launches",
                             "frames"]
    assert {(r["impl"], r["path"]) for r in rows} == {("torch", "cpu"), ("iabn", "cpu"),
                                                      ("torch", "cpu:null"), ("iabn", "null")}
    assert all(float(r["us_per_call"]) > 0 for r in rows)
    assert "## Host overhead per layer (CPU)" in (results / "summary.md").read_text()


def test_saved_bytes(results):
    rows = _csv(results / "saved_bytes.csv")
    assert {r["net"] for r in rows} == {"resnet50", "deeplab_head", "deeplabv3_resnet50"}
    by = {}
    for r in rows:
        std, iabn, fused = (int(r[k]) for k in ("standard_bytes", "iabn_bytes",
                                                "iabn_fused_bytes"))
        assert 0 < fused <= iabn < std, r
        by[(r["net"], int(r["batch"]))] = (std, iabn, fused)
    # activations dominate: doubling the batch almost doubles both (per-channel stats do not)
    for net in ("resnet50", "deeplab_head", "deeplabv3_resnet50"):
        for k in range(3):
            assert 1.9 <= by[(net, 2)][k] / by[(net, 1)][k] <= 2.0, net
    # the fused residual removes bn3's saved input and the add's saved output per bottleneck
    # (issue 12's targets: >= 35% for ResNet-50, >= 30% for DeepLabV3-ResNet50); the head has
    # no residual, so fusing changes nothing there
    for r in rows:
        want = {"resnet50": 0.35, "deeplabv3_resnet50": 0.30}.get(r["net"])
        if want:
            assert float(r["saving_fused"]) >= want and int(r["iabn_fused_bytes"]) < int(
                r["iabn_bytes"]), r
        else:
            assert r["iabn_fused_bytes"] == r["iabn_bytes"], r
    md = (results / "summary.md").read_text()
    assert "resnet50: saved bytes, InPlaceABN + fused residual vs BN + LeakyReLU" in md
    # every head BN has an activation: standard keeps BN input + activation output, InPlaceABN
    # one buffer; the convs' saved inputs are common to both, so the saving is well above 25%.
    assert float(next(r for r in rows if r["net"] == "deeplab_head")["saving"]) > 0.25


def test_compile_times(results):
    rows = _csv(results / "compile.csv")
    assert {r["module"] for r in rows} == {"stats.cu", "forward.cu", "backward.cu"}
    assert all(r["kind"].startswith("cold") and float(r["seconds"]) > 0 for r in rows)


# ------------------------------------------------------------------------------------------
# GPU code paths, exercised on the CPU (wall clock; nothing here is a reported figure)
# ------------------------------------------------------------------------------------------
def _cpu_speed_rows(impls):
    from benchmarks import cases, speed

    settings = cases.Settings(tiny=True, compile=False)
    case = cases.BNCase("resnet50", 2, 8, 6, 6, "float32", "channels_last")
    return speed.case_rows(case, impls, "cpu", speed.WallTimer(), settings,
                           dict(forward=3, backward=7, full=10), copy_gbps=1.0)


def test_speed_rows_on_cpu(tmp_path):
    from benchmarks import report, speed

    rows = _cpu_speed_rows(speed.implementations(with_compile=False))
    assert [r["mode"] for r in rows] == list(speed.MODES)
    for r in rows:
        assert r["status"] == "ok", r
        for name in ("iabn", "eager", "checkpoint"):
            assert r[f"{name}_check_err"] < speed.TOL["float32"] and r[f"{name}_ms"] > 0
        assert r["speedup_vs_eager"] > 0 and r["bw_fraction"] > 0
    report.plot_speed(rows, tmp_path / "s.png", "cpu-test")
    assert (tmp_path / "s.png").read_bytes()[:8] == PNG_MAGIC
    assert any("full step vs eager" in line for line in report.speed_section(rows, 1.0))


def test_wrong_kernel_is_never_timed():
    from benchmarks import speed

    impls = speed.implementations(with_compile=False)
    impls["iabn"] = lambda x, w, b, rm, rv: speed.eager_bn_act(x, w, b, rm, rv) * 1.01
    for r in _cpu_speed_rows(impls):
        assert r["status"].startswith("iabn failed the correctness check")
        assert "iabn_ms" not in r and "speedup_vs_eager" not in r


def test_an_implementation_writing_an_input_is_named_and_cannot_fail_the_others():
    """check() restores inputs an implementation changed and says which; the next one is
    judged on the original inputs."""
    import torch

    from benchmarks import cases, speed

    def scribbler(x, w, b, rm, rv):
        inp["dy"].mul_(2)  # writes a shared input, as a kernel writing dy in place would
        return speed.eager_bn_act(x, w, b, rm, rv)

    case = cases.BNCase("test", 4, 3, 5, 5)
    inp = cases.bn_inputs(case, torch.device("cpu"), 0)
    details = {}
    errs = speed.check({"iabn": scribbler, "eager": speed.eager_bn_act}, case, inp, details)
    assert "changed inputs: dy" in details["iabn"] and "changed" not in details["eager"]
    assert speed.passed(errs["eager"], "float32"), details
    assert details["eager"].startswith("y ") and " dx " in details["eager"]


def test_a_failing_eager_baseline_is_rechecked_without_cudnn():
    """When torch eager disagrees with the float64 reference, check() reruns the real eager
    function with cuDNN disabled and reports it (the H200 runs saw eager dx off by 0.18 and
    0.37 on two shapes; this says on the next run whether cuDNN's kernel is the cause)."""
    import torch

    from benchmarks import cases, speed

    def off_by_a_bit(x, w, b, rm, rv):  # a stand-in for a baseline whose dx is wrong
        return speed.eager_bn_act(x, w * 1.01, b, rm, rv)

    case = cases.BNCase("test", 4, 3, 5, 5)
    inp = cases.bn_inputs(case, torch.device("cpu"), 0)
    details = {}
    errs = speed.check({"iabn": speed.iabn_bn_act, "eager": off_by_a_bit}, case, inp, details)
    assert not speed.passed(errs["eager"], "float32")
    assert speed.passed(errs["eager_nocudnn"], "float32"), details
    assert details["eager_nocudnn"].startswith("diagnostic, eager with cuDNN disabled")
    good = {}
    speed.check({"iabn": speed.iabn_bn_act, "eager": speed.eager_bn_act}, case, inp, good)
    assert "eager_nocudnn" not in good


def test_max_batch_search(monkeypatch):
    """Doubling then bisection against a budget, on a stand-in for the GPU measurement."""
    from benchmarks import cases, memory

    gib = 2 ** 30
    monkeypatch.setattr(memory, "_measure",
                        lambda setup, kind, n, device: (n * gib * (0.6 if kind == "iabn" else 1),
                                                        0))
    rows = memory.max_batch_rows(cases.Settings(memory_budget_gib=20.0))
    got = {(r["net"], r["kind"]): r["max_batch"] for r in rows}
    assert got[("resnet50", "standard")] == 20 and got[("resnet50", "iabn")] == 33


def test_passes_from_traffic(results):
    from benchmarks.__main__ import passes_from_traffic

    rows = [dict(r, tensor_loads=int(r["tensor_loads"]), tensor_stores=int(r["tensor_stores"]))
            for r in _csv(results / "traffic.csv")]
    assert passes_from_traffic(rows) == dict(forward=3, backward=7, full=10)


def test_device_slug():
    from benchmarks.cases import device_slug

    assert device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def test_gpu_summary_renders(tmp_path, monkeypatch):
    """write_outputs with every part present: speed rows measured on the CPU here and memory
    rows from a stand-in measurement, so a GPU run cannot die formatting its results."""
    from benchmarks import cases, memory, speed
    from benchmarks.__main__ import Run
    from benchmarks.summary import write_outputs

    gib = 2 ** 30
    monkeypatch.setattr(memory, "_measure",
                        lambda setup, kind, n, device: (n * gib * (0.6 if kind == "iabn" else 1),
                                                        gib))
    settings = cases.Settings(tiny=True)
    run = Run()
    run.attempt("speed", lambda: (_cpu_speed_rows(speed.implementations(False)), 1.0))
    run.attempt("memory", lambda: (memory.peak_memory_rows(settings),
                                   memory.max_batch_rows(settings)))
    assert run.status == {"speed": "ran", "memory": "ran"}
    write_outputs(tmp_path, run, settings, dict(device="stand-in"), True, [])
    md = (tmp_path / "summary.md").read_text()
    assert "largest peak-memory saving of a training step (GPU) | 40.0%" in md
    assert "full step vs eager BN+LeakyReLU, geomean over shapes" in md
    for name in ("speed_ratio.png", "memory_vs_batch.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC
    assert len(_csv(tmp_path / "max_batch.csv")) == len(settings.net_setups("cuda")) * len(
        memory.KINDS)

"""The GPU suite's ncu step without a GPU: reading ncu's text (a report in its format), the
step's verdict with a stand-in ncu (a report, the counters refused, nothing profiled, no
tool), and the copy kernel the others are judged against compiling with NVRTC."""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

from benchmarks.gpu_suite_runner import FAILED, PASSED, SKIPPED, Context

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


@pytest.fixture
def ctx(tmp_path):
    return Context(ROOT, tmp_path / "results", dict(os.environ), dry_run=False, python=PY)


NCU_REPORT = """==PROF== Connected to process 4242 (/usr/bin/python3)
==PROF== Profiling "forward_stats": 0%....50%....100% - 40 passes
[4242] python3@127.0.0.1
  void forward_stats<float, 4>(const float *, float *, int) (2048, 1, 1)x(256, 1, 1), Context 1, Stream 7, Device 0, CC 9.0
    Section: Command line profiler metrics
    ---------------------------- ----------- ------------
    Metric Name                  Metric Unit Metric Value
    ---------------------------- ----------- ------------
    dram__bytes.sum.per_second   byte/second 2,400,000,000,000
    gpu__time_duration.sum       nsecond     171,000
    ---------------------------- ----------- ------------
    Section: Occupancy
    Achieved Occupancy                     %        81.50
  void backward_apply<float, 1>(const float *, float *) (1024, 1, 1)x(128, 1, 1), Context 1, Stream 7, Device 0, CC 9.0
    Section: Command line profiler metrics
    dram__bytes.sum.per_second   Tbyte/second 1.5
    gpu__time_duration.sum       usecond     400.5
  ncu_copy_reference (1056, 1, 1)x(256, 1, 1), Context 1, Stream 7, Device 0, CC 9.0
    Section: Command line profiler metrics
    dram__bytes.sum.per_second   byte/second 3,000,000,000,000
    gpu__time_duration.sum       nsecond     274,000
"""


def test_ncu_summary_reads_each_kernel_against_the_copy():
    from benchmarks import gpu_suite_ncu as ncu

    kernels = ncu.parse(NCU_REPORT)
    assert [k["name"].split("(")[0] for k in kernels] == [
        "void forward_stats<float, 4>", "void backward_apply<float, 1>", "ncu_copy_reference"]
    assert kernels[0]["grid"] == (2048, 1, 1) and kernels[1]["block"] == (128, 1, 1)
    assert kernels[1]["metrics"]["dram__bytes.sum.per_second"] == pytest.approx(1.5e12)
    assert kernels[1]["metrics"]["gpu__time_duration.sum"] == pytest.approx(400.5e-6)
    lines, counts = ncu.summarize(NCU_REPORT)
    assert counts == dict(kernels=3, worst_of_copy=0.5, best_of_copy=0.8)
    row = next(line for line in lines if "forward_stats" in line)
    assert row.split()[:4] == ["171.0", "2400", "0.80", "81.5"]


FAKE_NCU = """#!{python}
import sys
args = sys.argv[1:]
assert args[args.index("--profile-from-start") + 1] == "off"
assert args[-2:] == ["benchmarks.gpu_suite_ncu", "--target"], args
print(open({report!r}).read())
"""


@pytest.mark.parametrize("report,status", [("ok", PASSED), ("perm", SKIPPED),
                                           ("empty", FAILED)])
def test_ncu_step_reads_the_tool(ctx, tmp_path, report, status):
    """The GPU branch of the ncu step with a stand-in ncu: a report, the counters refused
    (a machine limit: skipped, with the reason), nothing profiled."""
    from benchmarks import gpu_suite_ncu as ncu

    text = {"ok": NCU_REPORT, "perm": "==ERROR== ERR_NVGPUCTRPERM - The user does not have "
            "permission to access NVIDIA GPU Performance Counters", "empty": "==PROF== done"}
    (tmp_path / "report.txt").write_text(text[report])
    tool = tmp_path / "ncu"
    tool.write_text(FAKE_NCU.format(python=PY, report=str(tmp_path / "report.txt")))
    tool.chmod(0o755)
    ctx.gpu, ctx.facts = True, {"tools": {"ncu": str(tool)}}
    out = ncu.step(ctx, 60.0)
    assert out.status == status, out
    log = (ctx.logs / "ncu.log").read_text()
    assert "--profile-from-start off" in log and "benchmarks.gpu_suite_ncu --target" in log
    assert (ctx.results / "ncu_summary.txt").is_file()
    if report == "ok":
        assert out.counts["kernels"] == 3 and "0.80" in (ctx.results / "ncu_summary.txt"
                                                         ).read_text()
    ctx.facts = {"tools": {"ncu": None}}
    assert ncu.step(ctx, 60.0).status == SKIPPED


def test_ncu_reference_copy_compiles():
    """The copy kernel the forward and backward kernels are judged against compiles with
    NVRTC (no GPU needed) into 16-byte loads and stores."""
    pytest.importorskip("cupy")
    from cupy.cuda import nvrtc

    from benchmarks import gpu_suite_ncu as ncu

    prog = nvrtc.createProgram(ncu.COPY_SOURCE, "ncu_copy.cu", [], [])
    try:
        nvrtc.compileProgram(prog, ["--gpu-architecture=compute_90"])
        ptx = nvrtc.getPTX(prog)
        ptx = ptx.decode() if isinstance(ptx, bytes) else ptx
    finally:
        nvrtc.destroyProgram(prog)
    assert f".entry {ncu.REFERENCE}(" in ptx
    assert re.search(r"ld\.global\.nc\.v4\.(f32|u32|b32)", ptx) and re.search(
        r"st\.global\.v4\.(f32|u32|b32)", ptx)


def test_without_a_gpu_the_target_runs_on_the_cpu(ctx):
    """The dry run's stand-in: the same target, tiny shapes, no profiler window to open."""
    from benchmarks import gpu_suite_ncu as ncu

    ctx.gpu = False
    out = ncu.step(ctx, 120.0)
    assert out.status == PASSED and out.ran_as == "CPU stand-in: target without ncu", out
    log = (ctx.logs / "ncu-target.log").read_text()
    labels = [c.label for c in ncu.largest_cases(tiny=True)]
    assert [line.split()[2:] for line in log.splitlines() if line.startswith("[ncu target]")
            ] == [[label, mode] for label in labels for mode in ("forward", "backward")]
    assert [c.label for c in ncu.largest_cases(tiny=False)] == [
        "128x64x112x112-float32-nchw", "128x256x56x56-float32-nchw"]

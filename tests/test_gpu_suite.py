"""The GPU suite without a GPU: budget rule, timeouts, failures that do not stop the others,
the verdict's counts, packing within the limits of what comes back, the import shim, the
sanitizer driver's coverage, and the gpu marker on every test that needs CUDA. Fake steps are
tiny commands; no timing is asserted beyond "killed long before it would have ended"."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from benchmarks import gpu_suite_pack as pack
from benchmarks.gpu_suite_runner import (FAILED, OUT_OF_TIME, PASSED, SKIPPED, Context,
                                         Interrupted, Outcome, Record, Step, Suite, allotment,
                                         from_command, verdict_markdown)

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


@pytest.fixture
def ctx(tmp_path):
    return Context(ROOT, tmp_path / "results", dict(os.environ), dry_run=True, python=PY)


def command_step(name, code, min_s=0.5, max_s=30.0):
    """A step running `python -c code`: exit 0 passes, anything else fails."""
    def body(ctx, allot):
        done = ctx.run([PY, "-c", code], f"{name}.log", allot)
        return from_command(done, lambda d: Outcome(PASSED if d.rc == 0 else FAILED,
                                                    f"exit {d.rc}"))
    return Step(name, f"fake {name}", min_s, max_s, body)


def test_allotment_keeps_the_later_steps_minimum():
    steps = [Step(n, n, mn, mx, None) for n, mn, mx in
             (("a", 1, 100), ("b", 5, 3), ("c", 10, None))]
    assert allotment(steps, 0, 50) == 50 - 15  # capped by what b and c need at least
    assert allotment(steps, 1, 50) == 3  # its own cap
    assert allotment(steps, 2, 50) == 50  # the last takes what is left
    assert allotment(steps, 0, 20) == 5
    assert allotment(steps, 0, 12) == 1  # its own minimum before the later steps' minimums
    assert allotment(steps, 1, 4) == 4 < steps[1].min_s  # below its minimum: not started


@pytest.mark.parametrize("budget", [30, 60, 480, 1200])
def test_suite_plan_caps_never_fall_below_minimums(budget):
    from benchmarks.gpu_suite import STEP_NAMES, plan

    steps = plan(budget)
    assert [s.name for s in steps] == list(STEP_NAMES)
    assert [(s.name, s.optional) for s in steps if s.max_s is None] == [("bench", False),
                                                                        ("ncu", True)]
    capped = steps[:-2]
    assert all(s.max_s >= s.min_s for s in capped)
    if budget == 480:  # the documented shares
        assert [round(s.max_s) for s in capped] == [58, 120, 72, 120]
    assert [s.name for s in plan(budget, ["bench"])] == ["env", "bench"]


def test_an_optional_step_takes_no_time_from_the_steps_before_it():
    steps = [Step("a", "a", 10, None, None), Step("b", "b", 20, None, None),
             Step("opt", "opt", 60, None, None, optional=True)]
    assert allotment(steps, 0, 100) == 80  # b's minimum is kept, the optional one's is not
    assert allotment(steps, 1, 90) == 90
    assert allotment(steps, 2, 30) == 30 < steps[2].min_s  # what is left: not started


def test_a_step_that_would_not_fit_is_skipped_not_started(ctx):
    started = []

    def body(ctx, allot):
        started.append(allot)
        return Outcome(PASSED)

    steps = [command_step("quick", "pass", min_s=5), Step("big", "needs a lot", 100, None, body),
             Step("small", "fits", 1, None, body)]
    records = Suite(steps, ctx, budget=20, reserve_s=1).run()
    assert [r.status for r in records] == [PASSED, SKIPPED, PASSED]
    assert re.search(r"needs at least 100 s, \d+ s left of the 20 s budget", records[1].detail)
    assert len(started) == 1  # only "small": "big" was never begun


def test_a_failing_step_does_not_stop_the_others(ctx):
    def broken(ctx, allot):
        raise RuntimeError("bug in a step body")

    steps = [command_step("fails", "import sys; sys.exit(3)"),
             Step("broken", "raises", 0.5, 10, broken), command_step("after", "pass")]
    seen = []
    records = Suite(steps, ctx, budget=60, reserve_s=1,
                    on_record=lambda rs: seen.append(len(rs))).run()
    assert [r.status for r in records] == [FAILED, FAILED, PASSED]
    assert records[0].detail == "exit 3"
    assert "RuntimeError: bug in a step body" in records[1].detail
    assert "bug in a step body" in (ctx.logs / "broken-traceback.log").read_text()
    assert seen == [1, 2, 3]  # the verdict is written after every step


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")  # a zombie waiting for init is dead too


def test_the_step_timeout_kills_a_hanging_step_and_its_children(ctx, tmp_path):
    pidfile = tmp_path / "child.pid"
    hang = (f"import subprocess, time; p = subprocess.Popen(['sleep', '120']); "
            f"open({str(pidfile)!r}, 'w').write(str(p.pid)); time.sleep(120)")
    steps = [command_step("hangs", hang, max_s=6.0), command_step("after", "pass")]
    t0 = time.monotonic()
    records = Suite(steps, ctx, budget=60, reserve_s=1).run()
    assert time.monotonic() - t0 < 60  # far less than the 120 s the command wanted
    assert [r.status for r in records] == [OUT_OF_TIME, PASSED]
    assert "killed at the step's limit" in records[0].detail
    assert _gone(int(pidfile.read_text()))  # the grandchild went with its process group
    assert "[suite] killed after" in (ctx.logs / "hangs.log").read_text()


def test_an_interrupt_records_the_step_and_skips_the_rest(ctx):
    def interrupted(ctx, allot):
        raise Interrupted("signal 15")

    steps = [command_step("first", "pass"), Step("cut", "cut", 0.5, 10, interrupted),
             command_step("never", "pass")]
    records = Suite(steps, ctx, budget=60, reserve_s=1).run()
    assert [r.status for r in records] == [PASSED, OUT_OF_TIME, SKIPPED]
    assert records[2].detail == "not started: signal 15"


def test_heartbeat_republishes_while_a_step_runs(ctx):
    beats = []
    ctx.heartbeat, ctx.heartbeat_s = (lambda: beats.append(1)), 0.2
    done = ctx.run([PY, "-c", "import time; time.sleep(1.5)"], "slow.log", 30)
    assert done.rc == 0 and not done.timed_out and len(beats) >= 2


def test_verdict_table_counts():
    planned = [Step(f"s{i}", f"step {i}", 1, None, None) for i in range(6)]
    statuses = [PASSED, PASSED, FAILED, SKIPPED, OUT_OF_TIME]
    records = [Record(i + 1, f"s{i}", f"step {i}", st, "a | b", {"passed": 3}, "GPU", 1.0, 2.0)
               for i, st in enumerate(statuses)]
    md = verdict_markdown(records, dict(device="Test GPU", mode="GPU run"), planned)
    assert md.startswith("# GPU suite verdict: Test GPU")
    assert "Totals: 2 passed, 1 failed, 1 skipped, 1 out of time (of 6 steps)" in md
    rows = [line for line in md.splitlines() if re.match(r"^\| \d ", line)]
    assert len(rows) == 6 and "not reached yet" in rows[5]
    assert "**failed**" in rows[2] and "a \\| b" in rows[2]  # a pipe cannot break the table
    md = verdict_markdown(records, dict(device="Test GPU"), planned, running=6)
    assert "| 6 | step 5 | running (the suite was cut here) |" in md


# ------------------------------------------------------------------------------------------
# packing
# ------------------------------------------------------------------------------------------
def _results(tmp_path) -> Path:
    res = tmp_path / "work" / "results"
    (res / "logs" / "a" / "b" / "c").mkdir(parents=True)
    (res / "summary.md").write_text("# summary\n")
    (res / "verdict.md").write_text("# verdict\n")
    (res / "logs" / "huge.log").write_bytes(os.urandom(3 * 2 ** 20))  # incompressible
    (res / "plot.png").write_bytes(os.urandom(2 * 2 ** 20))
    (res / "logs" / "a" / "b" / "c" / "deep.txt").write_text("deep\n")
    (res / "logs" / "odd name!.log").write_text("odd\n")
    return res


def test_packing_respects_the_limits(tmp_path):
    res = _results(tmp_path)
    out = tmp_path / "out"
    log = tmp_path / "suite log?.txt"
    log.write_text("log\n" * 10)
    limit = 2 ** 20
    notes = pack.pack(res, out, "NVIDIA H100 (test)", [res / "verdict.md", log,
                                                        res / "summary.md"],
                      max_files=3, max_bytes=limit)
    assert pack.check_out(out, max_files=3, max_bytes=limit) == []
    assert sorted(p.name for p in out.iterdir()) == ["results.tar.gz", "suite_log_.txt",
                                                     "verdict.md"]
    assert any("left summary.md out" in n for n in notes)
    with tarfile.open(out / "results.tar.gz") as tf:
        names = tf.getnames()
        top = "NVIDIA_H100__test_"
        assert {n.split("/")[0] for n in names} == {top}
        assert f"{top}/logs/a/b/c/deep.txt" in names and f"{top}/logs/odd name!.log" in names
        assert f"{top}/plot.png" not in names  # binary and too big: left out, not cut
        huge = tf.extractfile(f"{top}/logs/huge.log").read()
        assert len(huge) < limit and b"bytes cut by the GPU suite's packer" in huge
        packing = tf.extractfile(f"{top}/PACKING.txt").read().decode()
    assert "left out plot.png" in packing and "cut logs/huge.log" in packing


def test_check_out_reports_every_kind_of_violation(tmp_path):
    out = tmp_path / "out"
    (out / "a" / "b" / "c").mkdir(parents=True)
    for i in range(8):
        (out / f"f{i}.txt").write_text("x")
    (out / "bad name.txt").write_text("x")
    (out / "a" / "b" / "c" / "deep.txt").write_text("x")
    (out / "big.bin").write_bytes(b"x" * 2048)
    problems = pack.check_out(out, max_bytes=1024)
    assert any(p.startswith("11 files") for p in problems)
    assert any(p.startswith("bad name") for p in problems)
    assert any("deeper than 2" in p for p in problems)
    assert any(p.startswith("big.bin") for p in problems)


def test_unpack_round_trip_and_refusals(tmp_path):
    res = _results(tmp_path)
    (res / "plot.png").unlink()
    out = tmp_path / "out"
    pack.pack(res, out, "nvidia-h100-80gb-hbm3")
    dest = tmp_path / "repo" / "benchmarks" / "results"
    where = pack.unpack(out / "results.tar.gz", dest)
    assert where == dest / "nvidia-h100-80gb-hbm3"
    assert (where / "summary.md").read_text() == "# summary\n"
    assert (where / "logs" / "huge.log").stat().st_size == 3 * 2 ** 20
    bad = tmp_path / "bad.tar.gz"
    with tarfile.open(bad, "w:gz") as tf:
        for name in ("dev/ok.txt", "other/x.txt"):
            tf.add(res / "summary.md", arcname=name)
    with pytest.raises(ValueError, match="one top folder"):
        pack.unpack(bad, dest)


# ------------------------------------------------------------------------------------------
# running from the tree, without an installed iabn
# ------------------------------------------------------------------------------------------
def _lacks_iabn(python: str) -> bool:
    return subprocess.run([python, "-c", "import iabn"], cwd="/", capture_output=True,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
                          ).returncode != 0


def _python_without_iabn(tmp_path: Path) -> str:
    """A Python that imports this environment's packages (torch, numpy, ...) but not iabn,
    like the GPU machine's, which gets a copied tree and nothing installed from it.

    Built from this environment, never from an interpreter outside it (the base Python of a
    fresh venv has no torch): a venv without pip whose one extra path entry is a folder of
    links to this environment's site-packages entries, iabn's own left out. A folder named in
    a .pth file joins sys.path without its .pth files being run, so an editable install's
    import hook does not come along either."""
    import site
    import venv

    home = tmp_path / "venv-without-iabn"
    try:
        venv.EnvBuilder(with_pip=False, symlinks=os.name != "nt").create(home)
    except Exception as exc:  # e.g. a Python built without the venv module's support files
        pytest.skip(f"cannot make a venv here to stand for an interpreter without iabn: "
                    f"{type(exc).__name__}: {exc}")
    python = str(home / ("Scripts/python.exe" if os.name == "nt" else "bin/python"))
    packages = tmp_path / "site-packages-without-iabn"
    packages.mkdir()
    for folder in site.getsitepackages():
        if not os.path.isdir(folder):
            continue
        for entry in Path(folder).iterdir():
            if (entry.suffix == ".pth" or entry.name.startswith("iabn")
                    or (entry.name.startswith("__editable__") and "iabn" in entry.name)
                    or (packages / entry.name).exists()):
                continue
            (packages / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    purelib = subprocess.run([python, "-c", "import sysconfig; "
                              "print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "outer-packages.pth").write_text(f"{packages}\n")
    assert _lacks_iabn(python), f"{python} still imports an iabn"
    return python


def test_shim_makes_the_tree_importable(tmp_path):
    from benchmarks.gpu_suite_env import importable_env

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env, how = importable_env(ROOT, env, tmp_path, force_shim=True)
    assert how == f"shim {tmp_path / 'shim'}"
    code = ("import os, iabn, iabn.torch, iabn_core, iabn_kernels, benchmarks; "
            "from iabn_core.source import kernel_dir; "
            "print(os.path.realpath(iabn.__file__)); print(kernel_dir())")
    python = _python_without_iabn(tmp_path)
    got = subprocess.run([python, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                         text=True)
    assert got.returncode == 0, got.stderr[-2000:]
    iabn_file, kernels = got.stdout.split()
    assert iabn_file == str(ROOT / "adapters" / "__init__.py")
    assert Path(kernels).resolve() == (ROOT / "kernels").resolve()


def test_dry_run_from_an_interpreter_without_iabn(tmp_path):
    """The suite as the GPU machine runs it (a copied tree, nothing installed): environment
    and sanitizer steps of a dry run, from an interpreter that has this environment's packages
    but not iabn."""
    python = _python_without_iabn(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "OUT")}
    out = tmp_path / "out"
    proc = subprocess.run([python, "-m", "benchmarks.gpu_suite", "--dry-run", "--steps",
                           "env,sanitizer", "--out", str(out), "--work", str(tmp_path / "w")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    suite = json.loads((tmp_path / "w" / "results" / "suite.json").read_text())
    assert suite["header"]["iabn_import"].startswith("shim ")
    assert [s["status"] for s in suite["steps"]] == [PASSED, PASSED]
    assert re.search(r"driver clean: (\d+)/\1 kernels", suite["steps"][1]["detail"])
    assert pack.check_out(out) == []
    assert (out / "verdict.md").read_text().startswith("# GPU suite verdict")


# ------------------------------------------------------------------------------------------
# the sanitizer driver and the gpu marker
# ------------------------------------------------------------------------------------------
def test_driver_launches_every_kernel_on_the_emulator(tmp_path):
    from benchmarks import sanitizer_driver as drv

    rc = drv.main(["--backend", "emulator", "--json", str(tmp_path / "d.json")])
    rep = json.loads((tmp_path / "d.json").read_text())
    assert rc == 0 and rep["problems"] == [] and rep["missing"] == []
    assert rep["kernels_launched"] == rep["kernels_expected"] == len(drv.expected_kernels())


def test_driver_reports_kernels_it_never_reaches(tmp_path, monkeypatch):
    from benchmarks import sanitizer_driver as drv

    monkeypatch.setattr(drv, "SCENARIOS", drv.SCENARIOS[:1])  # identity only
    monkeypatch.setattr(drv, "PAIRS", drv.PAIRS[:1])
    assert drv.main(["--backend", "emulator", "--json", str(tmp_path / "d.json")]) == 2
    missing = json.loads((tmp_path / "d.json").read_text())["missing"]
    assert any("LeakyRelu" in m for m in missing) and any("__half" in m for m in missing)


def test_driver_catches_a_planted_wrong_kernel(tmp_path):
    import shutil

    from iabn_core.source import kernel_dir

    planted = tmp_path / "kernels"
    shutil.copytree(kernel_dir(), planted)
    src = (planted / "backward.cu").read_text()
    bug = "k.mean_dy = (partials ? s.dy : load(sums + c)) * inv_m;"  # as in tests/test_check.py
    assert bug in src
    (planted / "backward.cu").write_text(
        src.replace(bug, "k.mean_dy = (partials ? s.dy : load(sums + c));"))
    proc = subprocess.run([PY, "-m", "benchmarks.sanitizer_driver", "--backend", "emulator",
                           "--json", str(tmp_path / "d.json")], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=dict(os.environ,
                                                           IABN_KERNEL_DIR=str(planted)))
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    problems = json.loads((tmp_path / "d.json").read_text())["problems"]
    assert problems and all("dx" in p and " train" in p for p in problems)


COLLECTOR = """
import json, os, sys, pytest
sys.path.insert(0, os.getcwd())  # as `python -m pytest` does: the tests import benchmarks
class Collector:
    rows = []
    def pytest_collection_modifyitems(self, items):
        for it in items:
            self.rows.append(dict(id=it.nodeid, gpu=it.get_closest_marker("gpu") is not None,
                                  reasons=[str(m.kwargs.get("reason", m.args[1:] or ""))
                                           for m in it.iter_markers("skipif")]))
rc = pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", "tests"],
                 plugins=[Collector()])
json.dump(Collector.rows, open(sys.argv[1], "w"))
sys.exit(rc)
"""


def test_every_cuda_test_carries_the_gpu_marker(tmp_path):
    """`pytest -m gpu` is what the GPU machine runs: a test that is parametrized on "cuda" or
    skipped for want of a GPU, CUDA or NCCL must carry the gpu marker, or it would never run
    anywhere."""
    script = tmp_path / "collect.py"
    script.write_text(COLLECTOR)
    proc = subprocess.run([PY, str(script), str(tmp_path / "items.json")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    rows = json.loads((tmp_path / "items.json").read_text())
    assert sum(r["gpu"] for r in rows) > 100 and len(rows) > 1000
    bad = []
    for r in rows:
        params = r["id"].partition("[")[2].rstrip("]")
        needs = "cuda" in params.split("-") or any(
            re.search(r"cuda|gpu|nccl", why, re.I) for why in r["reasons"])
        if needs and not r["gpu"]:
            bad.append(r["id"])
    assert bad == []


FAKE_SANITIZER = """#!{python}
import json, sys, time
args = sys.argv[1:]
tool = args[args.index("--tool") + 1]
report = args[args.index("--json") + 1]
json.dump(dict(steps=180, kernels_expected=240, kernels_launched=240, missing=[],
               problems=[], finished=tool != "synccheck"), open(report, "w"))
if tool == "racecheck":
    print("========= RACECHECK SUMMARY: 2 hazards displayed (2 errors, 0 warnings)")
    sys.exit(int(args[args.index("--error-exitcode") + 1]))
if tool == "synccheck":
    time.sleep(120)
print("========= ERROR SUMMARY: 0 errors")
"""


def test_sanitizer_step_reads_each_tool(ctx, tmp_path):
    """The GPU branch of step 4 with a stand-in compute-sanitizer: one clean tool, one that
    finds hazards, one that hangs; all four run at once and each is reported."""
    from benchmarks import gpu_suite

    tool = tmp_path / "compute-sanitizer"
    tool.write_text(FAKE_SANITIZER.format(python=PY))
    tool.chmod(0o755)
    ctx.gpu, ctx.facts = True, {"tools": {"compute-sanitizer": str(tool)}}
    t0 = time.monotonic()
    out = gpu_suite.sanitizer_step(ctx, 4.0)
    assert time.monotonic() - t0 < 60
    assert out.status == FAILED  # a finding outranks the hang
    assert out.counts == {"memcheck": "0 errors",
                          "racecheck": "2 hazards displayed (2 errors, 0 warnings)",
                          "synccheck": "out of time", "initcheck": "0 errors"}
    assert "racecheck: 2 hazards displayed (2 errors, 0 warnings), 240/240 kernels" in out.detail
    assert "synccheck: out of time, 240/240 kernels, 180 steps (cut short)" in out.detail
    log = (ctx.logs / "sanitizer-memcheck.log").read_text()
    assert "--tool memcheck" in log and "benchmarks.sanitizer_driver --backend cuda" in log


def test_junit_counts(tmp_path):
    from benchmarks.gpu_suite import _junit

    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite tests="5" failures="1" errors="1" skipped="1">'
                   '<testcase classname="tests.test_a" name="test_ok"/>'
                   '<testcase classname="tests.test_a" name="test_bad"><failure/></testcase>'
                   '<testcase classname="tests.test_b" name="test_err"><error/></testcase>'
                   '</testsuite></testsuites>')
    counts, failing = _junit(xml)
    assert counts == dict(passed=2, failed=2, skipped=1)
    assert failing == ["tests.test_a::test_bad", "tests.test_b::test_err"]


def test_bench_step_runs_the_parts_asked_for(ctx, monkeypatch):
    """--parts narrows the bench step (a confirming rerun on a short GPU lease)."""
    from benchmarks import gpu_suite

    seen = []

    def run(argv, log_name, timeout):
        seen.append(argv)
        raise RuntimeError("stop here")

    monkeypatch.setattr(ctx, "run", run)
    ctx.bench_parts = ["compile", "speed", "overhead"]
    with pytest.raises(RuntimeError):
        gpu_suite.bench_step(ctx, 100.0)
    argv = seen[0]
    assert argv[argv.index("--parts") + 1] == "overhead,speed,compile"  # the suite's order
    assert gpu_suite.parse(["--parts", "speed"]).parts == ["speed"]


def test_bench_parts_run_by_importance():
    """Host time, the eager whole step, per-layer speed and memory come before any compiled
    figure, the compiled step before the compiled layers, NVRTC times and the kernel
    profile last: a run cut at its budget has the most important figures."""
    from benchmarks import gpu_suite
    from benchmarks.__main__ import COMPILED_PARTS, PARTS

    assert gpu_suite.BENCH_PARTS == ("overhead", "step", "speed", "memory", "step_compiled",
                                     "speed_compiled", "compile", "step_kernels")
    assert set(gpu_suite.BENCH_PARTS) <= set(PARTS) and set(COMPILED_PARTS) <= set(PARTS)

"""The correctness runner passes on the real kernels and fails on a planted wrong kernel."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from iabn_core.source import kernel_dir


def run_check(tmp_path, env_extra=None):
    out = tmp_path / "check.json"
    env = dict(os.environ, **(env_extra or {}))
    proc = subprocess.run([sys.executable, "-m", "iabn.check", "--quick", "--backend", "emulator",
                           "--json", str(out)], capture_output=True, text=True, env=env,
                          timeout=600)
    return proc, json.loads(out.read_text())


def test_quick_check_passes_on_the_emulator(tmp_path):
    proc, data = run_check(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(data["cases"]) >= 70 and all(c["passed"] for c in data["cases"])
    for key in ("device", "nvrtc", "cupy", "torch", "emulator_cache", "kernels"):
        assert key in data["environment"]
    assert " passed, 0 failed" in proc.stdout


def test_planted_wrong_kernel_fails(tmp_path):
    planted = tmp_path / "kernels"
    shutil.copytree(kernel_dir(), planted)
    src = (planted / "backward.cu").read_text()
    bug = "k.mean_dy = (partials ? s.dy : load(sums + c)) * inv_m;"
    assert bug in src
    # forget the 1/m of the mean gradient term: dx is wrong in training only
    (planted / "backward.cu").write_text(
        src.replace(bug, "k.mean_dy = (partials ? s.dy : load(sums + c));"))
    proc, data = run_check(tmp_path, {"IABN_KERNEL_DIR": str(planted)})
    assert proc.returncode == 1
    failed = [c for c in data["cases"] if not c["passed"]]
    assert failed and all(c["stage"] == "backward dx" for c in failed)
    assert all("-train-" in c["case"] for c in failed)
    assert "FAIL" in proc.stdout

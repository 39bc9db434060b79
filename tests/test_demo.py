"""The demo and the correctness runner on a machine without a C++ compiler: one line saying why
the emulator cannot run and how to get it, never one error per case; the demo still exits 0
when training worked (it checks with the NumPy backend instead). Also the runner's table: its
columns say what they hold and its tolerances read as README states them."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def env_without_compiler(tmp_path) -> dict:
    """This environment with PATH holding no g++ (an empty folder) and an empty emulator cache,
    so nothing already built can stand in for the compiler."""
    empty = tmp_path / "bin"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("IABN_EMULATOR_CXX", "IABN_BACKEND")}
    env.update(PATH=str(empty), IABN_CACHE_DIR=str(tmp_path / "cache"))
    return env


def run_module(args, env, cwd, timeout=300):
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_demo_without_a_compiler_says_so_once_and_exits_0(tmp_path):
    env = env_without_compiler(tmp_path)
    proc = run_module(["iabn.demo", "--cpu", "--steps", "2", "--batch", "4", "--size", "8"], env,
                      tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert out.count("EmulatorError") == 0, out[-3000:]
    why = [line for line in out.splitlines() if "g++" in line]
    assert len(why) == 1 and "install g++" in why[0], why
    assert re.search(r"\n\d+ passed, 0 failed .* on backend numpy", out), out[-2000:]
    # the demo says what it showed
    assert "random" in out and "saved for backward" in out


def test_check_on_the_emulator_without_a_compiler_is_one_line(tmp_path):
    env = env_without_compiler(tmp_path)
    proc = run_module(["iabn.check", "--quick", "--backend", "emulator"], env, tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    why = [line for line in out.splitlines() if "g++" in line]
    assert "FAIL" not in out and "EmulatorError" not in out and len(why) == 1, out[-3000:]
    assert "install g++" in why[0] and "--backend numpy" in why[0]


def test_check_table_names_its_columns_and_readme_tolerances(capsys):
    from iabn import check
    from iabn_core import verify

    assert check.main(["--quick", "--backend", "numpy"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("case "))
    assert re.search(r"max abs err\s+max rel err\s+rel tol\s+result", header), header
    # a bfloat16 output is judged against bfloat16's tolerance, printed as README states it
    row = next(line for line in out.splitlines()
               if line.startswith("bfloat16_bfloat16-") and "forward z" in line)
    assert row.split()[-2] == "1.6e-2", row
    readme = (ROOT / "README.md").read_text()
    stated = re.search(r"Tolerances \(relative[^:]*\):\s*(.*?);", readme, re.S).group(1)
    assert " ".join(stated.split()) == verify.tolerance_text(), stated
    assert verify.tolerance_text() in " ".join(out.split())

"""The GPU suite's step runner: a time budget shared by steps, commands with hard timeouts,
and the verdict table.

Budget rule. With `left` = time left - reserve (for the last packing), step i gets
    allotment = min(max_s, max(left - sum(min_s of the later steps), min_s))
so a step may use up to its own cap but not the least time the later steps need, unless
that would leave it less than its own minimum: earlier steps matter more (the order is the
priority). An optional step's minimum is not kept back for it: it runs only on time the
steps before it left unused. A step with less than its min_s left is not started
("skipped", with the numbers): a step is never begun only to be killed half-way. A step
that overruns its allotment anyway (a hang) is killed with its whole process group and
recorded "out of time". Each step runs whatever happened before it; results are handed to
`on_record` after every step (and `Context.heartbeat` runs during long ones), so a kill of
the whole suite still leaves the verdict so far.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

PASSED, FAILED, SKIPPED, OUT_OF_TIME = "passed", "failed", "skipped", "out of time"
STATUSES = (PASSED, FAILED, SKIPPED, OUT_OF_TIME)


@dataclass
class Outcome:
    """What a step body reports. `counts` holds its own figures (tests passed, errors...)."""

    status: str
    detail: str = ""
    counts: dict = field(default_factory=dict)
    ran_as: str = "GPU"


@dataclass
class Record:
    number: int
    name: str
    title: str
    status: str
    detail: str
    counts: dict
    ran_as: str
    seconds: float
    allotted: float


@dataclass
class Step:
    name: str
    title: str
    min_s: float
    max_s: float | None  # None: whatever is left
    body: Callable[["Context", float], Outcome]
    optional: bool = False  # earlier steps keep no time back for it


@dataclass
class Finished:
    """One command's end: exit status (None when killed), whether the timeout killed it."""

    argv: list
    rc: int | None
    timed_out: bool
    seconds: float
    log: Path


class Interrupted(Exception):
    """The suite itself was told to stop (SIGTERM/SIGINT): finish the records and pack."""


class Context:
    """What step bodies share: folders, the environment of every child process, flags, and
    a way to run commands under a timeout with their output in a log file."""

    def __init__(self, root: Path, results: Path, env: dict, dry_run: bool, python: str):
        self.root, self.results, self.env = root, results, env
        self.logs = results / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.dry_run, self.python = dry_run, python
        self.gpu = not dry_run  # updated by the environment step
        self.facts: dict = {}  # what the environment step learned (device, tools, ...)
        self._live: list = []
        # called every heartbeat_s while commands run: republishes the logs so far, so a
        # kill of the whole suite mid-step still returns the step's output up to then
        self.heartbeat: Callable[[], None] = lambda: None
        self.heartbeat_s = 30.0

    def run(self, argv, log_name: str, timeout: float) -> Finished:
        return self.run_parallel([(argv, log_name)], timeout)[0]

    def run_parallel(self, jobs, timeout: float) -> list[Finished]:
        """Starts every (argv, log name) at once, each in its own process group, and waits
        for all until `timeout` seconds from now; what is still running then is killed."""
        started = []
        t0 = time.monotonic()
        for argv, log_name in jobs:
            log = self.logs / log_name
            f = open(log, "w", buffering=1)
            f.write(f"$ {' '.join(map(str, argv))}\n")
            proc = subprocess.Popen([str(a) for a in argv], cwd=self.root, env=self.env,
                                    stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
            self._live.append(proc)
            started.append((argv, proc, f, log))
        out = []
        try:
            for argv, proc, f, log in started:
                rc = timed_out = None
                while rc is None and not timed_out:
                    left = timeout - (time.monotonic() - t0)
                    try:
                        rc = proc.wait(timeout=max(0.0, min(left, self.heartbeat_s)))
                    except subprocess.TimeoutExpired:
                        if left <= self.heartbeat_s:
                            kill_group(proc)
                            timed_out = True
                            f.write(f"\n[suite] killed after {timeout:.0f} s (step time limit)\n")
                        else:
                            f.flush()
                            self.heartbeat()
                out.append(Finished(list(argv), rc, bool(timed_out), time.monotonic() - t0, log))
        finally:
            for _, proc, f, _ in started:
                if proc.poll() is None:  # interrupted while waiting: leave nothing behind
                    kill_group(proc)
                f.close()
                self._live.remove(proc)
        return out


def kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the child's own process group, SIGKILL if it lingers."""
    for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def allotment(steps: list[Step], i: int, left: float) -> float:
    """Seconds step i may use when `left` remain (below its min_s: it is not started)."""
    step = steps[i]
    if left < step.min_s:
        return left
    kept = sum(s.min_s for s in steps[i + 1:] if not s.optional)
    allot = max(left - kept, step.min_s)  # earlier steps come first: at least their minimum
    return allot if step.max_s is None else min(allot, step.max_s)


class Suite:
    def __init__(self, steps: list[Step], ctx: Context, budget: float, reserve_s: float = 10.0,
                 on_record: Callable[[list[Record]], None] = lambda records: None,
                 log: Callable[[str], None] = print):
        self.steps, self.ctx, self.budget, self.reserve = steps, ctx, budget, reserve_s
        self.on_record, self.log = on_record, log
        self.records: list[Record] = []

    def run(self) -> list[Record]:
        end = time.monotonic() + self.budget
        interrupted = None
        for i, step in enumerate(self.steps):
            left = end - time.monotonic() - self.reserve
            allot = allotment(self.steps, i, left)
            if interrupted:
                outcome, secs = Outcome(SKIPPED, f"not started: {interrupted}", ran_as="-"), 0.0
            elif allot < step.min_s:
                outcome = Outcome(SKIPPED, f"not started: needs at least {step.min_s:.0f} s, "
                                  f"{max(allot, 0):.0f} s left of the {self.budget:.0f} s "
                                  "budget", ran_as="-")
                secs = 0.0
            else:
                self.log(f"[suite] step {i + 1} {step.name}: up to {allot:.0f} s")
                t0 = time.monotonic()
                try:
                    outcome = step.body(self.ctx, allot)
                except Interrupted as exc:
                    interrupted = str(exc) or "suite interrupted"
                    outcome = Outcome(OUT_OF_TIME, f"interrupted: {interrupted}")
                except Exception as exc:  # a broken step body is that step's failure only
                    (self.ctx.logs / f"{step.name}-traceback.log").write_text(
                        traceback.format_exc())
                    outcome = Outcome(FAILED, f"suite error: {type(exc).__name__}: {exc}")
                secs = time.monotonic() - t0
            rec = Record(i + 1, step.name, step.title, outcome.status, outcome.detail,
                         outcome.counts, outcome.ran_as, secs, max(allot, 0.0))
            self.records.append(rec)
            self.log(f"[suite] step {rec.number} {step.name}: {rec.status} in {secs:.0f} s"
                     + (f" - {rec.detail}" if rec.detail else ""))
            self.on_record(self.records)
        return self.records


def from_command(done: Finished, ok: Callable[[Finished], Outcome]) -> Outcome:
    """The usual mapping: killed -> out of time, otherwise whatever `ok` makes of it."""
    if done.timed_out:
        return Outcome(OUT_OF_TIME, f"killed at the step's limit after {done.seconds:.0f} s; "
                       f"see logs/{done.log.name}")
    return ok(done)


# ------------------------------------------------------------------------------------------
# verdict
# ------------------------------------------------------------------------------------------
def totals(records: list[Record]) -> dict:
    return {s: sum(r.status == s for r in records) for s in STATUSES}


def _counts(c: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in c.items()) or "-"


def verdict_markdown(records: list[Record], header: dict, planned: list[Step],
                     running: int | None = None) -> str:
    """The verdict table: one row per planned step (step number `running` is in progress;
    steps not reached yet say so)."""
    lines = [f"# GPU suite verdict: {header.get('device', 'unknown device')}", ""]
    lines += [f"- {k}: {v}" for k, v in header.items() if k != "device"] + [""]
    lines += ["| # | step | status | ran as | counts | seconds (allotted) | detail |",
              "|---|---|---|---|---|---|---|"]
    done = {r.number: r for r in records}
    for i, step in enumerate(planned, 1):
        r = done.get(i)
        if r is None:
            state = "running (the suite was cut here)" if i == running else "not reached yet"
            lines.append(f"| {i} | {step.title} | {state} | - | - | - | - |")
            continue
        detail = r.detail.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {i} | {r.title} | **{r.status}** | {r.ran_as} | {_counts(r.counts)} | "
                     f"{r.seconds:.0f} ({r.allotted:.0f}) | {detail} |")
    t = totals(records)
    lines += ["", "Totals: " + ", ".join(f"{v} {k}" for k, v in t.items())
              + f" (of {len(planned)} steps)", ""]
    return "\n".join(lines)

"""The GPU suite's ncu step: Nsight Compute on iabn's forward and backward kernels.

    python -m benchmarks.gpu_suite_ncu --target [--tiny] [--device cpu]

`--target` is the process ncu runs: the training forward and the backward of one InPlace-ABN
layer on each of the two largest speed shapes (by bytes), then a copy of the same tensor by
a kernel of our own (`ncu_copy_reference`: 16-byte loads and stores, a grid-stride loop),
the ceiling a memory-bound kernel is judged against; torch's own copy of a contiguous
tensor is a cudaMemcpy, which ncu does not profile. Only those launches are
profiled: ncu starts with --profile-from-start off and the target opens the window
(cudaProfilerStart / Stop) around them, after a warm-up call that loads the kernels. On a
CPU the target runs the same calls without a profiler (the dry run's proof that it works).

`summarize` reads ncu's text back: per kernel its duration, DRAM bytes per second, that as
a fraction of the copy kernel's on the same shape, and achieved occupancy. Stall reasons
stay in the full text (WarpStateStats), which the suite keeps as logs/ncu.log.
"""
from __future__ import annotations

import argparse
import functools
import re
import sys

from .gpu_suite_runner import FAILED, OUT_OF_TIME, PASSED, SKIPPED, Context, Outcome, from_command

# What each profiled kernel reports: throughput against the hardware's peak, achieved
# bandwidth, occupancy, why warps stall, the launch's grid and registers.
SECTIONS = ("SpeedOfLight", "MemoryWorkloadAnalysis", "Occupancy", "WarpStateStats",
            "LaunchStats")
METRICS = ("dram__bytes.sum.per_second", "dram__bytes_read.sum", "dram__bytes_write.sum",
           "gpu__time_duration.sum")
LAUNCH_COUNT = 40  # a bound on ncu's time if the window catches more than it should
CASES = 2
REFERENCE = "ncu_copy_reference"
COPY_SOURCE = r"""
extern "C" __global__ void ncu_copy_reference(const float4* __restrict__ src,
                                              float4* __restrict__ dst, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        dst[i] = src[i];
}
"""


def command(tool: str) -> list[str]:
    argv = [tool, "--profile-from-start", "off", "--print-units", "base",
            "--launch-count", str(LAUNCH_COUNT), "--metrics", ",".join(METRICS)]
    for s in SECTIONS:
        argv += ["--section", s]
    return argv


def largest_cases(tiny: bool):
    from .cases import Settings, torch_dtype

    cases = Settings(tiny=tiny).speed_cases()
    size = {c: c.numel * torch_dtype(c.dtype).itemsize for c in cases}
    return sorted(cases, key=lambda c: -size[c])[:CASES]


def target(tiny: bool, device: str) -> None:
    import torch

    from .cases import bn_inputs
    from .speed import closures, iabn_bn_act

    cuda = device.startswith("cuda")

    def window(fn):
        """fn() with the profiler's window open around it, and nothing else in it."""
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.profiler.start()
        fn()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()

    for case in largest_cases(tiny):
        inp = bn_inputs(case, device)
        for mode in ("forward", "backward"):
            setup, run = closures(iabn_bn_act, inp, mode)
            run(setup())  # compiles or loads the module, sizes the plan
            state = setup()
            window(functools.partial(run, state))
            print(f"[ncu target] {case.label} {mode}", flush=True)
            del state
        if cuda:
            copy = reference_copy(inp["x"])
            copy()
            window(copy)
            print(f"[ncu target] {case.label} {REFERENCE}", flush=True)
        del inp


def reference_copy(x):
    """A call that copies x's bytes (16 at a time; a tail under 16 bytes is left out) with
    REFERENCE on the current device, 8 blocks of 256 threads per SM."""
    import cupy
    import torch

    src = cupy.from_dlpack(x.detach().reshape(-1))
    dst = cupy.empty_like(src)
    n = src.nbytes // 16
    kernel = cupy.RawKernel(COPY_SOURCE, REFERENCE)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    return lambda: kernel((8 * sms,), (256,), (src, dst, cupy.uint64(n)))


# ------------------------------------------------------------------------------------------
# reading ncu's text
# ------------------------------------------------------------------------------------------
# "  kernel_name<...>(args) (1024, 1, 1)x(256, 1, 1), Context 1, Stream 7, Device 0, CC 9.0"
KERNEL = re.compile(r"^  (\S.*?) \((\d+), (\d+), (\d+)\)x\((\d+), (\d+), (\d+)\), Context")
# "    DRAM Throughput        %        89.12" (name, unit, value; values may carry commas)
METRIC = re.compile(r"^\s{4,}(\S.*?)\s{2,}(\S+)\s+(\d[\d,]*(?:\.\d+)?(?:[eE][+-]?\d+)?)\s*$")
PREFIX = {"": 1.0, "K": 1e3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "m": 1e-3, "u": 1e-6,
          "n": 1e-9}


def _value(unit: str, text: str) -> float:
    """A metric in base units: "Gbyte/second" 1.2 -> 1.2e9; "%" stays as it is."""
    v = float(text.replace(",", ""))
    for base in ("byte/second", "byte/s", "byte", "second", "hz"):
        lead = unit[: len(unit) - len(base)]
        if unit.endswith(base) and lead in PREFIX:
            return v * PREFIX[lead]
    return v


def parse(text: str) -> list[dict]:
    """One dict per profiled kernel: name, grid, block and every metric line under it."""
    kernels = []
    for line in text.splitlines():
        m = KERNEL.match(line)
        if m:
            kernels.append(dict(name=m.group(1), grid=tuple(map(int, m.group(2, 3, 4))),
                                block=tuple(map(int, m.group(5, 6, 7))), metrics={}))
            continue
        m = METRIC.match(line)
        if m and kernels:
            kernels[-1]["metrics"].setdefault(m.group(1).strip(), _value(m.group(2), m.group(3)))
    return kernels


def summarize(text: str) -> tuple[list[str], dict]:
    """(lines of ncu_summary.txt, counts for the verdict). Each kernel's DRAM bandwidth is
    divided by that of the copy kernel profiled after it on the same shape."""
    kernels = parse(text)
    counts = dict(kernels=len(kernels))
    lines = [f"{'us':>9} {'GB/s':>7} {'of copy':>7} {'occup.':>6}  grid x block  name"]
    pending = []

    def flush(copy_bw):
        for k in pending:
            bw = k["metrics"].get("dram__bytes.sum.per_second")
            frac = bw / copy_bw if (bw and copy_bw) else None
            k["of_copy"] = frac
            us = k["metrics"].get("gpu__time_duration.sum")
            lines.append(f"{us * 1e6 if us else float('nan'):9.1f} "
                         f"{(bw or float('nan')) / 1e9:7.0f} "
                         f"{'-' if frac is None else f'{frac:.2f}':>7} "
                         f"{k['metrics'].get('Achieved Occupancy', float('nan')):6.1f}  "
                         f"{k['grid']}x{k['block']}  {k['name'][:120]}")
        pending.clear()

    for k in kernels:
        pending.append(k)
        if REFERENCE in k["name"]:  # the reference closes one shape's group
            flush(k["metrics"].get("dram__bytes.sum.per_second"))
    flush(None)
    fracs = [k["of_copy"] for k in kernels if k.get("of_copy") and
             REFERENCE not in k["name"]]
    if fracs:
        counts["worst_of_copy"], counts["best_of_copy"] = round(min(fracs), 2), round(
            max(fracs), 2)
    problems = [line.strip() for line in text.splitlines() if "==ERROR==" in line]
    if problems:
        counts["errors"] = len(problems)
        lines += ["", "ncu errors:"] + problems[:20]
    return lines, counts


# ------------------------------------------------------------------------------------------
# the suite's step
# ------------------------------------------------------------------------------------------
def step(ctx: Context, allot: float) -> Outcome:
    """ncu around the target on a GPU; without one, the target alone on the CPU."""
    target = [ctx.python, "-m", "benchmarks.gpu_suite_ncu", "--target"]
    if not ctx.gpu:
        done = ctx.run(target + ["--tiny", "--device", "cpu"], "ncu-target.log", allot)
        return from_command(done, lambda d: Outcome(
            PASSED if d.rc == 0 else FAILED, "no GPU: ncu's target ran on the CPU at tiny "
            f"sizes, without ncu (exit {d.rc})", ran_as="CPU stand-in: target without ncu"))
    tool = ctx.facts.get("tools", {}).get("ncu")
    if not tool:
        return Outcome(SKIPPED, "ncu not found (PATH, CUDA_HOME, /usr/local/cuda*)")
    done = ctx.run(command(tool) + target, "ncu.log", allot)
    text = done.log.read_text(errors="replace")
    lines, counts = summarize(text)
    (ctx.results / "ncu_summary.txt").write_text("\n".join(lines) + "\n")

    def judge(done):
        if "ERR_NVGPUCTRPERM" in text:  # the machine's setting, not something to fix here
            return Outcome(SKIPPED, "no permission for the GPU's performance counters "
                           "(ERR_NVGPUCTRPERM); see logs/ncu.log", counts)
        if done.rc == 0 and counts["kernels"]:
            return Outcome(PASSED, "ncu_summary.txt; full text logs/ncu.log", counts)
        return Outcome(FAILED, f"exit {done.rc}, {counts['kernels']} kernels profiled; see "
                       "logs/ncu.log", counts)

    out = from_command(done, judge)
    if out.status == OUT_OF_TIME:  # the kernels profiled before the kill are in the text
        out.counts = counts
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_suite_ncu",
                                description=__doc__.splitlines()[0])
    p.add_argument("--target", action="store_true", help="run the profiled calls")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (the dry run)")
    p.add_argument("--device", default="cuda")
    args = p.parse_args(argv)
    if not args.target:
        p.error("nothing to do without --target (the suite runs ncu around it)")
    target(args.tiny, args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The run's outputs: summary.md (parts, targets, one section per part, each with the reason
where its part produced no numbers), environment.json, and every part's CSV files and plots.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from . import report
from .cases import Settings


def _no_figures(title: str, run, part: str) -> list[str]:
    """A summary section for a part that produced no numbers: its title and the reason."""
    status = run.status.get(part, "not requested (--parts)")
    return [f"## {title}", "", f"No figures: {status}.", ""]


def write_outputs(out: Path, run, settings: Settings, env: dict, gpu: bool, argv) -> None:
    cmd = "python -m benchmarks " + " ".join(sys.argv[1:] if argv is None else argv)
    scope = "GPU + CPU" if gpu else "CPU only"
    md = [f"# iabn benchmarks: {env['device']} ({scope}{', tiny sizes' if settings.tiny else ''})",
          "", f"Command: `{cmd.strip()}`", "",
          "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items() if k != "device"), "",
          "## Parts", ""]
    md += report._table(["part", "status"], [[p, s] for p, s in run.status.items()])
    md += ["## Targets (reported, not asserted)", ""]
    if "speed" in run.data:
        targets = report.speed_targets(run.data["speed"][0])
    else:
        targets = [[name, "-", want, f"not measured ({run.status.get('speed', 'not requested')})"]
                   for name, want in (("full step vs eager, geomean", ">= 1.5x"),
                                      ("full step vs eager, slowest shape", ">= 0.95x"),
                                      ("fraction of copy bandwidth", ">= 0.85"))]
    if "memory" in run.data:
        targets.append(report.memory_target(run.data["memory"][0]))
    else:
        targets.append(["peak-memory saving (GPU)", "-", ">= the paper's \"up to 50%\"",
                        f"not measured ({run.status.get('memory', 'not requested')})"])
    md += report._table(report.TARGET_HEADER, targets)
    (out / "environment.json").write_text(json.dumps(dict(env, status=run.status), indent=2))

    if "speed" in run.data:
        rows, copy_gbps = run.data["speed"]
        report.write_csv(out / "speed.csv", rows)
        report.plot_speed(rows, out / "speed_ratio.png", env["device"])
        md += ["## Speed (GPU, CUDA events)", "", "![speed](speed_ratio.png)", ""]
        md += report.speed_section(rows, copy_gbps)
    else:
        md += _no_figures("Speed (GPU)", run, "speed")

    if "memory" in run.data:
        peak, max_rows = run.data["memory"]
        report.write_csv(out / "peak_memory.csv", peak)
        report.write_csv(out / "max_batch.csv", max_rows)
        report.plot_memory_vs_batch(
            report.wide_peak_rows(peak), out / "memory_vs_batch.png",
            f"Peak allocated GPU memory of one training step ({env['device']})",
            "standard_peak", "iabn_peak", report.GIB, "GiB",
            budget=settings.memory_budget_gib, key_fused="iabn_fused_peak")
        md += ["## Peak memory per training step (GPU)", "", "![memory](memory_vs_batch.png)", ""]
        md += report.peak_section(peak, max_rows)
    else:
        md += _no_figures("Peak memory (GPU)", run, "memory")

    if "step" in run.data:
        from . import step

        report.write_csv(out / "step.csv", run.data["step"])
        step.plot(run.data["step"], out / "step.png", env["device"])
        md += ["## Whole training step, batch 32 (GPU, CUDA events)", "",
               "Median ms per step (forward, loss, backward, SGD update) and peak allocated "
               "memory of one step; float16-cl = autocast float16 with channels_last. "
               "Standard = BatchNorm2d + in-place LeakyReLU. Max loss diff: spread of the "
               "kinds' first-step losses relative to standard (same conv weights). float32 "
               "convolutions " + ("may use TF32 (torch.backends.cudnn.allow_tf32, PyTorch's "
                                  "default)" if torch.backends.cudnn.allow_tf32 else
                                  "use full float32 (cudnn.allow_tf32 is off)") + ".", "",
               "![step](step.png)", ""]
        md += step.section(run.data["step"])
    else:
        md += _no_figures("Whole training step (GPU)", run, "step")
    if "step_kernels" in run.data:  # without it, the parts table above says why
        from . import step_kernels

        md += step_kernels.write_kernels(out, run.data["step_kernels"], env["device"])

    if "saved" in run.data:
        rows = run.data["saved"]
        report.write_csv(out / "saved_bytes.csv", rows)
        report.plot_memory_vs_batch(
            rows, out / "saved_bytes_vs_batch.png",
            "CPU-measured: activation bytes saved for backward (saved-tensor hooks), "
            "not GPU peak memory", "standard_bytes", "iabn_bytes", report.MIB, "MiB",
            key_fused="iabn_fused_bytes")
        md += ["## Bytes saved for backward (measured on the CPU)", "",
               "Distinct storages autograd keeps after the forward pass (parameters excluded); "
               "the same tensors a GPU run would keep. Standard = BatchNorm2d + in-place "
               "LeakyReLU. iabn: InPlaceABN where BN has an activation (a bottleneck's last BN, "
               "followed by the residual add, stays an identity InPlaceABN). iabn + fused "
               "residual: the standard net through `convert_model`, which turns BN -> add -> "
               "LeakyReLU into one InPlaceABN computing act(BN(x) + r).", "",
               "![saved bytes](saved_bytes_vs_batch.png)", ""]
        md += report.saved_section(rows)
    else:
        md += _no_figures("Bytes saved for backward", run, "saved")

    if "counts" in run.data:
        traffic, launches = run.data["counts"]
        report.write_csv(out / "traffic.csv", traffic)
        report.write_csv(out / "launches.csv", launches)
        md += ["## Global memory traffic per element (CPU emulator counters, "
               "machine-independent)", ""]
        md += report.traffic_section(traffic)
        md += ["## Kernel launches per step (emulator counters)", ""]
        md += report._table(["path", "step", "launches"],
                            [[r["path"], r["step"], r["launches"]] for r in launches])
    else:
        md += _no_figures("Traffic and launches", run, "counts")

    if "overhead" in run.data:
        from . import overhead

        report.write_csv(out / "overhead.csv", run.data["overhead"])
        md += ["## Host overhead per layer (CPU" + (" and GPU" if gpu else "") + ")", ""]
        md += overhead.summary_section(run.data["overhead"])
    else:
        md += _no_figures("Host overhead per layer", run, "overhead")

    if "precision" in run.data:
        from . import precision_report

        md += [f"## Precision in 16 bits ({env['device']})", ""]
        md += precision_report.write(out, run.data["precision"], env["device"])
    else:
        md += _no_figures("Precision in 16 bits", run, "precision")

    if "compile" in run.data:
        rows = run.data["compile"]
        report.write_csv(out / "compile.csv", rows)
        note = ("Cold = one NVRTC compile of the module for the arch, no cache. Warm (CuPy "
                "disk-cache hit) is measured in a fresh process on a GPU run." if gpu else
                "Cold = one NVRTC compile of the module for the arch, no cache (measured "
                "without a GPU). Warm (CuPy disk-cache hit + cubin load) is **not measured** "
                "here: it needs a GPU to load the module.")
        md += ["## NVRTC compile time", ""] + report.compile_section(rows, note)
    else:
        md += _no_figures("NVRTC compile time", run, "compile")
    (out / "summary.md").write_text("\n".join(md))

"""Output: CSV files, PNG plots (matplotlib, Agg) and the Markdown summary.

Only numbers that a part actually measured are written; a part that did not run appears in
the summary with the reason, never with a placeholder figure.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

from .speed import BASELINES, MODES, geomean

# Targets from issue 5 (reported against, not asserted).
TARGET_GEOMEAN = 1.5  # full step vs eager BN+LeakyReLU, geometric mean over shapes
TARGET_WORST = 0.95  # no shape slower than this
TARGET_BANDWIDTH = 0.85  # fraction of device-to-device copy bandwidth
# The paper's headline (Rota Bulo et al., CVPR 2018, abstract): "memory savings of up to 50%".
PAPER_SAVING = 0.50
# Saved-for-backward bytes with the fused residual vs BN + LeakyReLU (issue 12's targets).
TARGET_FUSED_SAVING = {"resnet50": 0.35, "deeplabv3_resnet50": 0.30}
GIB, MIB = 2 ** 30, 2 ** 20


def write_csv(path: Path, rows: list[dict]) -> None:
    keys: list[str] = []
    for r in rows:  # union of keys in first-seen order: rows of one table may differ
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: _cell(r.get(k)) for k in keys})


def _cell(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # no display on CI machines or GPU boxes
    import matplotlib.pyplot as plt

    return plt


# ------------------------------------------------------------------------------------------
# plots
# ------------------------------------------------------------------------------------------
def plot_speed(rows: list[dict], path: Path, device: str) -> None:
    """Speedup of iabn over each baseline, per shape, one panel per mode."""
    plt = _plt()
    labels = [r["label"] for r in rows if r["mode"] == "full"]
    fig, axes = plt.subplots(len(MODES), 1, figsize=(max(8, 0.35 * len(labels) + 3), 10),
                             sharex=True)
    width = 0.8 / len(BASELINES)
    for ax, mode in zip(axes, MODES):
        by_label = {r["label"]: r for r in rows if r["mode"] == mode}
        for i, base in enumerate(BASELINES):
            ys = [by_label.get(lab, {}).get(f"speedup_vs_{base}") or math.nan for lab in labels]
            ax.bar([j + i * width for j in range(len(labels))], ys, width, label=f"vs {base}")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(TARGET_WORST, color="r", lw=0.8, ls=":", label=f"{TARGET_WORST}x floor")
        if mode == "full":
            ax.axhline(TARGET_GEOMEAN, color="g", lw=0.8, ls="--",
                       label=f"{TARGET_GEOMEAN}x geomean target")
        ax.set_ylabel(f"{mode}: baseline time / iabn time")
        ax.set_yscale("log")
        ax.legend(fontsize=7, ncol=5)
    axes[-1].set_xticks([j + 0.4 - width / 2 for j in range(len(labels))])
    axes[-1].set_xticklabels(labels, rotation=90, fontsize=7)
    fig.suptitle(f"iabn speedup per shape ({device}; >1 means iabn is faster)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_memory_vs_batch(rows: list[dict], path: Path, title: str, key_std: str,
                         key_iabn: str, unit: float, unit_name: str, budget=None,
                         key_fused: str | None = None) -> None:
    """Memory vs batch size per network, standard BN+act vs InPlaceABN (and InPlaceABN with
    the fused residual, when key_fused names its column). Accepts wide rows (one per batch
    with every kind) or long rows (one per batch and kind)."""
    plt = _plt()
    nets = list(dict.fromkeys(r["net"] for r in rows))
    fig, axes = plt.subplots(1, len(nets), figsize=(5.5 * len(nets), 4), squeeze=False)
    for ax, net in zip(axes[0], nets):
        sub = [r for r in rows if r["net"] == net]
        for key, name in ((key_std, "standard BN + LeakyReLU"), (key_iabn, "InPlaceABN"),
                          (key_fused, "InPlaceABN + fused residual")):
            if key is None:
                continue
            pts = sorted((r["batch"], r[key] / unit) for r in sub if r.get(key) is not None)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        if budget:
            ax.axhline(budget, color="r", ls=":", lw=0.8, label="budget")
        ax.set_title(f"{net}\n{sub[0]['input']}", fontsize=9)
        ax.set_xlabel("batch size")
        ax.set_ylabel(unit_name)
        ax.set_ylim(bottom=0)  # savings read as proportions; a cut axis would exaggerate them
        ax.set_xticks(sorted({r["batch"] for r in sub}))
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def wide_peak_rows(rows: list[dict]) -> list[dict]:
    """peak_memory rows (one per kind) -> one row per (net, batch) with both kinds."""
    out: dict = {}
    for r in rows:
        w = out.setdefault((r["net"], r["batch"]), dict(net=r["net"], input=r["input"],
                                                         batch=r["batch"]))
        w[f"{r['kind']}_peak"] = r["peak_bytes"]
    return list(out.values())


# ------------------------------------------------------------------------------------------
# summary
# ------------------------------------------------------------------------------------------
def _f(v, fmt="{:.2f}"):
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)


def _table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out + [""]


def _verdict(value, target, higher=True):
    if value is None:
        return "not measured"
    return "met" if (value >= target if higher else value <= target) else "NOT met"


def speed_targets(rows: list[dict]) -> list[list]:
    """[target, measured, wanted, verdict] rows for the speed targets."""
    ok = [r for r in rows if r.get("status") == "ok"]
    full = [r for r in ok if r["mode"] == "full"]
    gm = geomean(r.get("speedup_vs_eager") for r in full)
    worst = min((r["speedup_vs_eager"] for r in full if r.get("speedup_vs_eager")), default=None)
    tgt = [["full step vs eager BN+LeakyReLU, geomean over shapes", _f(gm) + "x",
            f">= {TARGET_GEOMEAN}x", _verdict(gm, TARGET_GEOMEAN)],
           ["full step vs eager BN+LeakyReLU, slowest shape", _f(worst) + "x",
            f">= {TARGET_WORST}x", _verdict(worst, TARGET_WORST)]]
    for mode in MODES:
        fr = sorted(r["bw_fraction"] for r in ok if r["mode"] == mode and r.get("bw_fraction"))
        best = fr[-1] if fr else None
        tgt.append([f"{mode}: best fraction of copy bandwidth (median "
                    f"{_f(fr[len(fr) // 2] if fr else None)})", _f(best),
                    f">= {TARGET_BANDWIDTH}", _verdict(best, TARGET_BANDWIDTH)])
    return tgt


def memory_target(peak_rows: list[dict]) -> list:
    best = max((1 - r["iabn_peak"] / r["standard_peak"] for r in wide_peak_rows(peak_rows)
                if r.get("iabn_peak") and r.get("standard_peak")), default=None)
    return ["largest peak-memory saving of a training step (GPU)", _f(best, "{:.1%}"),
            f">= the paper's \"up to {PAPER_SAVING:.0%}\"", _verdict(best, PAPER_SAVING)]


TARGET_HEADER = ["target", "measured", "wanted", "verdict"]


def speed_section(rows: list[dict], copy_gbps) -> list[str]:
    ok = [r for r in rows if r.get("status") == "ok"]
    lines = [f"Device-to-device copy bandwidth measured in this run: {_f(copy_gbps, '{:.0f}')} "
             "GB/s. iabn's bytes per mode are whole-tensor passes from the emulator counts "
             "(forward 2 reads + 1 write; backward 4 + 1, plus iabn.torch's copy of the "
             "incoming gradient, 1 + 1).", ""]
    lines += _table(TARGET_HEADER, speed_targets(rows))
    for base in BASELINES:
        g = {m: geomean(r.get(f"speedup_vs_{base}") for r in ok if r["mode"] == m)
             for m in MODES}
        lines.append(f"- geomean speedup vs {base}: " + ", ".join(
            f"{m} {_f(g[m])}x" for m in MODES))
    lines += ["", "Full step per shape (median ms; speedup = baseline / iabn):", ""]
    body = [[r["label"], _f(r.get("iabn_ms"), "{:.3f}"), _f(r.get("eager_ms"), "{:.3f}"),
             _f(r.get("compiled_ms"), "{:.3f}"), _f(r.get("checkpoint_ms"), "{:.3f}"),
             _f(r.get("speedup_vs_eager")), _f(r.get("speedup_vs_compiled")),
             _f(r.get("speedup_vs_checkpoint")), _f(r.get("bw_fraction"))]
            for r in rows if r["mode"] == "full"]
    lines += _table(["shape", "iabn", "eager", "compiled", "checkpoint", "vs eager",
                     "vs compiled", "vs checkpoint", "BW fraction"], body)
    bad = [r for r in rows if r.get("status") != "ok"]
    if bad:
        lines += [f"- {r['label']} {r['mode']}: {r.get('status')}" for r in bad] + [""]
    return lines


def peak_section(rows: list[dict], max_rows: list[dict]) -> list[str]:
    wide = wide_peak_rows(rows)
    body = []
    for r in wide:
        s, i = r.get("standard_peak"), r.get("iabn_peak")
        sav = 1 - i / s if (s and i) else None
        body.append([r["net"], r["input"], r["batch"], _f(s and s / GIB),
                     _f(i and i / GIB), _f(sav, "{:.1%}")])
    lines = _table(["net", "input", "batch", "standard peak GiB", "iabn peak GiB", "saving"],
                   body)
    lines += _table(TARGET_HEADER, [memory_target(rows)])
    if max_rows:
        lines += _table(["net", "input", "kind", "budget GiB", "largest batch"],
                        [[r["net"], r["input"], r["kind"], r["budget_gib"],
                          r.get("note") or
                          f"{r['max_batch']}{' (search cap)' if r['capped'] else ''}"]
                         for r in max_rows])
    return lines


def _bytes(v) -> str:
    for unit, size in (("GiB", GIB), ("MiB", MIB), ("KiB", 1024)):
        if v >= size:
            return f"{v / size:.1f} {unit}"
    return f"{v} B"


def saved_targets(rows: list[dict]) -> list[list]:
    """[target, measured, wanted, verdict] for the fused-residual saving of each target net
    (the smallest saving over the measured batches)."""
    out = []
    for net, want in TARGET_FUSED_SAVING.items():
        got = [float(r["saving_fused"]) for r in rows if r["net"] == net
               and r.get("saving_fused") not in (None, "")]
        best = min(got) if got else None
        out.append([f"{net}: saved bytes, InPlaceABN + fused residual vs BN + LeakyReLU",
                    _f(best, "{:.1%}"), f">= {want:.0%} less", _verdict(best, want)])
    return out


def saved_section(rows: list[dict]) -> list[str]:
    lines = _table(TARGET_HEADER, saved_targets(rows))
    return lines + _table(
        ["device", "net", "input", "batch", "standard", "iabn", "saving", "iabn + fused residual",
         "saving"],
        [[r["device"], r["net"], r["input"], r["batch"], _bytes(r["standard_bytes"]),
          _bytes(r["iabn_bytes"]), _f(r["saving"], "{:.1%}"), _bytes(r["iabn_fused_bytes"]),
          _f(r["saving_fused"], "{:.1%}")] for r in rows])


def traffic_section(rows: list[dict]) -> list[str]:
    comp = [r for r in rows if "(" in r["stage"]]
    body = [[r["pair"], r["layout"], r["stage"], r["launches"],
             _f(r["load_per_elem"] / r["itemsize"], "{:.3f}"),
             _f(r["store_per_elem"] / r["itemsize"], "{:.3f}"),
             _f(r["load_per_elem"] + r["store_per_elem"], "{:.3f}")] for r in comp]
    return [f"Shape {rows[0]['shape']}; per element of x, in units of the input itemsize; the "
            "fractional part is the O(C) per-channel traffic.", ""] + _table(
        ["pair", "layout", "stage", "launches", "loads / itemsize", "stores / itemsize",
         "bytes / element"], body)


def compile_section(rows: list[dict], note: str) -> list[str]:
    by_kind: dict = {}
    for r in rows:
        by_kind.setdefault(r["kind"], []).append(r)
    body = []
    for kind, rs in by_kind.items():
        for module in ("stats.cu", "forward.cu", "backward.cu"):
            ts = [r["seconds"] for r in rs if r["module"] == module]
            if ts:
                body.append([kind, module, rs[0]["arch"], len(ts), _f(sum(ts) / len(ts)),
                             _f(max(ts))])
        body.append([kind, "**all modules**", rs[0]["arch"], len(rs),
                     "", _f(sum(r["seconds"] for r in rs)) + " total"])
    return _table(["kind", "module", "arch", "dtype pairs", "mean s", "max s"], body) + [
        note, ""]

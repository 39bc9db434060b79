"""The precision part's output: CSVs, the loss-curve plot and its summary section (the
measurements are in benchmarks/precision.py)."""
from __future__ import annotations

from pathlib import Path

from . import report
from .cases import SLOPE
from .precision import DTYPES16, GRADS, KINDS


def _span(values) -> str:
    values = sorted(v for v in values if v is not None)
    if not values:
        return "-"
    return f"{values[len(values) // 2]:.2g} / {values[-1]:.2g}"


def _losses(training: list[dict], init: str, dtype: str, kind: str) -> list[float]:
    """One training run's loss per step."""
    return [r["loss"] for r in training
            if r["init"] == init and r["dtype"] == dtype and r["kind"] == kind]


def section(data: dict) -> list[str]:
    s, md = data["sizes"], []
    md += [f"ResNet-50 (benchmarks.nets, width {s.width}, LeakyReLU {SLOPE}) at batch {s.batch}, "
           f"{s.image}x{s.image}, {s.classes} classes, on {data['device']}; trained {s.steps} SGD "
           "steps (momentum 0.9, lr {:g}) on one random batch with InPlace-ABN's scale "
           "parametrisation, converted with `convert_model` (fused).".format(s.lr), "",
           "**Residuals** |r| / |BN(x)| at the fused layers (rms over the layer; median / max "
           "over layers), the worst channel, and the smallest BN output scale "
           "sqrt(gamma^2 + beta^2):", ""]
    groups: dict = {}
    for r in data["residuals"]:
        groups.setdefault((r["init"], r["stage"]), []).append(r)
    md += report._table(["init", "when", "fused layers", "rms ratio", "worst channel",
                         "min scale"],
                        [[i, st, len(rs), _span(r["ratio_rms"] for r in rs),
                          f"{max(r['ratio_max_channel'] for r in rs):.3g}",
                          f"{min(r['min_scale'] for r in rs):.3g}"]
                         for (i, st), rs in groups.items()])
    md += ["**Layer gradients** relative to float64 on the same 16-bit inputs (norm of the "
           "error / norm of the gradient; median / max over layers). The float64 rows check "
           "each kind against a closed form. Output gradients scaled per layer by a power of "
           "two (as a GradScaler does).", ""]
    rows, table = data["layers"], []
    for init in dict.fromkeys(r["init"] for r in rows):
        for fused in (False, True):
            for dt in ("float64", *DTYPES16):
                for kind in KINDS:
                    sel = [r for r in rows if r["init"] == init and r["fused"] == fused
                           and r["dtype"] == dt and r["kind"] == kind]
                    if sel:
                        table.append([init, "BN->add->act" if fused else "BN->act", len(sel),
                                      dt, kind] + [_span(r[g] for r in sel) for g in GRADS])
    md += report._table(["init", "layers", "n", "dtype", "kind", *GRADS], table)
    md += [f"**Training** {s.train_steps} steps, ResNet-50 width {s.train_width}, batch "
           f"{s.train_batch} at {s.train_image}x{s.train_image}, one fixed batch, SGD lr "
           f"{s.lr:g} (float16: GradScaler); loss at the first and last step, mean of the last "
           "quarter, largest gap to torch's loss at the same step (the float32 gap, between kinds "
           "computing the same function, is the yardstick: this training is chaotic):", "",
           "![training](precision_training.png)", ""]
    tr, table = data["training"], []
    for init in dict.fromkeys(r["init"] for r in tr):
        for dt in dict.fromkeys(r["dtype"] for r in tr):
            ref = _losses(tr, init, dt, "torch")
            for kind in KINDS:
                ls = _losses(tr, init, dt, kind)
                q = ls[-max(1, len(ls) // 4):]
                table.append([init, dt, kind, f"{ls[0]:.4g}", f"{ls[-1]:.3g}",
                              f"{sum(q) / len(q):.3g}",
                              f"{max(abs(a - b) for a, b in zip(ls, ref)):.3g}"])
    md += report._table(["init", "dtype", "kind", "first", "last", "last quarter",
                         "max gap to torch"], table)
    return md


def plot(data: dict, path: Path, device: str) -> None:
    plt = report._plt()
    tr = data["training"]
    inits, dtypes = list(dict.fromkeys(r["init"] for r in tr)), list(
        dict.fromkeys(r["dtype"] for r in tr))
    fig, axes = plt.subplots(len(inits), len(dtypes), squeeze=False, sharey=True,
                             figsize=(4 * len(dtypes), 3.2 * len(inits)))
    for i, init in enumerate(inits):
        for j, dt in enumerate(dtypes):
            ax = axes[i][j]
            for kind, style in zip(KINDS, ("-", "--", ":")):
                ls = _losses(tr, init, dt, kind)
                ax.plot(range(len(ls)), ls, style, label=kind)
            ax.set_yscale("log")
            ax.set_title(f"{dt}, {init}", fontsize=9)
            ax.set_xlabel("step")
    axes[0][0].set_ylabel("loss")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Training loss, torch BN vs InPlace-ABN ({device})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(out: Path, data: dict, device: str) -> list[str]:
    """CSVs and the plot into `out`; returns the summary section's lines."""
    report.write_csv(out / "precision_residuals.csv", data["residuals"])
    report.write_csv(out / "precision_layers.csv", data["layers"])
    report.write_csv(out / "precision_training.csv", data["training"])
    plot(data, out / "precision_training.png", device)
    return section(data)

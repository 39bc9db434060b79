"""The `precision` benchmark part at --tiny sizes: its CSVs have one row per layer, kind and
dtype, every error is finite, the float64 reference agrees with itself, and the effect it
exists to measure (the fused residual with a zero-initialised scale in 16 bits) shows."""
from __future__ import annotations

import csv
import math
import statistics

import pytest
from torch import nn

from benchmarks import precision
from benchmarks.__main__ import main
from benchmarks.cases import Settings


def read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    d = tmp_path_factory.mktemp("precision")
    assert main(["--cpu-only", "--tiny", "--parts", "precision", "--out", str(d)]) == 0
    return d


def model_counts():
    s = precision.sizes(Settings(tiny=True))
    model = precision.resnet50(s.width, s.classes, False)
    bns = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    blocks = sum(type(m).__name__ == "Bottleneck" for m in model.modules())
    return s, bns, blocks


def test_csv_shapes(out):
    s, bns, blocks = model_counts()
    layers = read(out / "precision_layers.csv")
    inits = ("standard", "zero_init_last")
    assert len(layers) == len(inits) * bns * 3 * len(precision.KINDS)
    assert sum(r["fused"] == "True" for r in layers) == len(inits) * blocks * 3 * 3
    residuals = read(out / "precision_residuals.csv")
    assert len(residuals) == len(inits) * 2 * blocks
    training = read(out / "precision_training.csv")
    assert len(training) == len(s.train_inits) * 3 * len(precision.KINDS) * s.train_steps
    assert (out / "precision_training.png").stat().st_size > 0
    assert "## Precision in 16 bits" in (out / "summary.md").read_text()


def test_errors_finite_and_float64_reference_agrees_with_itself(out):
    layers = read(out / "precision_layers.csv")
    for r in layers:
        for g in precision.GRADS:
            assert math.isfinite(float(r[g])), r
        if r["dtype"] == "float64":  # autograd / InPlace-ABN in float64 vs the closed form
            assert max(float(r[g]) for g in precision.GRADS) < 1e-9, r
    for r in read(out / "precision_residuals.csv"):
        assert 0 < float(r["ratio_rms"]) < math.inf and float(r["min_scale"]) > 0
    for r in read(out / "precision_training.csv"):
        assert math.isfinite(float(r["loss"]))


def test_the_measured_effect_shows(out):
    """A zero-initialised fused scale: |r|/|BN(x)| is huge at init, and the fused layers'
    float16 scale gradient is far worse than torch's on the same inputs."""
    res = read(out / "precision_residuals.csv")
    at_init = {i: [float(r["ratio_rms"]) for r in res if r["init"] == i and r["stage"] == "init"]
               for i in ("standard", "zero_init_last")}
    assert min(at_init["zero_init_last"]) > 100 * max(at_init["standard"])
    rows = [r for r in read(out / "precision_layers.csv") if r["init"] == "zero_init_last"
            and r["fused"] == "True" and r["dtype"] == "float16"]
    err = {k: statistics.median(float(r["dweight"]) for r in rows if r["kind"] == k)
           for k in ("torch", "iabn_fused")}
    assert err["iabn_fused"] > 10 * err["torch"]

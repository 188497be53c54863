"""End to end on small data: fit, sample, evaluate, with thresholds a broken method fails
(a flipped drift, a missing self-exclusion or a wrong normalisation all break one of them)."""

import numpy as np
import pytest

from bdiff.datasets import BUILTINS
from bdiff.metrics import evaluate
from bdiff.model import TrainedModel
from bdiff.sampler import SampleConfig, sample
from bdiff.trainer import FitConfig, Trainer

SMALL = dict(steps=1500, width=128, depth=3, batch_size=512)


def _fit_and_sample(name, tmp_path, n_train=3000, n_samples=4000):
    data = BUILTINS[name].load("train", n=n_train)
    path = tmp_path / f"{name}.safetensors"
    Trainer(data, FitConfig(**SMALL), name).run(str(path))
    model = TrainedModel.load(path)
    x, report = sample(model.fields, model.dim, model.eps, n_samples, SampleConfig())
    values = model.standardizer.inverse(x.numpy())
    metrics = evaluate(model, BUILTINS[name].load("heldout", n=4000), values, BUILTINS[name].law)
    return model, values, metrics, report


def test_unbalanced_mixture(tmp_path):
    model, values, m, report = _fit_and_sample("mixture", tmp_path)
    assert m["mode_weight_error"] < 0.03
    assert m["mmd"] < 3 * m["mmd_ideal"]
    assert m["loglik"] > m["loglik_true"] - 0.15
    assert m["field_error_s"] < 0.35
    assert report["low_density_share"] < 0.03
    # the normalised scalar field integrates to about one
    axes = [np.linspace(-5, 5, 200), np.linspace(-3, 5.5, 170)]
    grid = np.stack([g.ravel() for g in np.meshgrid(*axes, indexing="ij")], 1).astype(np.float32)
    mass = np.exp(model.log_density(grid)).sum() * (axes[0][1] - axes[0][0]) * (axes[1][1] - axes[1][0])
    assert mass == pytest.approx(1.0, abs=0.2)


def test_disjoint_intervals(tmp_path):
    model, values, m, report = _fit_and_sample("intervals", tmp_path)
    assert m["outside_share"] < 0.03
    assert m["mode_weight_error"] < 0.03
    assert m["mmd"] < 3 * m["mmd_ideal"]

"""Image metrics (digits classifier, Fréchet distance, memorisation ratio) and the high-D
pieces of the engine: pooled standardisation, ε by held-out likelihood, log-domain fields."""
import math

import numpy as np
import pytest
import torch
from scipy import linalg

from bdiff.data import Standardizer, load_data
from bdiff.fields import FieldModel
from bdiff.images import frechet_distance, image_metrics
from bdiff.losses import heldout_bandwidth
from bdiff.model import TrainedModel
from bdiff.sampler import default_sample_config, sample
from bdiff.trainer import FitConfig, Trainer


def test_frechet_distance_matches_scipy_and_vanishes_on_itself(rng):
    a, b = rng.normal(size=(400, 6)), rng.normal(size=(300, 6)) * 1.3 + 0.2
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a + cov_b - 2 * linalg.sqrtm(cov_a @ cov_b).real)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)
    assert abs(frechet_distance(a, a)) < 1e-8


@pytest.fixture(scope="module")
def digits():
    return load_data("digits").values, load_data("digits", split="heldout").values


def test_image_metrics_tell_digits_from_noise(digits):
    train, heldout = digits
    real = image_metrics(train[:600], heldout, train)
    assert real["classifier_heldout_accuracy"] >= 0.95
    assert real["mean_confidence"] >= 0.95 and real["classes_present"] == 10
    assert real["class_entropy"] > 0.95 * math.log(10)
    assert real["nn_ratio"] == 0.0  # training images are their own nearest neighbours
    noise = np.random.default_rng(0).uniform(0, 16, size=(600, 64)).astype(np.float32)
    fake = image_metrics(noise, heldout, train)
    assert fake["digits_fd"] > 10 * real["digits_fd"]
    assert fake["nn_ratio"] > 1.5
    one_class = image_metrics(np.repeat(train[:1], 200, 0), heldout)
    assert one_class["classes_present"] == 1 and one_class["class_entropy"] == 0.0
    assert "nn_ratio" not in one_class


def test_pooled_standardizer_uses_one_scale(rng):
    values = rng.normal(size=(500, 4)) * np.array([1.0, 2.0, 0.01, 5.0])
    pooled = Standardizer.fit(values, pooled=True)
    assert np.allclose(pooled.std, pooled.std[0])
    assert np.allclose(pooled.inverse(pooled.forward(values)), values, atol=1e-4)


def test_heldout_bandwidth_peaks_inside_the_grid():
    # 1-D N(0, 1) data: the best ε is interior, and near the rule-of-thumb scale
    refs = torch.randn(3000, 1, generator=torch.Generator().manual_seed(0))
    eps, scores = heldout_bandwidth(refs, torch.Generator().manual_seed(1))
    grid = [e for e, _ in scores]
    assert grid[0] < eps < grid[-1]
    assert eps == max(scores, key=lambda item: item[1])[0]
    assert 0.005 < eps < 0.3


def test_log_fields_agree_with_linear_view():
    torch.manual_seed(0)
    model = FieldModel(12, 32, 2, param="log")
    x = torch.randn(50, 12)
    s, g = model(x)
    log_s, score = model.log_fields(x)
    assert torch.allclose(s.log(), log_s, atol=1e-5)
    assert torch.allclose(g, s.unsqueeze(1) * score)
    assert FieldModel(3, 8, 1, param="linear").param == "linear"
    assert FieldModel(3, 8, 1, param="auto").param == "log" and FieldModel(12, 8, 1, param="auto").param == "log"


def test_log_domain_model_learns_a_10d_gaussian(tmp_path):
    """A short log-domain fit on N(0, I) in 10-D: held-out log-likelihood of the normalised
    scalar field close to the true smoothed density's, and Langevin samples with unit spread.
    A linear s underflows here (the smoothed density spans tens of nats)."""
    dim = 10
    data = np.random.default_rng(0).normal(size=(3000, dim)).astype(np.float32)
    heldout = np.random.default_rng(1).normal(size=(1000, dim)).astype(np.float32)
    path = tmp_path / "g10.safetensors"
    trainer = Trainer(data, FitConfig(steps=400, width=64, depth=2, batch_size=512, eps_max=0), "g10")
    assert trainer.cfg.param == "log"
    trainer.run(str(path))
    model = TrainedModel.load(path)
    var = 1 + model.eps * float(model.standardizer.std.mean()) ** 2
    true = (-0.5 * (heldout**2).sum(1) / var - 0.5 * dim * math.log(2 * math.pi * var)).mean()
    ours = model.log_density(heldout).mean()
    assert np.isfinite(ours) and abs(ours - true) < 1.0, (ours, true)
    cfg = default_sample_config("log", steps=150)
    x, report = sample(model, 2000, cfg)
    spread = model.standardizer.inverse(x.numpy()).std(0).mean()
    assert 0.8 < spread < 1.4 and report["low_density_share"] == 0.0


def test_pixel_checks_see_the_gray_noise_the_classifier_tolerates(digits):
    """Issue 14: samples with N(0, 2²) noise on every pixel still classify as digits, but the
    pixel checks see it: values outside the data's range, noise on the always-blank pixels, a
    pixel-value histogram far from the held-out one. Clean training images read like the data."""
    from bdiff.images import pixel_metrics
    train, heldout = digits
    clean = pixel_metrics(train[:600], heldout, train)
    assert clean["pixel_outside_share"] == 0.0
    assert clean["blank_pixel_sd"] < 1.5 * clean["blank_pixel_sd_ideal"]
    assert clean["pixel_w1"] < 0.1
    noisy = train[:600] + np.random.default_rng(0).normal(0, 2.0, size=train[:600].shape).astype(np.float32)
    dirty = pixel_metrics(noisy, heldout, train)
    assert 0.2 < dirty["pixel_outside_share"] < 0.4  # about a third of pixels are blank, half go below
    assert dirty["blank_pixel_sd"] > 4 * dirty["blank_pixel_sd_ideal"]
    assert dirty["pixel_w1"] > 5 * clean["pixel_w1"]
    assert image_metrics(noisy, heldout)["mean_confidence"] > 0.8  # what the issue saw
    from bdiff.metrics import quality_warnings
    assert quality_warnings(clean) == []
    assert len(quality_warnings(dirty)) == 2

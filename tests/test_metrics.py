"""Each metric against an independent implementation (scipy, POT, a plain numpy loop)."""
import numpy as np
import pytest
import scipy.stats

from bdiff.datasets import BUILTINS
from bdiff.metrics import energy_distance, mmd, mode_weight_error, sliced_wasserstein


def test_energy_distance_matches_scipy_in_1d(rng):
    a, b = rng.normal(0, 1, 700), rng.normal(0.3, 1.4, 450)
    ours = energy_distance(a[:, None], b[:, None])
    assert ours == pytest.approx(scipy.stats.energy_distance(a, b), rel=1e-9)


def test_sliced_wasserstein_is_exact_w1_in_1d(rng):
    a, b = rng.normal(0, 1, 700), rng.exponential(1.0, 333)
    assert sliced_wasserstein(a[:, None], b[:, None], projections=4) == pytest.approx(
        scipy.stats.wasserstein_distance(a, b), rel=1e-9)


def test_sliced_wasserstein_matches_pot(rng):
    ot = pytest.importorskip("ot")
    a, b = rng.normal(size=(400, 3)), rng.normal(0.5, 1.2, size=(300, 3))
    dirs = rng.normal(size=(3, 50))
    dirs /= np.linalg.norm(dirs, axis=0)
    theirs = ot.sliced_wasserstein_distance(a, b, projections=dirs, p=1)
    assert sliced_wasserstein(a, b, directions=dirs) == pytest.approx(theirs, rel=1e-6)


def test_mmd_matches_a_plain_u_statistic(rng):
    a, b = rng.normal(size=(120, 2)), rng.normal(1.0, 1.0, size=(90, 2))
    bw = 0.7

    def k(u, v):
        return np.exp(-((u[:, None] - v[None]) ** 2).sum(-1) / (2 * bw * bw))

    kaa, kbb = k(a, a), k(b, b)
    expected = ((kaa.sum() - np.trace(kaa)) / (120 * 119) + (kbb.sum() - np.trace(kbb)) / (90 * 89)
                - 2 * k(a, b).mean())
    assert mmd(a, b, bw) == pytest.approx(expected, rel=1e-4, abs=1e-7)
    assert abs(mmd(a, rng.normal(size=(90, 2)), bw)) < 0.02 < mmd(a, b, bw)


def test_mode_weight_error_is_small_on_true_samples_and_large_on_wrong_weights():
    law = BUILTINS["mixture"].law
    values = BUILTINS["mixture"].load("heldout", n=20000)
    assert mode_weight_error(law, values) < 0.01
    first_only = values[law.component(values) == 0]
    assert mode_weight_error(law, first_only) == pytest.approx(0.25, abs=1e-9)

"""Each metric against an independent implementation (scipy, POT, a plain numpy loop)."""
import numpy as np
import pytest
import scipy.stats
import torch

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


class _StubModel:
    """A model whose density is N(0, 1) in 1-D, optionally zero at x > cut, optionally scaled."""
    dim, eps, flow_eps = 1, 0.05, None  # the field density is the model's density

    def __init__(self, cut=np.inf, scale=1.0):
        from bdiff.data import Standardizer
        self.cut, self.scale = cut, scale
        self.standardizer = Standardizer(np.zeros(1), np.ones(1))

    def check_dim(self, values, what):
        assert values.shape[1] == 1, what

    def log_density_std(self, x):
        import torch
        x = x.double()[:, 0]
        log_p = -0.5 * x * x - 0.5 * np.log(2 * np.pi) + np.log(self.scale)
        return torch.where(x > self.cut, torch.full_like(log_p, -np.inf), log_p)

    def log_density(self, values):
        import torch
        return self.log_density_std(torch.as_tensor(values, dtype=torch.float32)).numpy()


def test_loglik_is_normalised_and_refuses_a_density_that_is_zero_at_test_rows(rng):
    from bdiff.metrics import held_out_loglik, quality_warnings
    rows = rng.normal(size=(2000, 1)).astype(np.float32)
    test = rng.normal(size=(500, 1)).astype(np.float32)
    exact = float((-0.5 * test**2 - 0.5 * np.log(2 * np.pi)).mean())
    good = held_out_loglik(_StubModel(), test, rows)
    assert good["normaliser"] == pytest.approx(1.0, abs=0.03) and good["normaliser_reliable"]
    assert good["loglik"] == pytest.approx(exact, abs=0.03) and quality_warnings(good) == []
    # twice the mass: the headline divides it out, and a warning says so
    doubled = held_out_loglik(_StubModel(scale=2.0), test, rows)
    assert doubled["normaliser"] == pytest.approx(2.0, abs=0.06)
    assert doubled["loglik"] == pytest.approx(exact, abs=0.03)
    assert any("integrates to" in line for line in quality_warnings(doubled))
    # where the headline is the flow density (normalised by construction), the warning says the
    # off normaliser is the field density's, not the density the likelihood came from
    flow_headline = quality_warnings({**doubled, "density": "flow"})
    assert any(line.startswith("the field density integrates to") and "flow" in line for line in flow_headline)
    # zero density at some held-out rows: no finite headline figure, the share instead
    cut = held_out_loglik(_StubModel(cut=2.0), test, rows)
    assert cut["loglik"] is None and cut["density_nonpositive_share"] == pytest.approx(float((test > 2).mean()))
    assert any("≤ 0" in line for line in quality_warnings(cut))


def test_far_share_flags_samples_off_the_data(rng):
    from bdiff.metrics import far_share
    train, probe = rng.normal(size=(3000, 2)), rng.normal(size=(1000, 2))
    assert far_share(rng.normal(size=(2000, 2)), train, probe) < 0.01
    stray = np.concatenate([rng.normal(size=(1900, 2)), rng.normal(size=(100, 2)) * 0.1 + 8.0])
    assert far_share(stray, train, probe) == pytest.approx(0.05, abs=0.01)


def test_c2st_is_half_for_one_law_and_high_for_a_blurred_copy(rng):
    from bdiff.metrics import c2st
    data = np.concatenate([rng.normal(size=(1500, 2)) * 0.1 - 1, rng.normal(size=(1500, 2)) * 0.1 + 1])
    same = np.concatenate([rng.normal(size=(1500, 2)) * 0.1 - 1, rng.normal(size=(1500, 2)) * 0.1 + 1])
    assert abs(c2st(same, data) - 0.5) < 0.04
    assert c2st(same + rng.normal(size=same.shape) * 0.1, data) > 0.56  # the N(0, εI) blur shows


def test_json_safe_leaves_no_nonfinite_number():
    import json

    from bdiff.metrics import json_safe
    clean = json_safe({"a": 1.0, "b": float("-inf"), "c": float("nan"), "d": None})
    assert clean["b"] is None and clean["c"] is None and clean["nonfinite"] == ["b", "c"]
    json.dumps(clean, allow_nan=False)


def _without_c2st(monkeypatch):
    """C2ST off (None, as for too few rows) where a test reads other keys: its classifier was
    nine tenths of these tests' time (90 of 105 s on a slow 2-core machine)."""
    import bdiff.metrics
    monkeypatch.setattr(bdiff.metrics, "c2st", lambda *args, **kwargs: None)


def test_a_perfect_sampler_scores_as_the_reference_row_on_a_small_held_out_set(rng, monkeypatch):
    """With 60 held-out rows, 5000 samples of the true law must read like the reference row (fresh
    data rows): the size-biased distances are taken on equal numbers of rows, and the reference
    is averaged over enough random splits to be stable."""
    from bdiff.metrics import evaluate
    _without_c2st(monkeypatch)
    ratios = {"sliced_wasserstein": [], "energy_distance": []}
    for seed in range(6):
        heldout = rng.normal(size=(60, 1)).astype(np.float32)
        metrics = evaluate(_StubModel(), heldout, rng.normal(size=(5000, 1)).astype(np.float32), seed=seed)
        assert metrics["reference_repeats"] >= 10 and metrics["n_samples"] == 5000
        for key, values in ratios.items():
            values.append(metrics[key] / metrics[f"{key}_ideal"])
    for key, values in ratios.items():
        assert 0.85 < np.mean(values) < 1.15, (key, values)


def test_c2st_sees_a_difference_on_a_few_dozen_rows(rng):
    """On 15-40 rows a class (a 30-row held-out set's half) the classifier must still be able to
    split: two laws three standard deviations apart are told apart, one law is not."""
    from bdiff.metrics import c2st
    for rows in (15, 40):
        near, far = rng.normal(size=(rows, 2)), rng.normal(3.0, 1.0, size=(rows, 2))
        assert c2st(near, far) > 0.85, rows
        assert c2st(near, rng.normal(size=(rows, 2))) < 0.75, rows


def test_far_share_has_a_reference_and_warns_only_beyond_it(rng, monkeypatch):
    """With 30 held-out rows the 99.9th-percentile threshold is about their largest distance, so
    even fresh data rows fall beyond it ~1/31 of the time: that must not read as a defect. Samples
    off the data must still warn."""
    from bdiff.metrics import evaluate, quality_warnings
    _without_c2st(monkeypatch)
    train, heldout = rng.normal(size=(120, 1)).astype(np.float32), rng.normal(size=(30, 1)).astype(np.float32)
    perfect = evaluate(_StubModel(), heldout, rng.normal(size=(4000, 1)).astype(np.float32), train=train)
    assert abs(perfect["far_share"] - perfect["far_share_ideal"]) < 0.02
    assert not any("far from all data" in line for line in quality_warnings(perfect))
    stray = np.concatenate([rng.normal(size=(3800, 1)), rng.normal(size=(200, 1)) * 0.1 + 9.0]).astype(np.float32)
    assert any("far from all data" in line for line in quality_warnings(
        evaluate(_StubModel(), heldout, stray, train=train)))


def test_nearest_ratio_has_a_reference_and_warns_on_copies_of_the_training_rows(rng, monkeypatch):
    """Fresh draws of the law sit as far from the training rows as held-out rows do; a sampler
    that returns the training rows with a little jitter sits much nearer, and must say so."""
    from bdiff.metrics import evaluate, quality_warnings
    _without_c2st(monkeypatch)
    train, heldout = rng.normal(size=(300, 1)).astype(np.float32), rng.normal(size=(100, 1)).astype(np.float32)
    fresh = evaluate(_StubModel(), heldout, rng.normal(size=(3000, 1)).astype(np.float32), train=train)
    assert 0.8 < fresh["nearest_ratio"] < 1.2 and 0.7 < fresh["nearest_ratio_ideal"] < 1.4
    assert not any("copy" in line for line in quality_warnings(fresh))
    copies = train[rng.integers(0, 300, 3000)] + 1e-4 * rng.normal(size=(3000, 1)).astype(np.float32)
    copied = evaluate(_StubModel(), heldout, copies, train=train)
    assert copied["nearest_ratio"] < 0.2
    assert any("copy the training rows" in line for line in quality_warnings(copied))
    assert "nearest_ratio" not in evaluate(_StubModel(), heldout, copies)  # no training rows, no ratio


def test_far_share_of_data_is_the_leave_one_out_share(rng):
    from bdiff.metrics import far_share_of_data, nearest_distance
    reference = rng.normal(size=(50, 2))
    for probe in (rng.normal(size=(4, 2)), rng.normal(size=(17, 2)), np.round(rng.normal(size=(300, 2)), 1)):
        d = nearest_distance(probe, reference)
        brute = np.mean([d[i] > np.quantile(np.delete(d, i), 0.999) for i in range(len(d))])
        assert far_share_of_data(reference, probe) == pytest.approx(brute)


class _GaussianScore:
    """The exact score fields of p_ε = N(0, (variance + ε) I): the probability flow of a
    Gaussian of variance `variance`, with nothing learned."""

    def __init__(self, variance, levels=(1e-3, 1e3)):
        import torch
        self.variance, self.levels, self._anchor = variance, levels, torch.zeros(1)

    def parameters(self):
        return iter([self._anchor])

    def raw(self, x, eps, score_only=False):
        return None, -x / (self.variance + eps)


def _log_normal(x, variance):
    return -0.5 * (x**2).sum(1) / variance - 0.5 * x.shape[1] * np.log(2 * np.pi * variance)


def test_the_flow_density_of_a_gaussian_score_is_that_gaussian(rng):
    """The ODE carries N(0, 0.5 + ε) to N(0, 0.5 + ε_max); the prior N(0, 1 + ε_max) is within
    0.002 nats there, and the defensive share N(0, 1 + ε) is mixed in as documented. A lost
    volume term or a flipped flow misses by nats."""
    from bdiff.density import DEFENSIVE_SHARE, flow_log_density
    x = rng.normal(0, 1.2, size=(300, 3))
    eps = 0.05
    ours = flow_log_density(_GaussianScore(0.5), x, eps).numpy()
    exact = np.logaddexp(np.log1p(-DEFENSIVE_SHARE) + _log_normal(x, 0.5 + eps),
                         np.log(DEFENSIVE_SHARE) + _log_normal(x, 1 + eps))
    np.testing.assert_allclose(ours, exact, atol=0.01)


class _MixtureScore(_GaussianScore):
    """The exact score fields of a Gaussian mixture (common variance) smoothed by N(0, εI)."""

    def __init__(self, weights, means, variance, levels):
        super().__init__(variance, levels)
        import torch
        self.log_weights, self.means = torch.tensor(weights).log(), torch.tensor(means, dtype=torch.float64)

    def raw(self, x, eps, score_only=False):
        offsets = x.double().unsqueeze(1) - self.means  # (rows, components, D)
        log_r = self.log_weights - 0.5 * offsets.pow(2).sum(2) / (self.variance + eps)
        responsibility = log_r.softmax(1).unsqueeze(2)
        return None, (-(responsibility * offsets).sum(1) / (self.variance + eps)).to(x.dtype)


def test_the_flow_density_starts_from_the_rows_mixture_at_the_top_level(rng):
    """A 0.5 % mode 20 sd out (standardised units: sd set by the far mode) is still apart at
    ε_max, where N(0, (1 + ε_max) I) put its rows 20-45 nats too low: on benchmarks/hostile.py's
    far_mode table the far rows read -72 nats against the law's -8. Started from the rows' own
    Gaussian mixture smoothed by ε_max, the flow density is the law's, far rows included."""
    from bdiff.density import DEFENSIVE_SHARE, flow_log_density
    weights, means, variance, levels = [0.995, 0.005], [[0.0, 0.0], [14.0, 14.0]], 0.0022, (1e-4, 4.0)
    base = {"weights": weights, "means": means, "covariances": [np.eye(2) * variance] * 2}
    net = _MixtureScore(weights, means, variance, levels)
    x = np.concatenate([rng.normal(0, 0.047, (50, 2)), rng.normal(14, 0.047, (50, 2))])
    eps = 1e-3
    ours = flow_log_density(net, x, eps, base=base).numpy()
    law = np.logaddexp(np.log(0.995) + _log_normal(x, variance + eps), np.log(0.005) + _log_normal(x - 14, variance + eps))
    exact = np.logaddexp(np.log1p(-DEFENSIVE_SHARE) + law, np.log(DEFENSIVE_SHARE) + _log_normal(x, 1 + eps))
    np.testing.assert_allclose(ours, exact, atol=0.01)
    assert np.all(flow_log_density(net, x[50:], eps).numpy() < exact[50:] - 10)  # without the mixture


def test_the_flow_density_of_a_network_integrates_to_one():
    """Any score network gives a normalised density (a change of variables of the prior):
    an untrained 1-D one, integrated on a grid."""
    import torch
    from bdiff.density import flow_log_density
    from bdiff.fields import FieldModel
    torch.manual_seed(0)
    net = FieldModel(1, width=32, depth=2, arch="separate", param="log", levels=(1e-3, 10.0), fourier=8,
                     fourier_reach=6.0).requires_grad_(False)
    grid = np.linspace(-14, 14, 4001)[:, None]
    density = np.exp(flow_log_density(net, grid, 0.05).numpy())
    assert np.trapezoid(density, grid[:, 0]) == pytest.approx(1.0, abs=0.01)
    assert density.max() < 50  # a proper, finite density, not a spike


@pytest.mark.parametrize("batch", [1 << 15, 3 * 40, 40])  # all dimensions at once, in threes, one by one
def test_the_flow_divergence_is_the_trace_of_the_score_jacobian(monkeypatch, batch):
    """The divergence, batched over dimensions in chunks, against the float64 Jacobian's trace
    of a 7-D network's score, row by row."""
    import torch
    import bdiff.density as density
    from bdiff.fields import FieldModel
    torch.manual_seed(0)
    net = FieldModel(7, width=32, depth=2, arch="separate", param="log", levels=(1e-3, 10.0), fourier=8,
                     fourier_reach=6.0).double().requires_grad_(False)
    x = torch.randn(40, 7, dtype=torch.float64)
    monkeypatch.setattr(density, "DIVERGENCE_BATCH", batch)
    score, divergence = density._score_and_divergence(net, x, 0.1)
    jacobians = [torch.autograd.functional.jacobian(lambda row: net.raw(row[None], 0.1, score_only=True)[1][0], row)
                 for row in x]
    np.testing.assert_allclose(divergence.numpy(), [float(j.trace()) for j in jacobians], rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(score.numpy(), net.raw(x, 0.1, score_only=True)[1].numpy())


class _FlowStubModel(_StubModel):
    """The same N(0, 1), chosen as a flow density: the headline comes from flow_log_density."""
    flow_eps = 0.01

    def flow_log_density(self, values):
        self.flow_rows = len(values)
        return self.log_density(values) - 1.0  # told apart from the field's figure


def test_a_flow_density_is_the_headline_over_a_bounded_subset(rng, monkeypatch):
    import bdiff.metrics
    from bdiff.metrics import held_out_loglik
    rows = rng.normal(size=(2000, 1)).astype(np.float32)
    test = rng.normal(size=(300, 1)).astype(np.float32)
    model = _FlowStubModel()
    monkeypatch.setattr(bdiff.metrics, "FLOW_HELDOUT_ROWS", 120)
    report = held_out_loglik(model, test, rows)
    exact = float(scipy.stats.norm.logpdf(test).mean())
    assert report["density"] == "flow" and report["flow_eps"] == 0.01
    assert model.flow_rows == report["loglik_rows"] == 120
    assert report["loglik"] == pytest.approx(exact - 1.0, abs=0.2)  # a subset's mean
    assert report["loglik_field"] == pytest.approx(exact, abs=0.03)  # the field's, every row


def test_the_eps_search_stops_estimating_normalisers_at_the_first_unreliable_one(monkeypatch):
    """Past the first candidate whose normaliser cannot be estimated no level can be chosen, so
    its importance sampling is not run for the rest (2 s of a 2-D fit's 60 s)."""
    import bdiff.density as density
    from bdiff.fields import FieldModel
    calls = []

    def fake_normaliser(log_p, rows, eps, n, seed):
        calls.append(eps)
        return (1.0, 0.01) if eps < 0.02 else (1.0, 0.5)  # reliable below 0.02 only

    monkeypatch.setattr(density, "normaliser", fake_normaliser)
    net = FieldModel(2, width=8, depth=1, param="log", levels=(1e-3, 1.0))
    rows = torch.randn(40, 2, generator=torch.Generator().manual_seed(0))
    candidates = [0.005, 0.01, 0.03, 0.06, 0.12]
    eps, scores = density.select_eps(net, rows[:10], rows[10:], 0.0, candidates)
    assert calls == [0.005, 0.01, 0.03]
    assert [item[0] for item in scores] == [0.005, 0.01, 0.03]
    assert eps in (0.005, 0.01)
    calls.clear()
    eps, scores = density.select_eps(net, rows[:10], rows[10:], 0.0, [0.03, 0.06])
    assert calls == [0.03] and eps == 0.03  # the first kept when even its own is unreliable


def test_the_flow_level_search_stops_at_the_first_level_that_predicts_worse(monkeypatch):
    """The validation likelihood over the flow's start levels rises to one peak and falls (every
    checkpoint measured, NOTES.md), so the levels below the first one that scores worse than its
    predecessor are not integrated (each is 16 RK4 steps of backward passes)."""
    import bdiff.density as density
    from bdiff.fields import FieldModel
    heights = {0.64: -2.0, 0.16: -1.5, 0.04: -1.6, 0.01: -1.2, 0.0025: -1.1, 1e-3: -1.0}  # a second peak
    calls = []

    def fake_flow(fields_net, rows, eps, steps, base=None):
        calls.append(eps)
        return torch.full((len(rows),), heights[round(eps, 6)], dtype=torch.float64)

    monkeypatch.setattr(density, "flow_log_density", fake_flow)
    net = FieldModel(2, width=8, depth=1, param="log", levels=(1e-3, 10.0))
    rows = torch.randn(20, 2, generator=torch.Generator().manual_seed(0))
    eps, scores = density.select_flow_eps(net, rows, 0.64, None)
    assert calls == [0.64, 0.16, 0.04] and eps == 0.16
    assert scores == [(0.64, -2.0), (0.16, -1.5), (0.04, -1.6)]
    assert density.select_flow_eps(net, rows, 0.64, -1.4)[0] is None  # the field density wins
    heights.update({0.04: -1.4})
    calls.clear()
    assert density.select_flow_eps(net, rows, 0.64, None)[0] == 1e-3 and len(calls) == 6


def test_the_flow_level_search_moves_down_only_on_a_gain_beyond_its_noise(monkeypatch):
    """A few validation rows (a table of 200 rows keeps 20) can favour a sharper level by luck:
    on a skewed 2-D table (engel, 18 validation rows) the search went down to ε_min on a gain of
    0.21 nats with a standard error of 0.24, and the held-out rows lost 0.86 nats a row. A level
    is taken only when its row-by-row gain over the one above is beyond two standard errors."""
    import bdiff.density as density
    from bdiff.fields import FieldModel
    noise = torch.randn(20, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    noise = (noise - noise.mean()) / noise.std()  # sd 1: the gain's standard error is 1/sqrt(20)
    gains = {0.64: 0.0, 0.16: 0.0, 0.04: 0.0, 0.01: 0.0, 0.0025: 0.0, 1e-3: 0.0}

    def fake_flow(fields_net, rows, eps, steps, base=None):
        level = round(eps, 6)
        below = [g for k, g in gains.items() if k >= level]  # the gains down to this level add up
        return -2.0 + sum(below) + noise * (2.0 if level < 0.64 else 0.0)

    monkeypatch.setattr(density, "flow_log_density", fake_flow)
    net = FieldModel(2, width=8, depth=1, param="log", levels=(1e-3, 10.0))
    rows = torch.randn(20, 2, generator=torch.Generator().manual_seed(0))
    gains[0.16] = 0.5  # 0.5 nats against a standard error of 2/sqrt(20) = 0.45: within the noise
    eps, scores = density.select_flow_eps(net, rows, 0.64, None)
    assert eps == 0.64 and [level for level, _ in scores] == [0.64, 0.16]
    gains[0.16] = 1.2  # 2.7 standard errors: taken; the levels below share its noise, so their
    # small gain counts
    gains[0.04] = 0.01
    eps, scores = density.select_flow_eps(net, rows, 0.64, None)
    assert eps == 0.04

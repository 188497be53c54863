"""The samplers against the oracle fields, whose stationary law (data + N(0, εI)) is known."""
import dataclasses
import math

import numpy as np
import pytest
import torch

from bdiff.errors import BdiffError
from bdiff.fields import log_view
from bdiff.model import TrainedModel
from bdiff.losses import fitted_from
from bdiff.metrics import nearest_ratio
from bdiff.sampler import (SMC_WEIGHT_LEVEL, OracleFields, SampleConfig, choose_end_level, level_ladder, sample,
                           support_floor)


def _gaussian_refs(n=3000, seed=0):
    return torch.randn(n, 1, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("sampler", ["bellman", "precond"])
def test_stationary_law_is_kept(sampler):
    """Started in data + N(0, ε), the SDE must keep variance 1 + ε; a wrong drift/diffusion
    pairing (e.g. ∇p dt + sqrt(2p) dW) inflates it."""
    refs, eps = _gaussian_refs(2000), 0.1
    target = refs.var(unbiased=False).item() + eps
    cfg = SampleConfig(sampler=sampler, init="gaussian", proposal_std=float(np.sqrt(target)),
                       steps=500, floor_rel=1e-4, step_frac=0.05, precond_step=0.1)
    x, report = sample(OracleFields(refs, eps), 3000, cfg)
    assert abs(x.mean().item()) < 0.08
    assert x.var().item() == pytest.approx(target, abs=0.08)


@pytest.mark.parametrize("sampler", ["bellman", "precond"])
def test_importance_start_recovers_unbalanced_weights(sampler):
    g = torch.Generator().manual_seed(1)
    refs = torch.cat([torch.randn(2250, 1, generator=g) * 0.3 - 1.2,
                      torch.randn(750, 1, generator=g) * 0.3 + 1.2])
    x, report = sample(OracleFields(refs, 0.02), 4000, SampleConfig(sampler=sampler, steps=50))
    share_right = (x > 0).float().mean().item()
    assert share_right == pytest.approx(0.25, abs=0.03)
    assert report["low_density_share"] < 0.02


def test_gaussian_start_with_bellman_sde_stalls_where_p_is_zero():
    """The known weakness the default avoids: particles far from the data do not move."""
    refs = torch.randn(2000, 1) * 0.1 + 3.0
    cfg = SampleConfig(init="gaussian", steps=50, proposal_std=1.0)
    x, report = sample(OracleFields(refs, 0.01), 2000, cfg)
    assert report["low_density_share"] > 0.5


def test_same_seed_same_samples(tiny_checkpoint):
    model = TrainedModel.load(tiny_checkpoint)
    runs = [sample(model, 500, model.sample_config(seed=s, steps=10))[0] for s in (3, 3, 4)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_bad_sampler_settings(tiny_checkpoint):
    model = TrainedModel.load(tiny_checkpoint)
    for cfg, n in [(SampleConfig(sampler="euler"), 10), (SampleConfig(init="grid"), 10),
                   (SampleConfig(steps=-1), 10), (SampleConfig(), 0), (SampleConfig(batch_size=0), 10),
                   (SampleConfig(sampler="smc", init="importance"), 10)]:
        with pytest.raises(BdiffError):
            sample(model, n, cfg)


def test_untrained_field_is_reported():
    class DeadFields:
        """Linear fields that are zero everywhere: no density to sample."""
        dim, eps, levels, exact_log = 2, 0.1, None, False

        def fields(self, x):
            return torch.zeros(len(x)), torch.zeros_like(x)

        def log_fields(self, x, eps=None):
            return log_view(*self.fields(x))

    with pytest.raises(BdiffError, match="not positive"):
        sample(DeadFields(), 10, SampleConfig())


def test_levelled_samplers_refuse_a_model_without_levels():
    refs = _gaussian_refs(200)
    with pytest.raises(BdiffError, match="noise levels"):
        sample(OracleFields(refs, 0.1), 10, SampleConfig(sampler="smc", init="gaussian"))


def test_smc_weights_are_constant_where_its_proposal_is_the_exact_reverse_step():
    """For one data point, p_ε = N(y, εI) at every level and the anneal's step (mean x + Δ∇log
    p_hi, variance Δ lo/hi) is the exact posterior of the noising step: every move's weight is
    the same, so the only weights left are the start's, p_εmax = N(y, aI) over the start's
    N(0, bI) (a = 4, b = 5), whose effective sample size is (sqrt(a(2b - a))/b)^D
    exp(-|y|²/(2b - a)). A weight with the wrong kernel variance or sign loses most of it.
    The particles end sharp at ε_min."""
    y = torch.tensor([[0.3, -0.2]])
    fields = OracleFields(y, 0.01, levels=(1e-4, 4.0))
    x, report = sample(fields, 4000, SampleConfig(sampler="smc", init="gaussian", steps=60, denoise=False))
    a, b = 4.0, 5.0
    start_ess = (math.sqrt(a * (2 * b - a)) / b) ** 2 * math.exp(-float(y.pow(2).sum()) / (2 * b - a))
    assert report["unsmoothed_ess"] == pytest.approx(start_ess, abs=0.01)  # 0.939
    assert float((x - y).pow(2).sum(1).mean()) == pytest.approx(2 * 1e-4, rel=0.15)  # N(y, ε_min I)


class _FlatFields:
    """A levelled fields source with zero score: the anneal then only adds its noise, so the
    samples' variance is the start's plus the steps' (anything more is a correlated stream)."""
    dim, eps, levels, exact_log = 1, 0.5, (0.5, 1.0), True

    def log_fields(self, x, eps=None):
        return torch.zeros(len(x)), torch.zeros_like(x)

    def score(self, x, eps=None):
        return torch.zeros_like(x)


@pytest.mark.parametrize("seed", [0, 1])
def test_anneal_start_and_step_noise_are_independent(seed):
    """One step from ε_max = 1 to ε_min = 0.5 from N(0, 1 + ε_max): variance 2 + Δ lo/hi = 2.25.
    Seed 0 once seeded each batch's start with the first step's noise stream (x1 = x0 (1 +
    0.5/sqrt 2), variance 3.66), which biased every seed-0 sample of the suite."""
    cfg = SampleConfig(sampler="anneal", init="gaussian", steps=1, denoise=False, seed=seed, batch_size=10_000)
    x, _ = sample(_FlatFields(), 40_000, cfg)
    assert float(x.var()) == pytest.approx(2.25, rel=0.03)


def _wavy(x, eps):
    """Up to ±3 nats: what a network's level-to-level errors look like, exaggerated."""
    return 3 * torch.sin(7 * x[:, 0] + 13 * eps)


class _PerturbedLevels(OracleFields):
    """Exact fields whose log s is off by `error(x, ε)` (default _wavy) at the levels
    `perturbed` picks."""

    def __init__(self, refs, eps, levels, perturbed, error=_wavy):
        super().__init__(refs, eps, levels=levels)
        self.perturbed, self.error = perturbed, error

    def log_fields(self, x, eps=None):
        log_s, score = super().log_fields(x, eps)
        if eps is not None and self.perturbed(eps):
            log_s = log_s + self.error(x, eps)
        return log_s, score


SMC_REFS = torch.tensor([[-1.0, 0.0], [-0.9, 0.1], [1.0, 0.5], [1.2, 0.4], [0.0, 1.5]])


def _last_weighted(eps, levels, steps):
    """The lowest level of the ladder at or above SMC_WEIGHT_LEVEL ε."""
    return min(level for level in level_ladder(levels, steps, levels[0])
               if level >= fitted_from(SMC_WEIGHT_LEVEL * eps))


def test_smc_weights_use_log_s_only_where_the_path_ends():
    """The path's weights telescope: log s at the levels between the start and the last
    weighted level cancels, so errors there must not move a single sample. Resampling
    whenever the running weights dipped acted on those errors; on learned fields it cloned
    particles whose weight later fell back, and one 10 000-particle batch of the unbalanced
    mixture collapsed onto its largest mode (+0.25 of its weight)."""
    eps, levels, steps = 0.01, (1e-3, 4.0), 40
    last = _last_weighted(eps, levels, steps)
    cfg = SampleConfig(sampler="smc", init="gaussian", steps=steps, denoise=False)
    clean, clean_report = sample(OracleFields(SMC_REFS, eps, levels=levels), 2000, cfg)
    noisy, noisy_report = sample(_PerturbedLevels(SMC_REFS, eps, levels, lambda e: e > last * 1.0001), 2000, cfg)
    assert torch.equal(clean, noisy)
    assert clean_report["final_ess"] == pytest.approx(noisy_report["final_ess"], abs=1e-9)
    assert clean_report["weighted_to"] == pytest.approx(last)


def test_smc_weights_stop_above_the_bottom_of_the_densitys_fitted_range():
    """log s is fitted from ε up and least accurate there (its leave-one-out target is most
    biased where a query's own row dominates): weighted at ε, SMC put the mode masses of the
    field density's worst level into the samples (mode-weight error 0.047 on the 10-D mixture,
    0.016 on a 5-D unbalanced one, against 0.008 and 0.006 weighted at 4ε; NOTES.md). Errors of
    log s below SMC_WEIGHT_LEVEL ε must not move a sample; the errors at the last weighted level do."""
    eps, levels, steps = 0.01, (1e-3, 4.0), 40
    last = _last_weighted(eps, levels, steps)
    assert last > 2 * eps
    cfg = SampleConfig(sampler="smc", init="gaussian", steps=steps, denoise=False)
    clean, _ = sample(OracleFields(SMC_REFS, eps, levels=levels), 2000, cfg)
    low, _ = sample(_PerturbedLevels(SMC_REFS, eps, levels, lambda e: e < last * 0.9999), 2000, cfg)
    at_last, _ = sample(_PerturbedLevels(SMC_REFS, eps, levels, lambda e: abs(e / last - 1) < 1e-4), 2000, cfg)
    assert torch.equal(clean, low)
    assert not torch.equal(clean, at_last)


def test_smc_weights_at_the_top_when_the_levels_end_below_the_weight_level():
    """ε_max may lie under SMC_WEIGHT_LEVEL ε (it need only exceed 2ε): the weights then stop at
    ε_max, the start importance-resampled to p_εmax, and the particles anneal down from there."""
    eps, levels = 0.01, (1e-3, 0.03)
    cfg = SampleConfig(sampler="smc", init="gaussian", steps=20, denoise=False)
    x, report = sample(OracleFields(SMC_REFS, eps, levels=levels), 1000, cfg)
    assert report["weighted_to"] == pytest.approx(levels[1])
    assert float(torch.cdist(x, SMC_REFS).min(1).values.max()) < 0.3  # every sample at a row


def _gap_bump(x, eps):
    """A narrow 6-nat bump in the gap between SMC_REFS's rows: 1.7 % of the level's mass, where
    annealing's proposal puts a particle once in a few batches of 2000. The learned log s
    overshoots like this between modes (7 nats, the 1-D line mixture)."""
    gap = torch.tensor([0.1, 0.9], dtype=x.dtype)
    return 6 * torch.exp(-(x - gap).pow(2).sum(1) / (2 * 0.05**2))


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_smc_does_not_clone_one_particle_into_a_share_of_the_samples(seed):
    """Seeds where a particle lands in the bump: with the raw weights it held most of the
    weight (ESS 3-14 %), and resampling cloned it until a row's share of the samples was off by
    0.04-0.12 (0.028 on the line mixture's seed 1, NOTES.md). Pareto-smoothed, no row's share
    is off by more than the bump's 1.7 % and the noise of 2000 samples (sd 0.009)."""
    eps, levels, steps = 0.01, (1e-3, 4.0), 40
    last = _last_weighted(eps, levels, steps)
    fields = _PerturbedLevels(SMC_REFS, eps, levels, lambda e: abs(e / last - 1) < 1e-4, _gap_bump)
    cfg = SampleConfig(sampler="smc", init="gaussian", steps=steps, denoise=False, seed=seed)
    x, report = sample(fields, 2000, cfg)
    shares = torch.bincount(torch.cdist(x, SMC_REFS).argmin(1), minlength=len(SMC_REFS)) / len(x)
    assert float((shares - 1 / len(SMC_REFS)).abs().max()) < 0.035
    assert report["unsmoothed_ess"] < 0.2  # the particle did land in the bump
    assert 0 < report["pareto_k"] < 1


def _steep(x, eps):
    """+40 nats per unit along the first axis: weights no smoothing can make even."""
    return 40 * x[:, 0]


@pytest.mark.parametrize("why", ["low ESS", "heavy tail"])
def test_smc_keeps_annealings_particles_when_its_weights_are_not_trusted(why, monkeypatch):
    """Weights that rest on few particles (an ESS under SMC_MIN_ESS, or Pareto k̂ above 0.7)
    would clone those few: the batch keeps annealing's draws, noise for noise, and says so.
    On breast_cancer (30-D, ESS 11 %) resampling had raised C2ST from 0.538 to 0.592."""
    from bdiff import sampler as sampler_module
    eps, levels, steps = 0.01, (1e-3, 4.0), 40
    last = _last_weighted(eps, levels, steps)
    if why == "low ESS":
        fields = _PerturbedLevels(SMC_REFS, eps, levels, lambda e: abs(e / last - 1) < 1e-4, _steep)
    else:
        fields = OracleFields(SMC_REFS, eps, levels=levels)
        monkeypatch.setattr(sampler_module, "_pareto_smoothed", lambda log_w: (log_w.double(), 0.93))
    cfg = SampleConfig(sampler="smc", init="gaussian", steps=steps, denoise=False)
    x, report = sample(fields, 2000, cfg)
    annealed, _ = sample(fields, 2000, SampleConfig(sampler="anneal", init="gaussian", steps=steps, denoise=False))
    assert torch.equal(x, annealed)
    assert report["corrected_share"] == 0
    assert (report["final_ess"] < sampler_module.SMC_MIN_ESS) == (why == "low ESS")
    assert "not trusted for 100% of the particles" in sampler_module.sampler_warnings(report)[0]


def test_smc_resamples_trusted_weights_and_reports_it():
    eps, levels, steps = 0.01, (1e-3, 4.0), 40
    cfg = SampleConfig(sampler="smc", init="gaussian", steps=steps, denoise=False)
    x, report = sample(OracleFields(SMC_REFS, eps, levels=levels), 2000, cfg)
    annealed, _ = sample(OracleFields(SMC_REFS, eps, levels=levels), 2000,
                         SampleConfig(sampler="anneal", init="gaussian", steps=steps, denoise=False))
    assert report["corrected_share"] == 1 and report["final_ess"] > 0.25
    assert not torch.equal(x, annealed)
    from bdiff.sampler import sampler_warnings
    assert sampler_warnings(report) == []


def test_pareto_smoothing_leaves_what_it_cannot_fit_alone():
    """PSIS fits a generalized Pareto to the largest fifth of the weights (at least five, and
    not all tied): a top-up batch of a few particles, equal weights, or a tail of ties (the
    fit's scale divides by zero) keep their weights and report no k̂. A continuous tail with
    one outlier is fitted, and the outlier's share falls."""
    from bdiff.sampler import _pareto_smoothed
    tied_tail = torch.cat([torch.zeros(999), torch.tensor([8.0])])
    for log_w in (torch.tensor([0.0, 3.0, -1.0]), torch.zeros(1000), tied_tail):
        smoothed, k_hat = _pareto_smoothed(log_w)
        assert k_hat is None and torch.equal(smoothed, log_w.double())
    outlier = torch.cat([0.3 * torch.randn(999, generator=torch.Generator().manual_seed(0)), torch.tensor([8.0])])
    smoothed, k_hat = _pareto_smoothed(outlier)
    assert 0 < k_hat < 1
    assert torch.softmax(smoothed, 0)[-1] < 0.1 * torch.softmax(outlier.double(), 0)[-1]


@pytest.mark.parametrize("n", [25, 226, 10_000])
def test_pareto_smoothing_matches_arviz_stats(n):
    """bdiff.psis (written here to spare `bdiff sample` arviz-stats's 1.4 s of imports) against
    arviz-stats's psislw on heavy-tailed log weights: the same smoothed weights and k̂, from
    n/5 tails (n ≤ 225) to 3 sqrt(n)."""
    from arviz_stats.base import array_stats
    from scipy.special import logsumexp

    from bdiff.psis import pareto_smoothed, tail_size
    rng = np.random.default_rng(n)
    for scale in (0.3, 2.0, 4.0):
        log_w = rng.normal(0, scale, n) + rng.standard_t(2, n)
        theirs, their_k = array_stats.psislw(-log_w)  # it takes log-likelihoods: weights negated
        ours, our_k = pareto_smoothed(log_w)
        assert our_k == pytest.approx(float(their_k), abs=1e-12)
        np.testing.assert_allclose(ours - logsumexp(ours), theirs, atol=1e-12)
        assert (ours != log_w - log_w.max()).sum() <= tail_size(n)  # only the tail moves
    assert (tail_size(225), tail_size(226), tail_size(10_000)) == (45, 45, 300)


def _cluster(seed=0):
    return torch.randn(2000, 2, generator=torch.Generator().manual_seed(seed)) * 0.3


def test_samples_below_the_datas_lowest_density_are_trimmed():
    """Langevin stopped short leaves particles between its broad start and the data, where
    the density is below that of any data row: with the support floor at the data's own lowest
    0.1 %, none may end there, and the n samples still come back, the trimmed ones drawn again."""
    cluster = _cluster()
    oracle = OracleFields(cluster, 0.01)
    cfg = dict(sampler="precond", init="gaussian", proposal_std=1.5, steps=40, precond_step=1.0,
               floor_rel=0.0, delta_rel=0.0, batch_size=1500)
    stray = lambda x: int((torch.cdist(x, cluster).min(1).values > 0.2).sum())  # 2 kernel sds off every row
    loose, loose_report = sample(oracle, 4000, SampleConfig(**cfg))
    oracle.support_log_s = support_floor(oracle.log_fields(cluster)[0])
    kept, report = sample(oracle, 4000, SampleConfig(**cfg))
    assert stray(loose) >= 10 and loose_report["trimmed_share"] is None
    assert stray(kept) == 0 and kept.shape == (4000, 2)
    assert 0.01 < report["trimmed_share"] < 0.1
    first = loose[:1500]  # the first batch, same seeds: its particles above the floor, unchanged
    inside = first[oracle.log_fields(first)[0] >= oracle.support_log_s]
    assert len(inside) < 1500 and torch.equal(kept[:len(inside)], inside)
    untrimmed, report = sample(oracle, 4000, SampleConfig(**cfg, trim=False))
    assert torch.equal(untrimmed, loose) and report["trimmed_share"] is None


def test_support_floor_is_the_lowest_tenth_of_a_percent():
    log_s = torch.arange(5000, dtype=torch.float32)
    assert support_floor(log_s) == 4.0  # the 5th lowest of 5000: a row's own value
    assert support_floor(torch.cat([log_s, torch.tensor([-math.inf])])) is None  # a linear s ≤ 0 somewhere


def test_small_data_sets_no_support_floor():
    """The lowest of n < 1000 rows stands for the lowest 1/(n + 1) of the law, not 0.1 %: on 10
    rows of a 2-D Gaussian, trimming below it drew again 6.4 % of the samples, cutting the tails."""
    assert support_floor(torch.arange(999, dtype=torch.float32)) is None
    assert support_floor(torch.arange(1000, dtype=torch.float32)) == 0.0


def test_a_model_that_misses_its_data_is_not_trimmed_forever():
    cluster = _cluster()
    oracle = OracleFields(cluster, 0.01, levels=(1e-3, 4.0))
    oracle.support_log_s = float(oracle.log_fields(cluster)[0].max())  # above almost every sample
    with pytest.raises(BdiffError, match="--no-trim"):
        sample(oracle, 1000, SampleConfig(sampler="anneal", init="gaussian", steps=20))


def test_the_report_averages_batches_by_their_particles(monkeypatch):
    """Batches of 1000, 1000 and 500 (or a few trimmed particles drawn again): the report's ESS
    is the particles' mean, not the batches', where a small batch would count as much as a full one."""
    from bdiff import sampler as sampler_module
    seen = []

    def recording_run(fields, x, cfg, plan, generator):
        x, extra = sampler_module.run_smc(fields, x, cfg, plan, generator)
        seen.append((len(x), extra["final_ess"]))
        return x, extra

    monkeypatch.setitem(sampler_module.SAMPLERS, "smc", sampler_module.Sampler(
        recording_run, needs_levels=True))
    refs = torch.tensor([[-1.0, 0.0], [1.0, 0.5], [0.0, 1.5]])
    cfg = SampleConfig(sampler="smc", init="gaussian", steps=10, batch_size=1000)
    _, report = sample(OracleFields(refs, 0.05, levels=(1e-3, 4.0)), 2500, cfg)
    assert [count for count, _ in seen] == [1000, 1000, 500]
    assert len({round(ess, 6) for _, ess in seen}) == 3
    assert report["final_ess"] == pytest.approx(sum(c * e for c, e in seen) / 2500, abs=1e-12)


def test_smc_warning_names_a_small_untrusted_share_exactly():
    """A top-up batch (particles drawn again after trimming) is judged on its own weights: 25
    untrusted particles of 10 025 once read "not trusted for 0% of the particles"."""
    from bdiff.sampler import sampler_warnings
    (warning,) = sampler_warnings({"corrected_share": 1 - 25 / 10_025})
    assert "not trusted for 0.25% of the particles" in warning
    (warning,) = sampler_warnings({"corrected_share": 0.6})
    assert "not trusted for 40% of the particles" in warning


class _GaussianLevels:
    """The exact fields of N(0, I) smoothed at every level: p_ℓ = N(0, (1 + ℓ) I). Its samples
    are fresh draws of the law, never copies of any rows."""
    dim, eps, levels, exact_log, support_log_s = 2, 0.05, (1e-4, 4.0), True, None

    def log_fields(self, x, eps=None):
        var = 1 + (self.eps if eps is None else eps)
        return -0.5 * x.pow(2).sum(1) / var - math.log(2 * math.pi * var), -x / var

    def score(self, x, eps=None):
        return self.log_fields(x, eps)[1]


def test_an_end_level_ends_the_anneal_there_with_its_blur():
    """Samples ending at ℓ are p_ℓ's: variance 1 + ℓ, not denoised back to the floor's 1."""
    cfg = SampleConfig(sampler="smc", init="gaussian", steps=100, seed=0, denoise=True)
    low, _ = sample(_GaussianLevels(), 40_000, cfg)
    high, report = sample(_GaussianLevels(), 40_000, dataclasses.replace(cfg, end_level=0.3))
    assert float(low.var()) == pytest.approx(1.0, abs=0.03)
    assert float(high.var()) == pytest.approx(1.3, abs=0.04)
    assert report["end_level"] == 0.3
    with pytest.raises(BdiffError, match="end level"):
        sample(_GaussianLevels(), 10, dataclasses.replace(cfg, end_level=5.0))


def test_nearest_ratio_is_one_for_fresh_rows_and_near_zero_for_copies():
    rows = torch.randn(1000, 2, generator=torch.Generator().manual_seed(0))
    fresh = torch.randn(2000, 2, generator=torch.Generator().manual_seed(1))
    assert 0.85 < nearest_ratio(fresh, rows) < 1.15
    assert nearest_ratio(rows[:500] + 1e-3, rows) < 0.05
    assert nearest_ratio(fresh, torch.cat([rows, rows])) is None  # every row repeated: atoms, no scale


def test_samples_of_a_model_that_copies_its_rows_end_where_fresh_rows_would_sit():
    """The exact fields of 150 rows at every level: at ε_min the anneal returns the rows
    themselves (a small table trained to the cap does the same). The end level is raised until
    the samples sit as far from the rows as fresh draws of the law do, no further than ε."""
    rows = torch.randn(150, 2, generator=torch.Generator().manual_seed(0))
    oracle = OracleFields(rows, 0.3, levels=(1e-4, 4.0))
    cfg = SampleConfig(sampler="smc", init="gaussian", steps=100, seed=0, denoise=True)
    copies, _ = sample(oracle, 2000, cfg)
    level, ratios = choose_end_level(oracle, rows, cfg)
    ended, _ = sample(oracle, 2000, dataclasses.replace(cfg, end_level=level))
    assert nearest_ratio(copies, rows) < 0.2 and ratios[1e-4] < 0.2
    assert 1e-4 < level <= 0.3 and 0.85 < nearest_ratio(ended, rows) < 1.2
    assert choose_end_level(_GaussianLevels(), torch.randn(2000, 2), cfg)[0] == 1e-4

"""Level-conditioned fields (the fields of p_ε for a range of ε) and the annealed sampler."""
import numpy as np
import pytest
import torch

from bdiff.errors import BdiffError
from bdiff.fields import FieldModel
from bdiff.losses import LOG_NORMAL_MEAN, LOG_NORMAL_SD, draw_levels, noise_levels
from bdiff.model import TrainedModel
from bdiff.sampler import LADDER_RHO, OracleFields, default_sample_config, level_ladder, sample
from bdiff.trainer import (BATCH, FOURIER_FEATURES, FOURIER_REACH, LOW_DIM_BATCH, LOW_DIM_WIDTH,
                           SMALL_BATCH, WIDTH, FitConfig, Trainer)


def _two_clusters(dim=16, n=2000, small=0.2, seed=0):
    """Two tight clusters (std 0.15) at ±3 along the first axis, weights 1 - small and small,
    standardised per dimension as the trainer would."""
    g = torch.Generator().manual_seed(seed)
    centre = torch.zeros(dim)
    centre[0] = 3.0
    n_small = int(small * n)
    refs = torch.cat([torch.randn(n - n_small, dim, generator=g) * 0.15 - centre,
                      torch.randn(n_small, dim, generator=g) * 0.15 + centre])
    return (refs - refs.mean(0)) / refs.std(0)


def test_levelled_defaults_correct_tables_with_the_density_and_anneal_images():
    from bdiff.sampler import IMAGE_LEVELS
    table = default_sample_config("log", True)
    image = default_sample_config("log", True, image=True)
    assert (table.sampler, table.steps, table.init) == ("smc", 200, "gaussian")
    assert (image.sampler, image.steps) == ("anneal", IMAGE_LEVELS)
    assert default_sample_config("log", True, sampler="anneal").sampler == "anneal"


def test_annealing_with_exact_fields_recovers_unbalanced_weights():
    """Down the ladder of p_ε the particles split between the clusters by mass; Langevin at the
    smallest ε alone splits them by basin (the weakness annealing removes)."""
    refs, eps = _two_clusters(), 0.02
    levels = noise_levels(refs, eps, "log", eps_floor=eps)
    oracle = OracleFields(refs, eps, levels=levels)
    x, report = sample(oracle, 2000, default_sample_config("log", True, sampler="anneal", steps=100, denoise=False))
    assert report["sampler"] == "anneal" and report["levels"] == list(levels)
    assert (x[:, 0] > 0).float().mean().item() == pytest.approx(0.2, abs=0.03)
    # the stationary law data + N(0, εI): unit variance plus ε across the cluster
    assert x[:, 1:].var().item() == pytest.approx(1 + eps, abs=0.08)
    x, _ = sample(OracleFields(refs, eps), 2000, default_sample_config("log", steps=300))
    assert (x[:, 0] > 0).float().mean().item() < 0.18


def _skewed_clusters(n=3000, seed=0):
    """A 2-D table most of whose mass sits in one cluster, with two 5 % clusters far out
    (sd 0.25, standardised as the trainer would), and each row's cluster."""
    rng = np.random.default_rng(seed)
    counts = [int(n * 0.9), int(n * 0.05), n - int(n * 0.9) - int(n * 0.05)]
    centres = [(-2.4, 1.0), (1.2, 3.2), (3.8, -2.8)]
    rows = np.concatenate([rng.normal(c, 0.25, (k, 2)) for c, k in zip(centres, counts)])
    rows = (rows - rows.mean(0)) / rows.std(0)
    return torch.from_numpy(rows).float(), np.repeat(np.arange(3), counts)


def test_annealing_starts_from_the_rows_mixture_at_the_broadest_level():
    """Twice the data's variance does not blur a skewed table into one Gaussian: from
    N(0, (1 + ε_max) I) the exact fields' anneal gave the farthest 5 % cluster 3.7-4.1 % of the
    particles (seeds 0-2, 4000 each). From the rows' BIC mixture smoothed by ε_max (fit stores
    it as flow_base) the start is p_ε_max's own, and each cluster keeps its share."""
    from bdiff.density import flow_base
    from bdiff.losses import data_clusters
    refs, labels = _skewed_clusters()
    eps = 0.005
    oracle = OracleFields(refs, eps, levels=noise_levels(refs, eps, "log"),
                          base_mixture=flow_base(data_clusters(refs, 0)))
    centres = torch.stack([refs[torch.from_numpy(labels == k)].mean(0) for k in range(3)])
    x, _ = sample(oracle, 8000, default_sample_config("log", True, sampler="anneal"))
    shares = np.bincount(torch.cdist(x, centres).argmin(1).numpy(), minlength=3) / len(x)
    assert shares == pytest.approx(np.bincount(labels) / len(labels), abs=0.006)


def test_top_level_is_the_smoothed_mixture_with_systematic_shuffled_shares():
    """TopLevel: log p_ε_max is the mixture with ε_max added to each covariance, each component
    gets n·w rounded up or down of the start (no multinomial noise), and the components come
    shuffled: a user who keeps the first rows keeps every mode's share."""
    from scipy.special import logsumexp
    from scipy.stats import multivariate_normal
    from sklearn.mixture import GaussianMixture as SkMixture

    from bdiff.density import TopLevel, flow_base
    refs, _ = _skewed_clusters(n=1000)
    fitted = SkMixture(3, random_state=0).fit(refs.double().numpy())
    points = torch.randn(50, 2, generator=torch.Generator().manual_seed(1)) * 2
    expected = logsumexp([np.log(w) + multivariate_normal(m, c + 0.5 * np.eye(2)).logpdf(points.numpy())
                          for w, m, c in zip(fitted.weights_, fitted.means_, fitted.covariances_)], axis=0)
    assert np.allclose(TopLevel(flow_base(fitted), 0.5, 2, "cpu").log_prob(points).numpy(), expected, atol=1e-9)
    # at a level far below the clusters' gaps each point's nearest centre is its component
    x = TopLevel(flow_base(fitted), 1e-6, 2, "cpu").sample(5000, torch.Generator().manual_seed(0), "cpu")
    labels = torch.cdist(x.double(), torch.from_numpy(fitted.means_)).argmin(1).numpy()
    assert np.abs(np.bincount(labels, minlength=3) - 5000 * fitted.weights_).max() <= 1
    assert np.bincount(labels[:500], minlength=3) / 500 == pytest.approx(fitted.weights_, abs=0.04)
    assert x.dtype == torch.float32
    gaussian = TopLevel(None, 0.5, 2, "cpu")
    assert np.allclose(gaussian.log_prob(points).numpy(),
                       multivariate_normal(np.zeros(2), 1.5 * np.eye(2)).logpdf(points.numpy()), atol=1e-9)


def test_ladder_spends_its_levels_where_coarse_annealing_loses_mass_and_spread():
    """With exact fields and only 20 levels in 8-D, the ladder even in σ^(1/3) keeps the small
    cluster's weight (0.2) and the clusters' spread (1.0): measured 0.186 and 0.858, where the
    geometric ladder gave 0.165 and 0.793."""
    refs = _two_clusters(dim=8, n=2000)
    oracle = OracleFields(refs, 0.02, levels=noise_levels(refs, 0.02, "log"))
    ladder = level_ladder(oracle.levels, 20, oracle.levels[0])
    assert ladder[0] == pytest.approx(oracle.levels[1]) and ladder[-1] == pytest.approx(oracle.levels[0])
    roots = np.power(ladder, 1 / (2 * LADDER_RHO))  # σ^(1/ρ)
    assert np.allclose(np.diff(roots), (roots[-1] - roots[0]) / 20)
    x, _ = sample(oracle, 4000, default_sample_config("log", True, steps=20, seed=1))
    assert (x[:, 0] > 0).float().mean().item() == pytest.approx(0.2, abs=0.025)
    assert x[:, 1:].var().item() > 0.83


def test_annealing_ends_below_the_density_eps_so_samples_carry_no_blur():
    """With exact fields the anneal sampler's samples have the data's spread, not p_ε's: it
    ends at ε_min far below ε and denoises. Ending at ε (the old default) gives variance 1 + ε."""
    refs, eps = _two_clusters(dim=4, n=3000), 0.5
    oracle = OracleFields(refs, eps, levels=noise_levels(refs, eps, "log"))
    assert oracle.levels[0] == pytest.approx(1e-4)
    x, _ = sample(oracle, 3000, default_sample_config("log", True, steps=100))
    assert x[:, 1:].var().item() == pytest.approx(1.0, abs=0.08)
    at_eps = OracleFields(refs, eps, levels=noise_levels(refs, eps, "log", eps_floor=eps))
    x, _ = sample(at_eps, 3000, default_sample_config("log", True, steps=100, denoise=False))
    assert x[:, 1:].var().item() > 1.3


def test_noise_levels_rule_and_errors():
    refs = torch.randn(500, 4, generator=torch.Generator().manual_seed(0)) * 2.0
    eps_min, eps_max = noise_levels(refs, 0.1, "log")
    assert eps_min == 1e-4 and eps_max == pytest.approx(2 * float(refs.var(0).sum()))
    assert noise_levels(refs, 1e-5, "log")[0] == 1e-5  # never above the density's ε
    assert noise_levels(refs, 0.1, "log", eps_max=5.0, eps_floor=0.01) == (0.01, 5.0)
    with pytest.raises(BdiffError, match="must not exceed"):
        noise_levels(refs, 0.1, "log", eps_floor=0.2)
    with pytest.raises(BdiffError, match="needs noise levels"):  # not silently ignored
        noise_levels(refs, 0.1, "log", eps_max=0, eps_floor=0.01)
    assert noise_levels(refs, 0.1, "log", eps_max=0) is None
    assert noise_levels(refs, 0.1, "linear") is None
    with pytest.raises(BdiffError, match="log fields"):
        noise_levels(refs, 0.1, "linear", eps_max=5.0)
    with pytest.raises(BdiffError, match="twice"):
        noise_levels(refs, 0.1, "log", eps_max=0.15)


@pytest.mark.parametrize("levels", [(1e-4, 4.0), (1e-4, 127.7), (0.5, 3.0)])
def test_drawn_levels_fall_one_in_each_stratum_of_their_law(levels):
    """Stratified draws: the k-th of n levels lies between the law's k/n and (k+1)/n quantiles,
    against scipy's truncated normal (log-normal) and plain log-uniform quantiles."""
    from scipy.stats import truncnorm
    count, generator = 8, torch.Generator().manual_seed(3)
    log_range = np.log(levels)
    law = truncnorm(*(log_range - LOG_NORMAL_MEAN) / LOG_NORMAL_SD, loc=LOG_NORMAL_MEAN, scale=LOG_NORMAL_SD)
    edges = {"log-uniform": np.linspace(*log_range, count + 1),
             "log-normal": law.ppf(np.linspace(0, 1, count + 1))}
    for sampling, bounds in edges.items():
        for _ in range(20):
            drawn = np.log(draw_levels(count, levels, sampling, generator))
            assert np.all(drawn >= bounds[:-1] - 1e-9) and np.all(drawn <= bounds[1:] + 1e-9)
    # the log-normal law centres training on the data's scale: most levels between 0.03 and 4
    many = np.concatenate([draw_levels(count, (1e-4, 127.7), "log-normal", generator) for _ in range(200)])
    assert 0.6 < np.mean((many > 0.03) & (many < 4)) < 0.75


def _images_and_table():
    """60 integer 4×4 images and a 60-row 2-D table."""
    rng = np.random.default_rng(0)
    return rng.integers(0, 17, size=(60, 16)).astype(np.float32), rng.normal(size=(60, 2)).astype(np.float32)


def test_level_sampling_defaults_to_log_normal_for_images_only():
    images, table = _images_and_table()
    assert Trainer(images, FitConfig(steps=1, width=8), "images", (4, 4)).cfg.level_sampling == "log-normal"
    assert Trainer(table, FitConfig(steps=1, width=8)).cfg.level_sampling == "log-uniform"
    chosen = Trainer(images, FitConfig(steps=1, width=8, level_sampling="log-uniform"), "images", (4, 4))
    assert chosen.cfg.level_sampling == "log-uniform"
    with pytest.raises(BdiffError, match="unknown --level-sampling"):
        FitConfig(level_sampling="cubic").validate()


def test_level_model_contract():
    torch.manual_seed(0)
    model = FieldModel(5, 16, 2, arch="separate", param="log", levels=(0.1, 10.0))
    x = torch.randn(7, 5)
    log_s, score = model.log_fields(x)
    assert log_s.shape == (7,) and score.shape == (7, 5)
    # no ε means the model's own ε_min; ε may be one number or one per row
    assert torch.equal(model.log_fields(x, 0.1)[1], score)
    per_row = torch.tensor([0.1, 10.0, 0.5, 0.1, 2.0, 3.0, 0.1])
    mixed = model.log_fields(x, per_row)[1]
    assert torch.allclose(mixed[1], model.log_fields(x[1:2], 10.0)[1][0])
    s, g = model(x, 2.0)
    assert torch.allclose(g, s.unsqueeze(1) * model.log_fields(x, 2.0)[1], rtol=1e-5)
    assert torch.equal(model.score_batched(x, eps=per_row), mixed)  # the score network alone
    # preconditioned: with the score network's last layer at zero the score is that of
    # N(0, (1 + ε) I), p_ε of standardised Gaussian data, at every level
    torch.nn.init.zeros_(model.gradient_net[-1].weight)
    torch.nn.init.zeros_(model.gradient_net[-1].bias)
    for eps in (0.1, 10.0):
        assert torch.allclose(model.log_fields(x, eps)[1], -x / (1 + eps), atol=1e-6)
    with pytest.raises(ValueError):
        FieldModel(5, 16, 2, param="linear", levels=(0.1, 10.0))
    with pytest.raises(ValueError):
        FieldModel(5, 16, 2, param="log", levels=(1.0, 0.5))


def test_fourier_features_at_a_level_are_those_of_the_blurred_input():
    """At level ε the features are E[sin, cos(w·(u + n))] with n ~ N(0, ε/(1 + ε) I) on the
    scaled input u = x / sqrt(1 + ε): a broad level carries none of the detail its p_ε lacks."""
    model = FieldModel(3, 16, 2, arch="separate", param="log", levels=(1e-3, 10.0), fourier=6,
                       fourier_reach=12.0).double()
    lengths = model.frequencies.norm(dim=0)
    assert model.frequencies.shape == (3, 6) and torch.all((lengths > 0.5 - 1e-6) & (lengths < 12 + 1e-5))
    g = torch.Generator().manual_seed(0)
    u = torch.randn(5, 3, generator=g, dtype=torch.float64)
    for eps in (1e-3, 0.05, 1.0):
        blur = eps / (1 + eps)
        features = torch.cat(model._fourier_features(u, torch.full((5,), blur, dtype=torch.float64)), 1)
        noise = torch.randn(200_000, 1, 3, generator=g, dtype=torch.float64) * blur ** 0.5
        phase = (u + noise) @ model.frequencies
        expected = torch.cat([torch.sin(phase).mean(0), torch.cos(phase).mean(0)], 1)
        assert torch.allclose(features, expected, atol=0.01), eps
    # the same seed draws the same frequencies; without levels the features are undamped
    assert torch.equal(FieldModel(3, 8, 1, fourier=6, fourier_reach=12.0).frequencies, model.frequencies.float())
    plain = FieldModel(3, 8, 1, param="log", fourier=6, fourier_reach=12.0)
    phase = u.float() @ plain.frequencies
    assert torch.equal(torch.cat(plain._fourier_features(u.float()), 1), torch.cat([phase.sin(), phase.cos()], 1))


def test_fourier_features_default_to_low_dimensional_tables_with_noise_levels():
    images, table = _images_and_table()
    # 1-D and 2-D: 32 per column (in 1-D 64 left the scalar field's normaliser at 1.36; NOTES.md)
    assert Trainer(table, FitConfig(steps=1, width=8)).cfg.fourier == 2 * FOURIER_FEATURES
    assert Trainer(table[:, :1], FitConfig(steps=1, width=8)).cfg.fourier == FOURIER_FEATURES
    # up to 4 columns; in 5-D and up they measured worse (mixture10d, diabetes; NOTES.md)
    rng = np.random.default_rng(1)
    assert Trainer(rng.normal(size=(60, 3)), FitConfig(steps=1, width=8)).cfg.fourier == FOURIER_FEATURES
    assert Trainer(rng.normal(size=(60, 4)), FitConfig(steps=1, width=8)).cfg.fourier == FOURIER_FEATURES
    assert Trainer(rng.normal(size=(60, 5)), FitConfig(steps=1, width=8)).cfg.fourier == 0
    assert Trainer(images, FitConfig(steps=1, width=8), "images", (4, 4)).cfg.fourier == 0
    assert Trainer(table, FitConfig(steps=1, width=8, eps_max=0)).cfg.fourier == 0  # no levels
    chosen = Trainer(table, FitConfig(steps=1, width=8, fourier=5))
    assert chosen.cfg.fourier == 5 and chosen.model.frequencies.shape == (2, 5)
    # reach: 2/sqrt(ε) radians per standardised unit, detail down to half p_ε's kernel width
    assert float(chosen.model.frequencies.norm(dim=0).max()) <= FOURIER_REACH / chosen.eps_train ** 0.5 + 1e-4
    for bad in (-1, 1.5, 10**6):
        with pytest.raises(BdiffError, match="--fourier"):
            FitConfig(fourier=bad).validate()


def test_in_place_activations_without_gradients_give_the_same_fields():
    """Sampling runs the networks without gradients, their SiLU in place: the same fields, to the
    bit, as with gradients on (where it is not in place and backpropagates)."""
    torch.manual_seed(0)
    net = FieldModel(2, 16, 3, arch="separate", param="log", levels=(1e-4, 4.0), fourier=8)
    x = torch.randn(50, 2)
    with torch.no_grad():
        quiet = net.log_fields(x, 0.3)
    loud = net.log_fields(x, 0.3)
    assert all(torch.equal(a, b) for a, b in zip(quiet, loud))
    loud[0].sum().backward()  # the graph survives: nothing it needs was overwritten
    assert net.scalar_net[0].weight.grad.abs().sum() > 0


def test_low_dimensional_tables_default_to_narrow_networks_on_half_the_batch():
    """1-D and 2-D tables with noise levels: width 128 on batches of 512 (a third of the fitting
    cost); wider data, images and models without levels keep width 256 on 1024; under 1000 rows
    the batch is 128 in every case; what the user sets wins."""
    rng = np.random.default_rng(2)

    def chosen(rows, dim, **options):
        cfg = Trainer(rng.normal(size=(rows, dim)).astype(np.float32), FitConfig(steps=1, **options)).cfg
        return cfg.width, cfg.batch_size

    assert chosen(1200, 1) == chosen(1200, 2) == (LOW_DIM_WIDTH, LOW_DIM_BATCH)
    assert chosen(1200, 3) == (WIDTH, BATCH)
    assert chosen(1200, 2, eps_max=0) == (WIDTH, BATCH)  # no levels: no Fourier features either
    assert chosen(200, 2) == (LOW_DIM_WIDTH, SMALL_BATCH) and chosen(200, 5) == (WIDTH, SMALL_BATCH)
    assert chosen(1200, 2, width=96, batch_size=300) == (96, 300)
    images, _ = _images_and_table()
    image_cfg = Trainer(images, FitConfig(steps=1), "images", (4, 4)).cfg
    assert (image_cfg.width, image_cfg.batch_size) == (WIDTH, SMALL_BATCH)
    assert LOW_DIM_WIDTH < WIDTH and LOW_DIM_BATCH < BATCH


def test_level_model_fits_unbalanced_clusters_and_survives_save_load(tmp_path):
    """A short level-conditioned fit in 16-D: the annealed samples keep the 80/20 split and the
    cluster shape, and save→load gives identical fields at every level."""
    data = _two_clusters().numpy()
    path = tmp_path / "levels.safetensors"
    trainer = Trainer(data, FitConfig(steps=500, width=96, depth=2, batch_size=512), "clusters")
    assert trainer.cfg.param == "log" and trainer.levels is not None
    assert trainer.cfg.arch == "separate" and trainer.cfg.eps_rule == "heldout"
    assert trainer.cfg.fourier == 0  # 16 columns: no Fourier features by default
    trainer.run(str(path))
    model = TrainedModel.load(path)
    assert model.levels == pytest.approx(trainer.levels)
    probe = torch.randn(9, 16)
    for eps in (model.levels[0], 1.0, model.levels[1]):
        expected = trainer.ema.log_fields(probe, eps)
        loaded = model.log_fields(probe, eps)
        assert torch.equal(expected[0], loaded[0]) and torch.equal(expected[1], loaded[1])
    cfg = model.sample_config()
    assert cfg.sampler == "smc"  # annealing corrected by the learned density: the tables' default
    x, report = model.sample(2000, cfg)
    values = model.standardizer.inverse(x.numpy())
    # against the same sampler on the exact fields of the same ε: the split between the
    # clusters and the spread across them, the data's (Langevin at ε alone gives 1.32 here)
    oracle = OracleFields(torch.from_numpy(model.standardizer.forward(data)), model.eps, levels=model.levels)
    exact, _ = sample(oracle, 2000, cfg)
    exact = model.standardizer.inverse(exact.numpy())  # in data units, as the model's samples
    midpoint = 0.5 * (data[data[:, 0] < 0, 0].mean() + data[data[:, 0] > 0, 0].mean())
    assert np.mean(values[:, 0] > midpoint) == pytest.approx(np.mean(exact[:, 0] > midpoint), abs=0.05)
    assert values[:, 1:].var() == pytest.approx(float(data[:, 1:].var()), abs=0.15)


def test_short_digits_fit_gives_recognisable_varied_digits(tmp_path):
    """1000 steps (~20 s) on the 8×8 digits with the defaults for 64-D (log fields, held-out ε,
    noise levels, anneal sampler). Measured FD 12 here (5 at 5000 steps); one ε with Langevin
    gave 42-89 at 3000-5000 steps, so the bound fails without annealing."""
    from bdiff.data import load_data
    from bdiff.images import image_metrics, pixel_metrics
    train, heldout = load_data("digits").values, load_data("digits", split="heldout").values
    path = tmp_path / "digits.safetensors"
    Trainer(train, FitConfig(steps=1000, width=192), "digits", (8, 8)).run(str(path))
    model = TrainedModel.load(path)
    x, report = model.sample(1000, model.sample_config(steps=100))
    metrics = image_metrics(model.standardizer.inverse(x.numpy()), heldout, train)
    assert report["low_density_share"] == 0.0
    assert metrics["digits_fd"] < 20 and metrics["classes_present"] == 10
    assert metrics["class_entropy"] > 2.2 and metrics["mean_confidence"] > 0.85
    # pixels: on the data's grid and in its range, blank pixels as quiet as the data's (raw
    # pixels sampled at the density's ε: 23 % outside, blank sd 2.2 against 0.4)
    pixels = pixel_metrics(model.standardizer.inverse(x.numpy()), heldout, train)
    assert pixels["pixel_outside_share"] == 0.0
    assert pixels["blank_pixel_sd"] < 1.5 * pixels["blank_pixel_sd_ideal"]

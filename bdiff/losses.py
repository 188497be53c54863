"""Gaussian-smoothed field matching: the query proposal, the targets and the three losses."""
import math

import numpy as np
import torch

from bdiff.backend import draw, field_matching
from bdiff.density import bic_gaussian_mixture
from bdiff.errors import BdiffError

GRAD_LOSSES = ("direct", "divergence", "sliced")
EPS_RULES = ("auto", "silverman", "scott", "heldout")  # auto: heldout
WIDE_NOISE = 4.0  # wide queries of level ε: rows plus N(0, (WIDE_NOISE² ε) I)
LEVEL_GROUPS = 8  # noise levels per batch for level-conditioned fields, stratified in log ε
LEVEL_SAMPLINGS = ("log-uniform", "log-normal")
# log-normal: EDM's training levels (Karras et al. 2022), ln σ ~ N(-1.2, 1.2²) for data of sd 0.5,
# rescaled to standardised data (sd 1) and to the variance ε = σ²
LOG_NORMAL_MEAN, LOG_NORMAL_SD = 2 * (-1.2 + math.log(2)), 2 * 1.2


def bandwidth(n, dim, rule="silverman"):
    """ε = h² from a pooled rule of thumb on standardised data (unit variance per dimension)."""
    if rule == "silverman":
        h = (4 / (dim + 2)) ** (1 / (dim + 4)) * n ** (-1 / (dim + 4))
    elif rule == "scott":
        h = n ** (-1 / (dim + 4))
    else:
        raise ValueError(f"unknown bandwidth rule {rule!r}")
    return h * h


def _heldout_grid(held, rest, backend):
    """(ε, log p_ε of each held row as field_matching's float32 log-mean-kernel, the Gaussian's
    log normaliser) over a log grid around Silverman's rule, p_ε built from the rows `rest`."""
    dim = held.shape[1]
    base = bandwidth(len(rest), dim)
    for eps in (base * 2.0 ** (k / 2) for k in range(-12, 5)):
        lse, _ = field_matching(held, rest, eps, None, backend)
        yield eps, lse, 0.5 * dim * math.log(2 * math.pi * eps)


# Rows held out to choose ε: a fifth of the data up to this many. Their mean log-likelihood is
# known to a few hundredths of a nat with them; each held row costs a pass over all the others
# per grid value (a fifth of 200 000 rows: 147 s of preparation, 2 cores).
HELDOUT_MAX_ROWS = 10_000


def heldout_bandwidth(refs, generator, holdout=0.2, backend=None):
    """ε maximising the held-out log-likelihood of p_ε built from the other rows (docs/design.md §1.2),
    over a log grid around Silverman's rule; returns ε and the grid's (ε, log-likelihood)."""
    order = draw(torch.randperm, len(refs), generator=generator, device=refs.device)
    cut = min(max(1, int(holdout * len(refs))), HELDOUT_MAX_ROWS)
    held, rest = refs[order[:cut]], refs[order[cut:]]
    scores = [(eps, float(lse.mean()) - log_norm) for eps, lse, log_norm in _heldout_grid(held, rest, backend)]
    best = max(scores, key=lambda item: item[1])[0]
    return best, scores


def heldout_row_logliks(held, rest, backend=None):
    """Per-row log-likelihoods (float64 numpy) of the rows `held` under p_ε built from `rest`, at
    the ε of heldout_bandwidth's grid with the best mean."""
    rows = [lse.double() - log_norm for _, lse, log_norm in _heldout_grid(held, rest, backend)]
    return max(rows, key=lambda per_row: float(per_row.mean())).cpu().numpy()


EPS_FLOOR = 1e-4  # default ε_min: a blur of 1 % of a standard deviation (standardised units)


def noise_levels(refs, eps, param, eps_max=None, eps_floor=None):
    """(ε_min, ε_max) of level-conditioned fields, or None for fields at ε alone.

    eps_max None: automatic, levels for log fields only, up to twice the data's total
    variance (the mean squared distance between two rows), where p_ε's bumps overlap (the
    annealing samplers start there, from density.TopLevel), and at least 4ε (a table of a few rows has
    a density ε as broad as the data). 0: no levels.
    eps_floor: ε_min, where the annealed sampler ends, below the density's ε so that samples
    follow the data rather than p_ε's N(0, εI) blur; None: EPS_FLOOR (or ε if smaller)."""
    if eps_max == 0 or (eps_max is None and param != "log"):
        if eps_floor is not None:
            raise BdiffError("--eps-floor sets the lowest noise level; it needs noise levels (log "
                             "fields, --eps-max not 0)")
        return None
    if param != "log":
        raise BdiffError("noise levels (--eps-max) need log fields (--param log)")
    if eps_max is None:
        eps_max = max(2 * float(refs.var(0).sum()), 4 * eps)
    if not eps_max > 2 * eps:
        raise BdiffError(f"--eps-max {eps_max:.4g} must exceed twice ε = {eps:.4g} (0 turns levels off)")
    eps_min = min(EPS_FLOOR, eps) if eps_floor is None else eps_floor
    if eps_min > eps:
        raise BdiffError(f"--eps-floor {eps_min:.4g} must not exceed ε = {eps:.4g}")
    return eps_min, eps_max


def smoothed_targets(queries, refs, eps, log_c, exclude=None, backend=None):
    """ŝ and ĝ at the queries, both scaled by exp(-log C) (docs/design.md §1.1)."""
    lse, mean = field_matching(queries, refs, eps, exclude, backend)
    s = torch.exp(lse - log_c)
    return s, s.unsqueeze(1) * mean


def log_normaliser(refs, eps, generator, probe=4096, backend=None):
    """Global log C: the median log ŝ over data points (self excluded), so targets are O(1)."""
    idx = draw(torch.randperm, len(refs), generator=generator, device=refs.device)[:probe]
    lse, _ = field_matching(refs[idx], refs, eps, idx, backend)
    return float(lse.median())


def draw_queries(refs, batch, eps, mix, perturb_scale, broad_std, generator, spread=False):
    """Queries from μ = data, data + N(0, (k²ε)I) and a broad Gaussian, in proportions `mix`.

    spread=True draws k per query uniformly in [0, perturb_scale]: in high dimension the
    noise norm concentrates, so one fixed k would leave the shell around the data where the
    sampler's particles end up (noise of variance ε) without a single query.

    Returns the queries and, for each, the reference it was made from (-1: none), which the
    targets exclude: a point's own kernel would teach the fields a spike at every datum.
    """
    n_data, n_pert = int(mix[0] * batch), int(mix[1] * batch)
    n_broad = batch - n_data - n_pert
    device = refs.device
    source = draw(torch.randint, len(refs), (n_data + n_pert,), generator=generator, device=device)
    scale = perturb_scale * math.sqrt(eps)
    if spread:
        scale = scale * draw(torch.rand, n_pert, 1, generator=generator, device=device)
    noise = draw(torch.randn, n_pert, refs.shape[1], generator=generator, device=device) * scale
    broad = draw(torch.randn, n_broad, refs.shape[1], generator=generator, device=device) * broad_std
    queries = torch.cat([refs[source[:n_data]], refs[source[n_data:]] + noise, broad])
    exclude = torch.cat([source, torch.full((n_broad,), -1, dtype=torch.long, device=device)])
    return queries, exclude


BALANCE_FIT_ROWS = 2000  # rows the clustering of cluster_balanced_weights is fitted on
BALANCE_MAX_CLUSTERS = 8


def data_clusters(rows, seed):
    """The clusters cluster_balanced_weights weighs by: a Gaussian mixture chosen by BIC
    (scikit-learn) on up to BALANCE_FIT_ROWS of `rows`; None for fewer than two rows (one
    cluster)."""
    values = rows.double().cpu().numpy()
    if len(values) < 2:
        return None
    values = values[np.random.default_rng(seed).permutation(len(values))[:BALANCE_FIT_ROWS]]
    return bic_gaussian_mixture(values, min(BALANCE_MAX_CLUSTERS, len(values) // 2), seed, reg_covar=1e-4)


def cluster_balanced_weights(rows, power, clusters):
    """Per-row weights ∝ (share of the row's cluster among `rows`)^-power: at power 1 every
    cluster gets the same total. Clusters: data_clusters of the training rows.

    Level queries draw their source rows by these weights (`--query-balance`): a small mode gets
    few queries with uniform sources, and the score network, stopped by its step budget, fits it
    last; on a 5-D mixture with 8 % and 2 % modes annealing left them light (mode-weight error
    against the training rows 0.019; 0.006 at power 1; NOTES.md). The targets do not change, only
    where the regression looks; a ring or a checkerboard, split into clusters of equal share,
    keeps uniform sources. Early stopping weighs the validation rows by them (Trainer)."""
    if clusters is None:
        return torch.ones(len(rows), dtype=torch.float64, device=rows.device)
    labels = clusters.predict(rows.double().cpu().numpy())
    share = np.bincount(labels, minlength=clusters.n_components) / len(labels)
    return torch.as_tensor(share[labels] ** -power, dtype=torch.float64, device=rows.device)


def smoothed_data_queries(refs, batch, eps, generator, weights=None):
    """x ~ p_ε: data plus N(0, εI), the weighting under which integration by parts holds;
    with `weights`, the source rows drawn in proportion to them (cluster_balanced_weights)."""
    if weights is None:
        source = draw(torch.randint, len(refs), (batch,), generator=generator, device=refs.device)
    else:
        source = torch.multinomial(weights.to(generator.device), batch, replacement=True,
                                   generator=generator).to(refs.device)
    noise = draw(torch.randn, batch, refs.shape[1], generator=generator, device=refs.device) * math.sqrt(eps)
    return refs[source] + noise, source


def divergence(g, x, generator=None, sliced=False):
    """∇·g at x: exact trace (D backward passes) or the sliced estimate vᵀ∇(vᵀg)."""
    if sliced:
        v = torch.randn(g.shape, generator=generator)
        (jvp,) = torch.autograd.grad((g * v).sum(), x, create_graph=True)
        return (jvp * v).sum(1)
    parts = []
    for d in range(g.shape[1]):
        (row,) = torch.autograd.grad(g[:, d].sum(), x, create_graph=True)
        parts.append(row[:, d])
    return torch.stack(parts, 1).sum(1)


def field_loss(model, refs, eps, log_c, cfg, generator, backend=None, source_weights=None):
    """L = L_grad + λ L_id on one batch; returns the loss and its two parts (floats).
    source_weights: how level models draw their queries' rows (cluster_balanced_weights)."""
    if model.param == "log":
        return _log_domain_loss(model, refs, eps, log_c, cfg, generator, backend, source_weights)
    queries, exclude = draw_queries(refs, cfg.batch_size, eps, cfg.query_mix, cfg.perturb_scale,
                                    cfg.broad_std, generator)
    with torch.no_grad():
        s_hat, g_hat = smoothed_targets(queries, refs, eps, log_c, exclude, backend)
    s, g = model(queries)
    loss_grad, loss_id = squared_errors(s, g, s_hat, g_hat)
    if cfg.grad_loss != "direct":
        # ∫ p_ε ‖g - ∇p_ε‖² = E_{x~p_ε}[‖g‖² + p_ε(x) ∇·g(x)] + const (the paper's form)
        x, source = smoothed_data_queries(refs, cfg.batch_size, eps, generator)
        with torch.no_grad():
            weight, _ = smoothed_targets(x, refs, eps, log_c, source, backend)
        x.requires_grad_(True)
        _, g_x = model(x)
        div = divergence(g_x, x, generator, sliced=cfg.grad_loss == "sliced")
        loss_grad = (g_x.pow(2).sum(1) + weight * div).mean()
    return loss_grad + cfg.id_weight * loss_id, float(loss_grad.detach()), float(loss_id.detach())


def _log_domain_loss(model, refs, eps, log_c, cfg, generator, backend, source_weights=None):
    """The same fields regressed in the log domain: log s onto log ŝ - log C and ∇log s onto
    the kernel's weighted mean (y - x)/ε. ε·‖·‖² puts the score in nats per sqrt(ε) step.
    Level-conditioned fields take the batch in groups, one noise level each."""
    if cfg.grad_loss != "direct":
        raise BdiffError("the log parameterisation trains with the direct gradient loss only")
    if model.levels is None:
        levels = [eps]
    else:
        groups = max(1, min(LEVEL_GROUPS, cfg.batch_size // 16))
        levels = draw_levels(groups, model.levels, cfg.level_sampling, generator)
    queries, level_eps, excludes = [], [], []
    for k, level in enumerate(levels):
        size = cfg.batch_size // len(levels) + (k < cfg.batch_size % len(levels))
        if model.levels is None:
            q, exclude = draw_queries(refs, size, level, cfg.query_mix, cfg.perturb_scale,
                                      cfg.broad_std, generator, spread=True)
        else:
            # mostly p_ε itself, the law the annealed sampler's particles follow at this level;
            # a share spread WIDE_NOISE times wider pins log s down between nearby rows, where
            # it would otherwise extrapolate and the density's mass leak (NOTES.md)
            n_data, n_wide = size // 4, int(cfg.wide_share * size)
            q, exclude = smoothed_data_queries(refs, size, level, generator, source_weights)
            q[:n_data] = refs[exclude[:n_data]]
            if n_wide:
                q[size - n_wide:] += (q[size - n_wide:] - refs[exclude[size - n_wide:]]) * (WIDE_NOISE - 1)
        queries.append(q)
        excludes.append(exclude)
        level_eps.append(torch.full((size,), level, dtype=q.dtype, device=q.device))
    queries, level_eps, excludes = map(torch.cat, (queries, level_eps, excludes))
    scalar_from = None
    if model.levels is not None:
        # only log s needs the leave-one-out target, and it is fitted from ε up: below, the rows
        # keep their own kernel (the score's target) and skip the exclusion, which costs most
        # where the own kernel dominates, at the small levels
        scalar_from = fitted_from(eps)
        excludes = torch.where(level_eps >= scalar_from, excludes, torch.full_like(excludes, -1))
    with torch.no_grad():  # every level's targets in one reduction, ε per row
        lse, score = field_matching(queries, refs, level_eps, excludes, backend)
        if model.levels is not None:
            score = with_own_kernel(queries, refs, level_eps, excludes, lse, score)
    return log_regression(model, queries, level_eps, lse - log_c, score, cfg.id_weight, scalar_from)


def draw_levels(count, levels, sampling, generator):
    """`count` noise levels in (ε_min, ε_max), one per stratum of the sampling law's quantiles.
    log-uniform spreads training evenly over every decade of ε; log-normal puts it where the
    denoiser has most to learn, around the data's own scale (digits FD 5.5 -> 3.6 on one
    model; thin 2-D manifolds measured worse, as their detail lives at small ε; NOTES.md)."""
    eps_min, eps_max = levels
    u = (torch.arange(count, device=generator.device)
         + torch.rand(count, generator=generator, device=generator.device)) / count
    if sampling == "log-uniform":
        return (eps_min * (eps_max / eps_min) ** u).tolist()
    # the law truncated to the range: its quantiles between the range ends' CDF values
    ends = torch.tensor([eps_min, eps_max], dtype=torch.float64).log()
    low, high = torch.special.ndtr((ends - LOG_NORMAL_MEAN) / LOG_NORMAL_SD).tolist()
    quantile = torch.special.ndtri(low + u.double() * (high - low))
    return (LOG_NORMAL_MEAN + LOG_NORMAL_SD * quantile).clamp(*ends.tolist()).exp().tolist()


def fitted_from(eps):
    """The lowest level at which log s is fitted: ε, with room for ε's float32 copies."""
    return eps * (1 - 1e-6)


def with_own_kernel(queries, refs, eps, excludes, lse, score):
    """The score of p_ε with every row, from the targets that left each query's own row out.

    log s keeps the leave-one-out target (a spike at each datum would teach the density
    nothing), but the score is what the sampler follows down to ε_min: at small ε, near its
    own row, a leave-one-out score points to the nearest other row, far off, and annealed
    particles stray (digits: denoising error 0.5 against 0.006 for no denoising at ε = 1e-4;
    NOTES.md). With the own kernel's weight w = exp(k_own) / Σ exp(k): (1 - w) score + w (y_own - x)/ε."""
    own = excludes >= 0
    source = refs[excludes.clamp_min(0)]
    log_own = -(queries - source).pow(2).sum(1) / (2 * eps)
    log_rest = lse + math.log(max(len(refs) - 1, 1))  # lse is a log-mean over the other rows
    weight = (torch.sigmoid(log_own - log_rest) * own).unsqueeze(1)
    return (1 - weight) * score + weight * (source - queries) / eps.unsqueeze(1)


def weighted_mean(values, weights=None):
    return values.mean() if weights is None else (values * weights).sum() / weights.sum()


def squared_errors(s, g, s_hat, g_hat, weights=None):
    """The direct loss's two parts: mean ‖g - ĝ‖² and mean (s - ŝ)² (over the queries, or
    weighted by `weights`)."""
    return weighted_mean((g - g_hat).pow(2).sum(1), weights), weighted_mean((s - s_hat).pow(2), weights)


def log_regression(model, queries, level_eps, log_s_hat, score, id_weight, scalar_from=None):
    """(log s - log ŝ)² + ε‖∇log s - ĝ/ŝ‖²: ε puts the score in nats per sqrt(ε) step.

    scalar_from: log s is fitted at levels from this ε up only. The density is read there;
    below it (down to ε_min, for the sampler) log ŝ spans thousands of nats that would take
    the scalar network's capacity and the validation loss (NOTES.md)."""
    log_s, score_model = model.raw(queries, level_eps if model.levels else None)
    return log_regression_of(log_s, score_model, level_eps, log_s_hat, score, id_weight, scalar_from)


def log_regression_of(log_s, score_model, level_eps, log_s_hat, score, id_weight, scalar_from=None, weights=None):
    """log_regression on the model's outputs (log s, ∇log s) at the queries; weights: per-query
    weights of both means (None: uniform)."""
    if scalar_from is None:
        loss_id = weighted_mean((log_s - log_s_hat).pow(2), weights)
    else:
        keep = (level_eps >= scalar_from).to(log_s.dtype)
        if weights is not None:
            keep = keep * weights.to(log_s.dtype)
        loss_id = ((log_s - log_s_hat).pow(2) * keep).sum() / keep.sum().clamp_min(1e-30)
    loss_grad = score_term(score_model, level_eps, score, weights)
    return loss_grad + id_weight * loss_id, float(loss_grad.detach()), float(loss_id.detach())


def score_term(score_model, level_eps, score, weights=None):
    """The score's part of log_regression: mean ε‖∇log s - ĝ/ŝ‖² (or weighted by `weights`)."""
    return weighted_mean(level_eps * (score_model - score).pow(2).sum(1), weights)


def split_validation(rows, fraction, generator, min_rows=8):
    """(references, validation rows): a random `fraction` of the rows kept out of the targets
    to judge the fit; (rows, None) when that would be fewer than `min_rows`."""
    count = int(fraction * len(rows))
    if count < min_rows:
        return rows, None
    order = draw(torch.randperm, len(rows), generator=generator, device=rows.device)
    return rows[order[count:]], rows[order[:count]]


# the plain validation judge leaves out this share of the largest squared log s errors: a few
# held-out rows in a sparse tail carried errors of several nats that grew while the samples
# improved (a 2-D banana stopped at 900 steps with a far share of 0.25 %; NOTES.md)
TRIM_SHARE = 0.01


def trimmed_log_regression(log_s, score_model, level_eps, log_s_hat, score, id_weight, scalar_from):
    """log_regression_of's plain mean with the largest TRIM_SHARE of the squared log s errors
    (over the levels where log s is fitted) left out of its log s term."""
    kept = slice(None) if scalar_from is None else level_eps >= scalar_from
    errors = (log_s - log_s_hat)[kept].double().pow(2).sort().values
    loss_id = errors[:len(errors) - int(TRIM_SHARE * len(errors))].mean()
    return float(score_term(score_model, level_eps, score)) + id_weight * float(loss_id)


class ValidationSet:
    """Fixed queries around held-out rows with exact targets against all references: the
    training loss on data the fields never saw, for early stopping. Up to 512 rows, each
    clean and with N(0, ε'I) noise at every one of the fixed levels ε' (ε alone without levels).
    row_weights: each row's weight in a second judge (None: none), e.g. cluster_balanced_weights."""

    MAX_ROWS = 512

    def __init__(self, rows, refs, eps, log_c, levels, generator, backend=None, row_weights=None):
        self.scalar_from = None if levels is None else fitted_from(eps)
        rows = rows[:self.MAX_ROWS]
        self.row_weights = None if row_weights is None else row_weights[:self.MAX_ROWS]
        grid = [eps] if levels is None else sorted({eps, *(levels[0] * (levels[1] / levels[0]) ** torch.linspace(
            0, 1, LEVEL_GROUPS, dtype=torch.float64, device="cpu")).tolist()})
        queries, level_eps, log_s_hat, score = [], [], [], []
        for level in grid:
            noise = draw(torch.randn, rows.shape, generator=generator, device=rows.device) * math.sqrt(level)
            q = torch.cat([rows, rows + noise])
            lse, mean = field_matching(q, refs, level, None, backend)
            queries.append(q)
            level_eps.append(torch.full((len(q),), level, dtype=q.dtype, device=q.device))
            log_s_hat.append(lse - log_c)
            score.append(mean)
        self.queries, self.level_eps, self.log_s_hat, self.score = map(
            torch.cat, (queries, level_eps, log_s_hat, score))
        # the queries are the rows, clean then noisy, at each level in turn
        self.weights = None if row_weights is None else self.row_weights.to(self.queries.dtype).repeat(2 * len(grid))

    @torch.no_grad()
    def losses(self, model, id_weight=1.0):
        """The judges of early stopping, from one pass of the model: [plain mean], or with row
        weights [plain mean, weighted mean]; the last one chooses the weights kept. For log
        fields the plain mean leaves out the largest TRIM_SHARE of the log s errors; the
        weighted one keeps every row (its small clusters are what it watches)."""
        if model.param == "log":
            outputs = model.raw(self.queries, self.level_eps if model.levels else None)
            targets = (self.level_eps, self.log_s_hat, self.score, id_weight, self.scalar_from)
            judges = [trimmed_log_regression(*outputs, *targets)]
            if self.weights is not None:
                judges.append(log_regression_of(*outputs, *targets, self.weights)[0].item())
            return judges
        judges = [None] if self.weights is None else [None, self.weights]
        s, g = model(self.queries)
        s_hat = torch.exp(self.log_s_hat)
        return [float(loss_grad + id_weight * loss_id) for loss_grad, loss_id in
                (squared_errors(s, g, s_hat, s_hat.unsqueeze(1) * self.score, weights) for weights in judges)]

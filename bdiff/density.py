"""The learned density as a proper density: its log at any level, its normaliser by importance
sampling, and the choice of ε by the learned model's own held-out likelihood (docs/design.md §2.3)."""
import math

import numpy as np
import torch

from bdiff.backend import draw, field_matching


def bic_gaussian_mixture(values, max_components, seed, reg_covar):
    """The full-covariance scikit-learn GaussianMixture of 1..max_components components with the
    lowest BIC on `values` (a NumPy array)."""
    from sklearn.mixture import GaussianMixture

    fits = (GaussianMixture(k, covariance_type="full", reg_covar=reg_covar, random_state=seed).fit(values)
            for k in range(1, max_components + 1))
    return min(fits, key=lambda mixture: mixture.bic(values))


def log_density_std(fields_net, x_std, eps, log_c):
    """log p̂_ε at standardised points (float64): s ≈ exp(log ŝ - log C), ŝ = (2πε)^{D/2} p_ε,
    one log C for every level (each p_ε is a mean of normalised kernels); -inf where a linear
    s ≤ 0. Not renormalised: `normaliser` estimates its integral."""
    log_s, _ = fields_net.fields_batched(x_std, log=True, eps=eps)
    return log_s.double() + log_c - 0.5 * x_std.shape[1] * math.log(2 * math.pi * eps)


def _log_gaussian(x, variance):
    """log N(x; 0, variance I) per row (float64)."""
    x = x.double()
    return -0.5 * x.pow(2).sum(1) / variance - 0.5 * x.shape[1] * math.log(2 * math.pi * variance)


def normaliser(log_density_fn, rows_std, eps, n=20_000, seed=0, broad_share=0.1, broad_std=2.0):
    """∫ p̂ by importance sampling, with its standard error: (Z, se). The proposal is a defensive
    mixture of the rows smoothed at ε (close to p̂ where the mass is) and a broad Gaussian
    N(0, broad_std² I) in standardised units (the tails). log_density_fn maps standardised
    points to log p̂ (float64)."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.as_tensor(rows_std, dtype=torch.float32)
    dim = rows.shape[1]
    n_broad = int(broad_share * n)
    device = rows.device
    picks = draw(torch.randint, len(rows), (n - n_broad,), generator=generator, device=device)
    noise = draw(torch.randn, n - n_broad, dim, generator=generator, device=device) * math.sqrt(eps)
    broad = draw(torch.randn, n_broad, dim, generator=generator, device=device) * broad_std
    points = torch.cat([rows[picks] + noise, broad])
    lse, _ = field_matching(points, rows, eps)
    log_near = lse.double() - 0.5 * dim * math.log(2 * math.pi * eps)
    log_broad = _log_gaussian(points, broad_std**2)
    log_q = torch.logaddexp(log_near + math.log(1 - broad_share), log_broad + math.log(broad_share))
    weights = torch.exp(log_density_fn(points).cpu() - log_q.cpu())
    weights = torch.where(torch.isfinite(weights), weights, torch.zeros_like(weights))
    return float(weights.mean()), float(weights.std() / math.sqrt(n))


# A normaliser estimate counts only below this relative standard error; in high D (digits)
# importance sampling of the learned density is hopeless (estimates of 1e20 and more, NOTES.md).
RELIABLE_SE = 0.05


def reliable(z, se):
    return z > 0 and se < RELIABLE_SE * z


def select_eps(fields_net, val_rows, refs, log_c, candidates, seed=0):
    """The level whose normalised learned density best predicts the validation rows: mean
    log p̂_ε(val) - log Z_ε, among the candidates (ascending) up to the first whose Z cannot be
    reliably estimated; the first candidate when its own Z cannot be (high D: only broad
    levels would qualify, and they trade sharpness for a likelihood no one can check).
    Returns (ε, [(ε, score, Z, se)]) for the candidates up to the first unreliable one: no later
    one can be chosen, so their normalisers are not estimated."""
    scores = []
    for eps in candidates:
        def log_p(x, eps=eps):
            return log_density_std(fields_net, x, eps, log_c)
        z, se = normaliser(log_p, refs, eps, n=8192, seed=seed)
        score = float(log_p(val_rows).mean()) - math.log(max(z, 1e-300))
        scores.append((eps, score, z, se))
        if not reliable(z, se):
            break
    usable = [item for item in scores if reliable(item[2], item[3])]
    return (max(usable, key=lambda item: item[1])[0] if usable else candidates[0]), scores


# The probability-flow density (docs/design.md §2.3). RK4 steps in log ε from the density's level
# up to ε_max: 32 agree with 200 to 1e-6 nats per row on the suite's tables (NOTES.md).
FLOW_STEPS = 32
# share of the broad Gaussian in the reported density: it costs at most -log(1 - 0.02) = 0.02
# nats per row and bounds a row where the learned score is wild (far from every training row)
DEFENSIVE_SHARE = 0.02


# rows × dimensions of one batched backward pass of the divergence: bounds its memory (measured
# 210 MB at width 256: 4096 64-D rows in chunks of 8 dimensions, 26 bytes per row-dimension-unit)
DIVERGENCE_BATCH = 1 << 15


def _score_and_divergence(fields_net, x, eps):
    """∇log p_ε at x and its divergence, exact: the Jacobian's diagonal from one backward pass per
    dimension, batched over the dimensions (is_grads_batched). The 64-D digits' flow selection
    took 76 s on a slow 2-core machine with a Python loop of passes, 51 s batched (NOTES.md)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        _, score = fields_net.raw(x, eps, score_only=True)
        dim = x.shape[1]
        basis = torch.eye(dim, dtype=score.dtype, device=x.device).unsqueeze(1).expand(dim, len(x), dim)
        chunk = max(1, DIVERGENCE_BATCH // len(x))
        divergence = torch.zeros(len(x), dtype=torch.float64, device=x.device)
        for first in range(0, dim, chunk):
            directions = basis[first:first + chunk]
            (grads,) = torch.autograd.grad(score, x, grad_outputs=directions, is_grads_batched=True,
                                           retain_graph=first + chunk < dim)
            # grads[k, n, j] = ∂score_(first+k) / ∂x_j at row n: keep j = first + k
            divergence += grads.diagonal(offset=first, dim1=0, dim2=2).sum(-1).double()
    return score.detach(), divergence


def _flow_velocity(fields_net, x, u):
    """In u = log ε: dx/du = -½ ε score and d(log volume)/du = -½ ε ∇·score."""
    level = math.exp(u)
    score, divergence = _score_and_divergence(fields_net, x, level)
    return -0.5 * level * score, -0.5 * level * divergence


def flow_base(mixture):
    """The flow density's top level, p_ε_max, as a Gaussian mixture of the training rows
    (standardised units; a scikit-learn GaussianMixture with full covariances, such as
    losses.data_clusters) as plain lists for the checkpoint; ε_max is added when it is used. For
    data whose standard deviation a light far mode sets (0.5 % of rows 20 sd out), p_ε_max is
    not one Gaussian: N(0, (1 + ε_max) I) put that mode's rows tens of nats too low (NOTES.md)."""
    if mixture is None:
        return None
    return {"weights": mixture.weights_.tolist(), "means": mixture.means_.tolist(),
            "covariances": mixture.covariances_.tolist()}


def systematic_picks(weights, n, generator):
    """n indices into `weights` (a float64 tensor summing to one) by systematic sampling: index k
    is picked n·w_k rounded up or down times, with one uniform draw for all."""
    offset = draw(torch.rand, 1, generator=generator, device=weights.device, dtype=torch.float64)
    positions = (offset + torch.arange(n, device=weights.device)) / n
    return torch.searchsorted(weights.cumsum(0), positions).clamp_max(len(weights) - 1)


class TopLevel:
    """p_ε_max, the broadest noise level, in standardised units: flow_base's mixture of the rows
    smoothed by N(0, ε_max I), or N(0, (spread² + ε_max) I) without one (images, checkpoints from
    before it). The flow density's ODE ends there and the annealing samplers start there. Twice
    the data's variance does not blur every table into one Gaussian: started from
    N(0, (1 + ε_max) I), a random 2-D law's 1.8 % mode got 1.2-1.3 % of the particles annealed
    with exact fields, 1.2 % with the learned ones and 1.4 % under SMC (NOTES.md)."""

    def __init__(self, base, eps_max, dim, device, spread=1.0):
        self.dim = dim
        if base is None:
            self.variance, self.components = spread ** 2 + eps_max, None
            return
        weights, means, covariances = (torch.as_tensor(np.asarray(base[key], np.float64), device=device)
                                       for key in ("weights", "means", "covariances"))
        smoothed = covariances + eps_max * torch.eye(dim, dtype=torch.float64, device=device)
        self.weights = weights / weights.sum()
        self.components = torch.distributions.MultivariateNormal(means, covariance_matrix=smoothed)

    def log_prob(self, x):
        """log p_ε_max per row (float64)."""
        if self.components is None:
            return _log_gaussian(x, self.variance)
        return torch.logsumexp(self.components.log_prob(x.double().unsqueeze(1)) + self.weights.log(), dim=1)

    def sample(self, n, generator, device):
        """n float32 points. The components get their shares systematically, in shuffled order:
        a start drawn per particle adds the multinomial noise of the mode weights again."""
        noise = draw(torch.randn, n, self.dim, generator=generator, device=device)
        if self.components is None:
            return noise * math.sqrt(self.variance)
        picks = systematic_picks(self.weights.cpu(), n, generator)
        picks = picks[draw(torch.randperm, n, generator=generator, device="cpu")].to(device)
        centred = (self.components.scale_tril[picks] @ noise.double().unsqueeze(-1)).squeeze(-1)
        return (self.components.loc[picks] + centred).float()


def flow_log_density(fields_net, x_std, eps, steps=FLOW_STEPS, batch_size=4096, base=None):
    """log q_ε at standardised points (float64, on the CPU): the density the score fields define
    through the probability-flow ODE dx/dε = -½ ∇log p_ε(x) (Song et al. 2021, in its
    variance-exploding form). Each row is carried from ε up to ε_max and
    log q_ε(x) = log p_ε_max(x(ε_max)) - ½ ∫ ∇·score dε, with p_ε_max from `base` (flow_base:
    the rows' Gaussian mixture smoothed by ε_max; None: N(0, (1 + ε_max) I)). A change of
    variables of a normalised density, so q_ε is positive and integrates to one by
    construction, with no importance sampling (which fails above a few dimensions). A share
    DEFENSIVE_SHARE of N(0, (1 + ε) I) keeps it finite where the learned score is wild."""
    eps_max = fields_net.levels[1]
    device = next(fields_net.parameters()).device
    log_base = TopLevel(base, eps_max, x_std.shape[1], device).log_prob
    span = math.log(eps_max / eps)
    grid = [math.log(eps) + span * k / steps for k in range(steps + 1)]  # u = log ε
    parts = []
    for x in torch.as_tensor(x_std).split(batch_size):
        x0 = x = x.float().to(device)
        log_volume = torch.zeros(len(x), dtype=torch.float64, device=x.device)
        for u, u_next in zip(grid[:-1], grid[1:]):
            h = u_next - u
            k1 = _flow_velocity(fields_net, x, u)
            k2 = _flow_velocity(fields_net, x + 0.5 * h * k1[0], u + 0.5 * h)
            k3 = _flow_velocity(fields_net, x + 0.5 * h * k2[0], u + 0.5 * h)
            k4 = _flow_velocity(fields_net, x + h * k3[0], u_next)
            x = x + h / 6 * (k1[0] + 2 * k2[0] + 2 * k3[0] + k4[0])
            log_volume += h / 6 * (k1[1] + 2 * k2[1] + 2 * k3[1] + k4[1])
        log_flow = log_base(x) + log_volume
        log_broad = _log_gaussian(x0, 1 + eps)
        parts.append(torch.logaddexp(log_flow + math.log1p(-DEFENSIVE_SHARE),
                                     log_broad + math.log(DEFENSIVE_SHARE)).cpu())
    return torch.cat(parts)


FLOW_ROWS = 2000  # validation rows that judge the flow density: its ODE costs D backward passes a step
# RK4 steps when choosing the level: half the cost. Against 128 steps, the mean log-likelihood per
# row is off by 8e-5 / 9e-6 / 6e-4 nats at 16 (2-D mixture, checkerboard, 6-D Gaussian; 32 steps:
# 4e-6 / 1e-7 / 4e-5), far below the gaps between candidate levels (0.04 nats and up on digits)
FLOW_SELECT_STEPS = 16


# A choice made on held-out rows (the flow's level, a table's column coding) is taken only when
# its mean gain, row by row, is beyond this many standard errors. A few rows can favour a choice
# by luck: on engel (2-D, 188 training rows, 18 validation rows) the flow search went down to
# ε_min on a gain of 0.21 ± 0.24 nats, and the held-out rows lost 0.86 nats a row (NOTES.md).
CLEAR_GAIN_SES = 2.0


def clearly_better(rows, other, winsorize=0.0):
    """Whether the per-row log-likelihoods `rows` beat `other` (of the same rows) beyond their
    noise: a mean gain of more than CLEAR_GAIN_SES standard errors. `winsorize` clips that share
    of the gains at each end to the nearest kept one first, where a few rows' gains can be of
    any size (NOTES.md)."""
    gain = np.asarray(rows, np.float64) - np.asarray(other, np.float64)
    if len(gain) < 2:
        return False
    if winsorize:
        gain = np.clip(gain, *np.quantile(gain, [winsorize, 1 - winsorize]))
    return float(gain.mean()) > CLEAR_GAIN_SES * float(gain.std(ddof=1)) / math.sqrt(len(gain))


def select_flow_eps(fields_net, val_rows, eps, field_score, candidates_down=6, base=None):
    """The level from which the flow density best predicts the validation rows, among ε / 4^k
    (k < candidates_down) above ε_min, and ε_min; None where the field density at ε (validation
    score `field_score`, None when unknown) predicts them better. The suite's data sets measured
    best anywhere from ε itself (wine) to ε_min (diabetes): the network's score generalises below
    the level where its scalar field, whose normaliser explodes there, does (NOTES.md). The
    first FLOW_ROWS validation rows judge (they are a random draw). The search goes down from ε
    and stops at the first level that is not clearly better than the one above it
    (clearly_better): the score over the levels rose to one peak and fell on every fit measured
    (NOTES.md), and a gain within its noise is not one to trust. Returns (ε or None, [(ε, score)]
    of the levels tried)."""
    val_rows = val_rows[:FLOW_ROWS]
    eps_min = fields_net.levels[0]
    candidates = [eps / 4 ** k for k in range(candidates_down) if eps / 4 ** k > eps_min] + [eps_min]
    chosen, chosen_rows, scores = None, None, []
    for level in candidates:
        rows = flow_log_density(fields_net, val_rows, level, FLOW_SELECT_STEPS, base=base)
        scores.append((level, float(rows.mean())))
        if chosen_rows is not None and not clearly_better(rows, chosen_rows):
            break
        chosen, chosen_rows = level, rows
    if field_score is not None and field_score >= dict(scores)[chosen]:
        return None, scores
    return chosen, scores

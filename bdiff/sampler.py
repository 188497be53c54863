"""Samplers over one fields interface (docs/design.md §3).

A fields source has `dim`, `eps`, `levels` ((ε_min, ε_max) or None), `exact_log` (True when
its log fields are its own outputs, not logs of possibly negative linear fields),
`fields(x)` → (s, g), `log_fields(x, eps=None)` → (log s, ∇log s) at ε or at any level and
`score(x, eps=None)` → ∇log s alone;
optionally `fused_step(x, s_floor, h, seed, step, offset, delta)`, one launch that evaluates
the fields and steps (the oracle), `support_log_s`, the log s of the data's lowest
SUPPORT_QUANTILE (fit stores it): particles that end below it are trimmed and drawn again, and
`base_mixture`, a Gaussian mixture of the data (fit's flow_base) that smoothed by ε_max is
p_ε_max, where the annealing samplers start (else N(0, (1 + ε_max) I)). A
sampler is one function `run(fields, x, cfg, plan)` → (x, report) plus its entry in SAMPLERS.

- bellman / precond: Euler–Maruyama steps of the paper's SDE dx = ∇p dt + sqrt(p) dW or its
  preconditioned variant, from importance resampling of a broad proposal with weights s/q
  (possible because s is a density) or a Gaussian start.
- anneal: down a ladder of noise levels from the broad p_εmax (top_level) to ε_min, below the
  density's ε, then one denoising step: samples of the data, not of p_ε's blur.
- smc (the default for tables): the same ladder and noise, its paths importance-weighted with
  the learned log s at 4ε, resampled once there where the weights can be trusted, then
  annealed on to ε_min like anneal.
"""
import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

from bdiff.backend import (check_memory, check_seed, draw, field_matching, oracle_sde_step, sde_step,
                           stream_seed)
from bdiff.density import TopLevel, systematic_picks
from bdiff.errors import BdiffError
from bdiff.losses import fitted_from
from bdiff.metrics import nearest_ratio, nearest_scale
from bdiff.psis import pareto_smoothed

INITS = ("importance", "gaussian")


@dataclass
class SampleConfig:
    sampler: str = "bellman"  # the paper's SDE: best measured with the importance start (NOTES.md)
    init: str = "importance"
    steps: int = 100
    step_frac: float = 0.1    # bellman: largest drift step = step_frac·sqrt(ε)
    precond_step: float = 0.1  # precond: h = precond_step·ε (a Langevin step on ∇log p)
    delta_rel: float = 1e-3   # precond: δ = delta_rel·max s
    oversample: int = 20      # importance start: candidates per particle
    proposal_std: float = 1.0  # importance / Gaussian start: N(0, proposal_std² I)
    floor_rel: float = 1e-2   # s below floor_rel·max s counts as zero: kills small spurious
    #                           bumps far from the data that importance weights s/q inflate
    denoise: bool = False     # end with x + ε ∇log s at the last level (Tweedie): removes its N(0, εI) blur
    end_level: float = None   # the level annealing samplers end at; None: the model's (fields.end_level),
    #                           else ε_min. Above ε_min the particles keep its blur: no Tweedie step
    trim: bool = True         # draw again particles below the density of the data's lowest 0.1 %
    batch_size: int = 10_000
    seed: int = 0
    backend: str = None

    def validate(self):
        if self.sampler not in SAMPLERS:
            raise BdiffError(f"unknown sampler {self.sampler!r}; choose {', '.join(SAMPLERS)}")
        if self.init not in INITS:
            raise BdiffError(f"unknown --init {self.init!r}; choose {', '.join(INITS)}")
        if self.steps < 0:
            raise BdiffError(f"--steps must be >= 0, got {self.steps}")
        if self.batch_size < 1:
            raise BdiffError(f"--batch-size must be >= 1, got {self.batch_size}")
        check_seed(self.seed)
        if SAMPLERS[self.sampler].needs_levels and self.steps < 1:
            raise BdiffError(f"the {self.sampler} sampler walks down its noise levels: --steps must be "
                             f"at least one level, got {self.steps}")
        if SAMPLERS[self.sampler].needs_levels and self.init != "gaussian":
            raise BdiffError(f"the {self.sampler} sampler starts from its broadest noise level; "
                             "--init importance does not apply to it")


IMAGE_LEVELS = 2000  # anneal levels for image data: digits FD 5.7 / 5.2 / 4.6 at 200 / 500 / 1000
#                      on one model, 4.9 / 4.6 at 1000 / 2000 on another (NOTES.md)


def default_sample_config(param, leveled=False, image=False, **overrides):
    """Measured defaults (NOTES.md). Models with noise levels: annealing down the levels (local
    dynamics at one small ε weigh each bump of p_ε by its basin, not its mass), 200 of them,
    corrected by the learned density (smc): on 15 fresh draws of five unbalanced mixtures its
    mode-weight error against the law was lower on 14 (means 0.0104 -> 0.0060; on 19 of 24
    draws of eight laws, its cost a 10-D mixture). Image data: IMAGE_LEVELS levels (finer
    steps in 64-D; DDPM takes 1000), annealing alone (what their figures were measured with).
    Log fields without levels: s spans hundreds of nats, so importance weights degenerate and
    the paper's SDE stalls; Langevin on ∇log s (the preconditioned SDE with δ → 0) from a
    Gaussian works.
    Linear fields: the paper's SDE from the importance start."""
    if leveled:
        base = dict(sampler="anneal" if image else "smc", init="gaussian", steps=IMAGE_LEVELS if image else 200,
                    floor_rel=0.0, delta_rel=0.0, denoise=True)
    elif param == "log":
        base = dict(sampler="precond", init="gaussian", steps=300, floor_rel=0.0, delta_rel=0.0)
    else:
        base = {}
    base.update({k: v for k, v in overrides.items() if v is not None})
    chosen = SAMPLERS.get(base.get("sampler"))
    if chosen is not None and chosen.needs_levels and overrides.get("init") is None:
        base["init"] = "gaussian"  # the only start a ladder of levels has
    return SampleConfig(**base)


SUPPORT_QUANTILE = 1e-3  # the far-sample metric's 99.9th percentile, seen from the density side
MAX_TRIMMED = 0.5  # trimming more than this share of the particles means the model misses its data


def support_floor(log_s):
    """The log s below which a particle counts as off the data (docs/design.md §3.3): that of
    the data's own lowest SUPPORT_QUANTILE of rows, a row's own value. None where there are
    fewer than 1/SUPPORT_QUANTILE rows (their lowest stands for the lowest 1/(n + 1) of the law,
    and trimming there would cut its tails) or where log s is not finite on every row (a linear
    s ≤ 0): the floor would say nothing."""
    values = np.asarray(torch.as_tensor(log_s).double().cpu())
    if len(values) * SUPPORT_QUANTILE < 1 or not np.isfinite(values).all():
        return None
    return float(np.quantile(values, SUPPORT_QUANTILE, method="lower"))


class OracleFields:
    """The exact smoothed fields against a reference set (docs/design.md §1.1): a network-free
    fields source whose law is known (data + N(0, εI)); with levels, p_ε at any ε."""

    exact_log = True
    support_log_s = None

    def __init__(self, refs, eps, log_c=0.0, backend=None, levels=None, base_mixture=None):
        self.refs, self.eps, self.log_c, self.backend, self.levels = refs, eps, log_c, backend, levels
        self.base_mixture = base_mixture
        self.dim = refs.shape[1]

    def fields(self, x):
        lse, mean = field_matching(x, self.refs, self.eps, None, self.backend)
        s = torch.exp(lse - self.log_c)
        return s, s.unsqueeze(1) * mean

    def log_fields(self, x, eps=None):
        lse, mean = field_matching(x, self.refs, self.eps if eps is None else eps, None, self.backend)
        return lse - self.log_c, mean

    def score(self, x, eps=None):
        return self.log_fields(x, eps)[1]

    def fused_step(self, x, s_floor, h, seed, step, offset, delta):
        return oracle_sde_step(x, self.refs, self.eps, self.log_c, s_floor, h, seed, step, offset,
                               delta, self.backend)


@dataclass
class Plan:
    """What every batch of one sampling run shares: the field scale, floor, step size and start."""
    log_floor: float          # log s at or below this counts as zero (-inf: no floor)
    end_eps: float            # the level the particles end at (and the Tweedie step's)
    top: TopLevel = None      # annealing samplers: p_ε_max, where they start (top_level)
    h: float = None           # SDE step
    log_delta: float = None   # precond: log δ (-inf: the Langevin limit)
    offset: int = 0           # index of the batch's first particle (noise streams)


def field_scale(fields, cfg, device):
    """(log of max s, 99th percentile of ‖g‖) on a probe of the start distribution."""
    generator = torch.Generator().manual_seed(stream_seed("field scale probe", cfg.seed))
    probe = draw(torch.randn, 8192, fields.dim, generator=generator, device=device) * cfg.proposal_std
    log_s, score = fields.log_fields(probe)
    g_norm = (score * torch.exp(log_s - log_s.max()).unsqueeze(1)).norm(dim=1)
    log_s_max = float(log_s.max())
    g_scale = float(torch.quantile(g_norm.float(), 0.99)) * math.exp(min(log_s_max, 80.0))
    if not (math.isfinite(log_s_max) and math.isfinite(g_scale)):
        raise BdiffError("the scalar field is not positive anywhere near the data: "
                         "the model is untrained or broken")
    return log_s_max, max(g_scale, 1e-12)


def top_level(fields, cfg, device):
    """p_ε_max, where the annealing samplers start: the fields' base_mixture smoothed by ε_max,
    or N(0, (proposal_std² + ε_max) I) without one (density.TopLevel)."""
    return TopLevel(getattr(fields, "base_mixture", None), fields.levels[1], fields.dim, device,
                    spread=cfg.proposal_std)


def _start(fields, n, cfg, plan, generator, device):
    if SAMPLERS[cfg.sampler].needs_levels:
        return plan.top.sample(n, generator, device)
    if cfg.init == "gaussian":
        return draw(torch.randn, n, fields.dim, generator=generator, device=device) * cfg.proposal_std
    candidates = draw(torch.randn, n * cfg.oversample, fields.dim, generator=generator,
                      device=device) * cfg.proposal_std
    log_s, _ = fields.log_fields(candidates)
    log_q = -0.5 * (candidates / cfg.proposal_std).pow(2).sum(1)
    log_w = torch.where(log_s > plan.log_floor, log_s - log_q, -math.inf)
    if not torch.isfinite(log_w).any():
        raise BdiffError("importance start found no candidate with positive density")
    weights = torch.softmax(log_w.double().cpu(), 0)
    picks = torch.multinomial(weights, n, replacement=True, generator=generator)
    return candidates[picks.to(device)]


# The preconditioned step in units of δ: r = s/δ is capped here, where its drift and diffusion
# factors r(r+2)/(r+1)² and r/(r+1) are 1 to float32 precision, so exp never overflows.
MAX_LOG_RATIO = 30.0


def _exp(log_value):
    """exp of a log, capped where a Python float would overflow (e^709.8): s, its floor and δ
    pass to kernels as plain numbers, and a log-field model's log s can exceed that."""
    return math.exp(min(log_value, 700.0))


def _sde_step(fields, x, cfg, plan, step):
    """One step of the Bellman (plan.log_delta None) or preconditioned SDE."""
    s_floor = _exp(plan.log_floor)
    delta = None if plan.log_delta is None else max(_exp(plan.log_delta), 1e-30)
    langevin_limit = plan.log_delta == -math.inf
    fused = getattr(fields, "fused_step", None)
    if fused is not None and not langevin_limit:  # one launch where the source has one
        return fused(x, s_floor, plan.h, cfg.seed, step, plan.offset, delta)
    if delta is not None and fields.exact_log:
        # the same step from (log s, ∇log s): exact where s spans hundreds of nats (high D)
        log_s, score = fields.log_fields(x)
        alive = log_s > plan.log_floor
        ratio = torch.exp(torch.where(alive, log_s - plan.log_delta, torch.full_like(log_s, -math.inf))
                          .clamp_max(MAX_LOG_RATIO))
        return sde_step(x, ratio, ratio.unsqueeze(1) * score, plan.h, cfg.seed, step, plan.offset, 1.0,
                        cfg.backend)
    s, g = fields.fields(x)
    # below the floor the density counts as zero, and so does its gradient: a spurious g there
    # divided by a tiny s + δ would throw preconditioned particles far away
    alive = s > s_floor
    s = torch.where(alive, s, torch.zeros_like(s))
    g = torch.where(alive.unsqueeze(1), g, torch.zeros_like(g))
    return sde_step(x, s, g, plan.h, cfg.seed, step, plan.offset, delta, cfg.backend)


def run_sde(fields, x, cfg, plan, generator):
    for step in range(cfg.steps):
        x = _sde_step(fields, x, cfg, plan, step)
    return x, {}


LADDER_RHO = 3  # Karras et al. (2022)'s ρ; ρ → ∞ is the geometric ladder


def level_ladder(levels, steps, eps):
    """`steps` + 1 noise levels from ε_max down to ε, evenly spaced in σ^(1/ρ) (σ = sqrt(ε)).
    Against the geometric ladder it spends more of its steps at the broad levels, where the
    particles split between modes: mode-weight errors (10 000 samples, 3-6 seeds, the same
    models) 0.0081 → 0.0052 on the built-in mixture, 0.0128 → 0.0105 on the checkerboard,
    0.0074 → 0.0054 on the 5-D mixture; digits FD 3.57 → 3.43 (NOTES.md)."""
    top, bottom = (math.sqrt(level) ** (1 / LADDER_RHO) for level in (levels[1], eps))
    return [(top + i / steps * (bottom - top)) ** (2 * LADDER_RHO) for i in range(steps + 1)]


def run_anneal(fields, x, cfg, plan, generator):
    """Down the ladder to ε_min, each step the reverse-time move from p_hi to p_lo = p_hi
    deconvolved by N(0, (hi - lo) I): x += (hi - lo) ∇log p_hi(x) + sqrt((hi - lo) lo/hi) ξ, the
    Bellman step with s ≡ lo/hi. Its mean is E[x_lo | x_hi] exactly (Tweedie), its variance that
    of x_lo given x_hi and the clean point (DDPM's ancestral step); the plain s ≡ 1 added that
    much noise again and sampled 8 % too wide at 200 levels (NOTES.md). Not to the density's ε:
    samples there carry its N(0, εI) blur, twice the spread of a sharp mode."""
    ladder = level_ladder(fields.levels, cfg.steps, plan.end_eps)
    return _anneal_down(fields, x, ladder, 0, cfg, plan), {}


def _anneal_down(fields, x, ladder, first, cfg, plan):
    """The anneal's steps from ladder[first] to the ladder's end."""
    for step in range(first, len(ladder) - 1):
        x = _ancestral_step(x, fields.score(x, ladder[step]), ladder[step], ladder[step + 1], cfg, plan, step)
    return x


def _ancestral_step(x, score, hi, lo, cfg, plan, step):
    """x + (hi - lo) score + sqrt((hi - lo) lo/hi) ξ, ξ from the (seed, step, particle) stream."""
    share = torch.full((x.shape[0],), lo / hi, dtype=x.dtype, device=x.device)
    return sde_step(x, share, score, hi - lo, cfg.seed, step, plan.offset, None, cfg.backend)


def _resample(log_w, generator):
    """Systematic resampling: indices drawn in proportion to exp(log_w)."""
    return systematic_picks(torch.softmax(log_w.double(), 0), len(log_w), generator)


def _ess(log_w):
    w = torch.softmax(log_w.double(), 0)
    return float(1.0 / (w * w).sum())


PSIS_MIN_PARTICLES = 25  # PSIS fits its Pareto tail to the largest fifth, and needs 5 of them


def _pareto_smoothed(log_w):
    """(log weights, k̂): Pareto-smoothed importance sampling (Vehtari et al. 2024; bdiff.psis).
    The learned log s overshoots in the gaps between modes, where annealing seldom goes; one
    particle that lands there weighs hundreds of times the median, and resampling cloned it 270
    times in a batch of 10 000 (the 1-D line mixture, NOTES.md). PSIS replaces the largest
    weights by the quantiles of a generalized Pareto fitted to them; its shape k̂ above 0.7 says
    the weights are too heavy-tailed to trust. k̂ is None where the batch is too small or its
    tail tied."""
    raw = log_w.double()
    if len(raw) < PSIS_MIN_PARTICLES:
        return raw, None
    with np.errstate(divide="ignore", invalid="ignore"):  # a tail of near-ties divides by zero
        try:
            smoothed, k_hat = pareto_smoothed(raw.cpu().numpy())
        except ValueError:  # every tail weight equal: nothing to fit
            return raw, None
    if not (np.isfinite(smoothed).all() and np.isfinite(k_hat)):  # no scale to fit
        return raw, None
    return torch.as_tensor(smoothed, device=log_w.device), k_hat


PARETO_K_TRUSTED = 0.7  # Vehtari et al.: above it, importance estimates converge too slowly to trust


# Below this effective sample size (a share of the batch) the weights are not trusted either:
# resampling would keep under a quarter of the particles' paths. On breast_cancer (30-D, 455
# rows; ESS 11 %) SMC's C2ST was 0.592 against annealing's 0.538 (8 seeds); every other table
# and mixture measured 0.54 or more (NOTES.md).
SMC_MIN_ESS = 0.25


def sampler_warnings(report):
    """A line for each sign in a sampler's report that its samples are not what was asked."""
    corrected = report.get("corrected_share")
    if corrected is not None and corrected < 1:
        untrusted = 1 - corrected  # a small top-up batch alone can be a fraction of a percent
        share = f"{untrusted:.0%}" if untrusted >= 0.01 else f"{untrusted:.2%}"
        return [f"SMC's importance weights were not trusted for {share} of the particles "
                f"(Pareto k̂ above {PARETO_K_TRUSTED} or effective sample size under {SMC_MIN_ESS:.0%}): "
                "those kept annealing's draws, uncorrected by the density"]
    return []


# log s is fitted from ε up, least well at ε itself: its leave-one-out target is most biased
# where a query's own row dominates the kernel sum. Weighted at ε, SMC put that level's mode
# masses into its samples; at 4ε its mode-weight error on the suite's five mixtures fell from
# 0.023 to 0.010 on average (10-D 0.056 -> 0.010; 10 000 samples, seeds 0-2; NOTES.md).
SMC_WEIGHT_LEVEL = 4.0


def run_smc(fields, x, cfg, plan, generator):
    """Annealing weighted by the learned density (docs/design.md §3.2): annealed importance
    sampling down the anneal's own ladder and noise. Each step from hi to lo is the anneal's
    proposal q(x'|x) = N(x + Δ∇log p_hi(x), Δ lo/hi I) with the noising N(x; x', ΔI) as its
    backward kernel, so the path's weight is p_lo(x') N(x; x', Δ) / (p_hi(x) q(x'|x)) multiplied
    over the steps: the learned log s of the levels in between cancels, and only the last
    weighted level's remains (beside the start's Gaussian). The weights stop at the last level
    at or above SMC_WEIGHT_LEVEL ε (ε_max if that is lower); the particles are resampled once
    there (systematic) and anneal on, unweighted, to ε_min: the mass between modes is that of
    the field density, and the samples are as sharp as annealing's. The weights are
    Pareto-smoothed first (_pareto_smoothed): one particle in a gap of the data may not take a
    share of the samples. A batch whose smoothed weights are not trusted (k̂ above
    PARETO_K_TRUSTED, or an ESS under SMC_MIN_ESS: the learned density of few rows in many
    dimensions) is not resampled: it keeps annealing's particles."""
    ladder = level_ladder(fields.levels, cfg.steps, plan.end_eps)
    weighted = max(1, sum(level >= fitted_from(SMC_WEIGHT_LEVEL * fields.eps) for level in ladder))
    log_w = -plan.top.log_prob(x)  # over the start's density
    for step in range(weighted - 1):
        hi, lo = ladder[step], ladder[step + 1]
        delta, score = hi - lo, fields.score(x, hi)
        moved = _ancestral_step(x, score, hi, lo, cfg, plan, step)
        proposal_gap = (moved - x - delta * score).pow(2).sum(1) / (2 * delta * lo / hi)
        log_w += (proposal_gap - (moved - x).pow(2).sum(1) / (2 * delta)).double()
        x = moved
    log_w += fields.log_fields(x, ladder[weighted - 1])[0].double()
    unsmoothed_ess = _ess(log_w) / len(x)
    log_w, pareto_k = _pareto_smoothed(log_w)
    final_ess = _ess(log_w) / len(x)
    trusted = final_ess >= SMC_MIN_ESS and (pareto_k is None or pareto_k <= PARETO_K_TRUSTED)
    if trusted:
        x = x[_resample(log_w, generator)]
    x_end = _anneal_down(fields, x, ladder, weighted - 1, cfg, plan)
    return x_end, {"final_ess": final_ess, "unsmoothed_ess": unsmoothed_ess, "pareto_k": pareto_k,
                   "corrected_share": float(trusted), "weighted_to": ladder[weighted - 1]}


@dataclass(frozen=True)
class Sampler:
    run: object
    needs_levels: bool = False  # anneals down the levels: ends at the end level, not at the density's ε


SAMPLERS = {
    "bellman": Sampler(run_sde),
    "precond": Sampler(run_sde),
    "anneal": Sampler(run_anneal, needs_levels=True),
    "smc": Sampler(run_smc, needs_levels=True),
}


def _plan(fields, cfg, device):
    log_s_max, g_scale = field_scale(fields, cfg, device)
    log_floor = math.log(cfg.floor_rel) + log_s_max if cfg.floor_rel > 0 else -math.inf
    if SAMPLERS[cfg.sampler].needs_levels:
        return Plan(log_floor, end_level(fields, cfg), top=top_level(fields, cfg, device)), log_s_max
    end_eps = fields.eps
    if cfg.sampler == "bellman":
        return Plan(log_floor, end_eps, h=cfg.step_frac * math.sqrt(fields.eps) / g_scale), log_s_max
    if cfg.sampler == "precond":
        # delta_rel = 0: the δ → 0 limit, Langevin dynamics on ∇log s
        log_delta = math.log(cfg.delta_rel) + log_s_max if cfg.delta_rel > 0 else -math.inf
        return Plan(log_floor, end_eps, h=cfg.precond_step * fields.eps, log_delta=log_delta), log_s_max
    return Plan(log_floor, end_eps), log_s_max


def end_level(fields, cfg):
    """Where an annealing sampler's particles end: cfg.end_level, else the level fit chose
    (choose_end_level; a fields source without one, or a checkpoint from before it: ε_min)."""
    level = cfg.end_level if cfg.end_level is not None else getattr(fields, "end_level", None)
    low, high = fields.levels
    if level is None:
        return low
    if not low <= level <= high:
        raise BdiffError(f"the end level must lie within the model's noise levels [{low:.4g}, {high:.4g}], "
                         f"got {level:.4g}")
    return float(level)


# Samples nearer the training rows than fresh rows are, by more than this share of their
# distance, are copies: at 0.1 (two standard errors of the ratio with 1000 samples and 2000 rows)
# the suite's 5000-row checkerboard (0.86 at ε_min) ended at ε, and its blur crossed the squares'
# edges: C2ST 0.525 -> 0.515 but far share 0.08 -> 0.80 %. The small tables that copy read 0.39-0.66.
COPY_TOLERANCE = 0.2
END_TRIAL_PARTICLES = 1000
END_BISECTIONS = 4  # from ε_min to the density's ε (a factor of 50-2000), within a factor of 1.5-1.6


def choose_end_level(fields, rows, cfg, decode=None):
    """(end level, {level tried: its nearest_ratio}) (docs/design.md §3.4). Annealed to ε_min, a
    model of a few hundred rows trained to the cap returns its training rows: the score at the
    lowest levels follows the rows themselves, and the samples of six small tables sat at
    0.39-0.66 of the rows' distance to their nearest neighbour (NOTES.md). On small draws of five
    laws, C2ST against fresh rows was 0.58-0.76 at ε_min and lowest where the ratio was nearest 1.
    Ending higher keeps that level's blur, p_ℓ = the model's law smoothed by N(0, ℓI). ε_min is
    kept unless its samples sit nearer the rows than COPY_TOLERANCE allows; otherwise the level,
    by bisection in log ℓ between ε_min and the density's ε, whose samples sit as far from the
    rows as the rows from each other. Never above ε: that blur is what the held-out likelihood
    chose. `decode` maps samples to what the user gets (columns snapped to their values), in the
    rows' units."""
    low, high = fields.levels[0], fields.eps
    decode = decode or (lambda x: x)
    scale = nearest_scale(rows, cfg.seed)  # the same for every trial
    ratios = {}
    if scale is None:  # atoms: no distance scale to copy at
        return low, {low: None}

    def ratio(level):
        trial = dataclasses.replace(cfg, end_level=level)
        try:
            x = sample(fields, END_TRIAL_PARTICLES, trial)[0]
        except UncoveredSupport:  # judged on copying, not support: `bdiff sample` reports that
            x = sample(fields, END_TRIAL_PARTICLES, dataclasses.replace(trial, trim=False))[0]
        ratios[level] = nearest_ratio(decode(x), rows, scale=scale)
        return ratios[level]

    if ratio(low) >= 1 - COPY_TOLERANCE or high <= low:
        return low, ratios
    if ratio(high) <= 1:
        return high, ratios
    for _ in range(END_BISECTIONS):
        middle = math.sqrt(low * high)
        low, high = (middle, high) if ratio(middle) < 1 else (low, middle)
    return min(ratios, key=lambda level: abs(math.log(max(ratios[level], 1e-12)))), ratios


class UncoveredSupport(BdiffError):
    """More than MAX_TRIMMED of the particles ended below the data's support floor."""


def sample(fields, n, cfg, device="cpu", on_batch=None):
    """n samples in standardised units and a report (sampler, step size, low-density share, the
    share trimmed below the data's support floor and drawn again, and what the sampler adds:
    SMC's effective sample size)."""
    cfg.validate()
    if n < 1:
        raise BdiffError(f"--n must be a positive number of samples, got {n}")
    check_memory(3 * 4 * n * fields.dim, "--n")  # float32 batches, their concatenation, the output
    check_memory(64 * min(n, cfg.batch_size) * (fields.dim + 512), "--batch-size")  # network activations
    chosen = SAMPLERS[cfg.sampler]
    if chosen.needs_levels and fields.levels is None:
        raise BdiffError(f"the {cfg.sampler} sampler needs a model trained with noise levels "
                         "(bdiff fit --eps-max, automatic for log fields)")
    plan, log_s_max = _plan(fields, cfg, device)
    floor = getattr(fields, "support_log_s", None) if cfg.trim else None
    batches, log_s_kept, extras, kept, trimmed = [], [], [], 0, 0
    while kept < n:
        count = min(cfg.batch_size, n - kept)
        x, log_s, extra = _draw_batch(fields, count, cfg, dataclasses.replace(plan, offset=kept + trimmed),
                                      device)
        if floor is not None:
            inside = log_s >= floor
            x, log_s = x[inside], log_s[inside]
            trimmed += count - len(x)
            if trimmed > MAX_TRIMMED * n:
                raise UncoveredSupport(f"{trimmed} of {kept + count} particles ended below the density "
                                 "of the data's lowest 0.1 %: the model does not cover its data (train "
                                 "longer?); --no-trim keeps them")
        kept += len(x)
        batches.append(x)
        log_s_kept.append(log_s)
        extras.append((count, extra))
        if on_batch is not None:
            on_batch(kept, n)
    x, log_s_end = torch.cat(batches), torch.cat(log_s_kept)
    report = {"sampler": cfg.sampler, "init": cfg.init, "steps": cfg.steps, "step_size": plan.h,
              "s_max": _exp(log_s_max), "denoise": cfg.denoise,
              "levels": list(fields.levels) if chosen.needs_levels else None,
              "end_level": plan.end_eps if chosen.needs_levels else None,
              "low_density_share": float((log_s_end <= plan.log_floor).float().mean()),
              "trimmed_share": None if floor is None else trimmed / (n + trimmed)}
    for key in extras[0][1]:  # the batches' mean, by particles drawn: a top-up batch is small
        values = [(count, e[key]) for count, e in extras if e[key] is not None]
        report[key] = sum(c * v for c, v in values) / sum(c for c, _ in values) if values else None
    return x, report


def _draw_batch(fields, count, cfg, plan, device):
    """One batch of particles from index plan.offset on: (x, log s at the density's ε, the
    sampler's report)."""
    chosen = SAMPLERS[cfg.sampler]
    generator = torch.Generator().manual_seed(stream_seed("sampler batch", cfg.seed, plan.offset))
    x = _start(fields, count, cfg, plan, generator, device)
    x, extra = chosen.run(fields, x, cfg, plan, generator)
    # an anneal that ends above ε_min keeps that level's blur on purpose (choose_end_level)
    if cfg.denoise and not (chosen.needs_levels and plan.end_eps > fields.levels[0]):
        score = fields.score(x, plan.end_eps)
        if plan.log_floor > -math.inf:  # no step where the density counts as zero
            log_s, _ = fields.log_fields(x)
            score = torch.where((log_s > plan.log_floor).unsqueeze(1), score, torch.zeros_like(score))
        x = x + plan.end_eps * score
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x).all(1)).sum())
        raise BdiffError(f"{bad} particles left the finite range; try fewer --steps or another "
                         "--sampler")
    return x, fields.log_fields(x)[0], extra

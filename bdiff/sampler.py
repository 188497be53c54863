"""Sampling with the Bellman SDE dx = ∇p dt + sqrt(p) dW or its preconditioned variant.

Particles start from the standardised data's Gaussian or from importance resampling of a
broad proposal with weights s/q (possible because s is a density, not a score), then
take Euler-Maruyama steps whose size follows the field scale (SPEC §1.3).

Level-conditioned models (fields of p_ε for ε from ε_max down to the model's ε) can also be
sampled by annealing: start from the broad p_εmax and follow p_ε down the ladder of levels.
"""
import math
from dataclasses import dataclass

import torch

from bdiff.backend import field_matching, oracle_sde_step, sde_step
from bdiff.errors import BdiffError
from bdiff.fields import log_view

SAMPLERS = ("bellman", "precond", "anneal")
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
    denoise: bool = False     # end with x + ε ∇log s (Tweedie): removes the N(0, εI) blur of p_ε
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
        if self.sampler == "anneal" and self.init != "gaussian":
            raise BdiffError("the anneal sampler starts from its broadest level's Gaussian; "
                             "--init importance does not apply to it")


def default_sample_config(param, leveled=False, **overrides):
    """Measured defaults (NOTES.md). Low-D linear fields: the paper's SDE from the importance
    start. Log-domain fields (high D): s spans hundreds of nats, so importance weights from a
    broad Gaussian degenerate, a floor relative to it kills every particle, and the paper's SDE
    stalls; Langevin on ∇log s (the preconditioned SDE with δ → 0) from the Gaussian works,
    and annealing through noise levels, where the model has them, works far better (digits
    FD 5.8 against 42-89): local dynamics at one small ε weigh each bump of p_ε by its basin."""
    if leveled:
        base = dict(sampler="anneal", init="gaussian", steps=200, floor_rel=0.0, delta_rel=0.0)
    elif param == "log":
        base = dict(sampler="precond", init="gaussian", steps=300, floor_rel=0.0, delta_rel=0.0)
    else:
        base = {}
    base.update({k: v for k, v in overrides.items() if v is not None})
    if base.get("sampler") == "anneal" and overrides.get("init") is None:
        base["init"] = "gaussian"  # the only start annealing has
    return SampleConfig(**base)


class OracleFields:
    """The exact smoothed fields of SPEC §1.1 against a reference set: a network-free sampler
    whose stationary law is known (data + N(0, εI))."""

    def __init__(self, refs, eps, log_c=0.0, backend=None):
        self.refs, self.eps, self.log_c, self.backend = refs, eps, log_c, backend

    def __call__(self, x):
        lse, mean = field_matching(x, self.refs, self.eps, None, self.backend)
        s = torch.exp(lse - self.log_c)
        return s, s.unsqueeze(1) * mean

    def log_fields(self, x, eps=None):
        """(log s, ∇log s) of p_ε, at the oracle's own ε or any other (the annealed sampler)."""
        lse, mean = field_matching(x, self.refs, self.eps if eps is None else eps, None, self.backend)
        return lse - self.log_c, mean


def linear_to_log(fields_fn):
    """(log s, ∇log s) from a function returning (s, g)."""
    return lambda x: log_view(*fields_fn(x))


def field_scale(fields_fn, log_fields_fn, dim, cfg, device):
    """(log of max s, 99th percentile of ‖g‖) on a probe of the start distribution."""
    generator = torch.Generator().manual_seed(cfg.seed + 7_777)
    probe = (torch.randn(8192, dim, generator=generator) * cfg.proposal_std).to(device)
    log_s, _ = log_fields_fn(probe)
    _, g = fields_fn(probe)
    log_s_max, g_scale = float(log_s.max()), float(torch.quantile(g.norm(dim=1).float(), 0.99))
    if not (math.isfinite(log_s_max) and math.isfinite(g_scale)):
        raise BdiffError("the scalar field is not positive anywhere near the data: "
                         "the model is untrained or broken")
    return log_s_max, max(g_scale, 1e-12)


def _initial(log_fields_fn, n, dim, cfg, log_floor, generator, device, levels=None):
    if cfg.sampler == "anneal":  # p_εmax ≈ the data's Gaussian widened by ε_max
        std = math.sqrt(cfg.proposal_std ** 2 + levels[1])
        return (torch.randn(n, dim, generator=generator) * std).to(device)
    if cfg.init == "gaussian":
        return (torch.randn(n, dim, generator=generator) * cfg.proposal_std).to(device)
    candidates = torch.randn(n * cfg.oversample, dim, generator=generator) * cfg.proposal_std
    candidates = candidates.to(device)
    log_s, _ = log_fields_fn(candidates)
    log_q = -0.5 * (candidates / cfg.proposal_std).pow(2).sum(1)
    log_w = torch.where(log_s > log_floor, log_s - log_q, -math.inf)
    if not torch.isfinite(log_w).any():
        raise BdiffError("importance start found no candidate with positive density")
    weights = torch.softmax(log_w.double().cpu(), 0)
    picks = torch.multinomial(weights, n, replacement=True, generator=generator)
    return candidates[picks.to(device)]


# The preconditioned step in units of δ: r = s/δ is capped here, where its drift and diffusion
# factors r(r+2)/(r+1)² and r/(r+1) are 1 to float32 precision, so exp never overflows.
MAX_LOG_RATIO = 30.0


def _advance(fields_fn, log_fields_fn, x, log_floor, h, seed, step, offset, log_delta, backend):
    s_floor = math.exp(log_floor) if log_floor > -700 else 0.0
    delta = None if log_delta is None else max(math.exp(log_delta), 1e-30)
    langevin_limit = log_delta is not None and log_delta < -700  # δ underflows: use log fields
    if isinstance(fields_fn, OracleFields) and not langevin_limit:  # one launch where possible
        return oracle_sde_step(x, fields_fn.refs, fields_fn.eps, fields_fn.log_c, s_floor, h, seed,
                               step, offset, delta, fields_fn.backend)
    if log_delta is not None and log_fields_fn is not None:
        # the same step from (log s, ∇log s): exact where s spans hundreds of nats (high D)
        log_s, score = log_fields_fn(x)
        alive = log_s > log_floor
        ratio = torch.exp(torch.where(alive, log_s - log_delta, torch.full_like(log_s, -math.inf))
                          .clamp_max(MAX_LOG_RATIO))
        return sde_step(x, ratio, ratio.unsqueeze(1) * score, h, seed, step, offset, 1.0, backend)
    s, g = fields_fn(x)
    # below the floor the density counts as zero, and so does its gradient: a spurious g there
    # divided by a tiny s + δ would throw preconditioned particles far away
    alive = s > s_floor
    s = torch.where(alive, s, torch.zeros_like(s))
    g = torch.where(alive.unsqueeze(1), g, torch.zeros_like(g))
    return sde_step(x, s, g, h, seed, step, offset, delta, backend)


def anneal(log_fields_fn, x, levels, cfg, offset):
    """Down a geometric ladder of cfg.steps levels from ε_max to ε_min, each step the
    reverse-time move from p_hi to p_lo = p_hi deconvolved by N(0, (hi - lo) I):
    x += (hi - lo) ∇log p_hi(x) + sqrt(hi - lo) ξ, which is the plain Bellman step with s ≡ 1."""
    ladder = torch.logspace(math.log10(levels[1]), math.log10(levels[0]), cfg.steps + 1,
                            dtype=torch.float64).tolist()
    unit = torch.ones(x.shape[0], dtype=x.dtype, device=x.device)
    for step, (hi, lo) in enumerate(zip(ladder, ladder[1:])):
        _, score = log_fields_fn(x, hi)
        x = sde_step(x, unit, score, hi - lo, cfg.seed, step, offset, None, cfg.backend)
    return x


def sample(fields_fn, dim, eps, n, cfg, device="cpu", on_batch=None, log_fields_fn=None, levels=None):
    """n samples in standardised units and a report (step size, low-density share).

    fields_fn gives (s, g); log_fields_fn, where the model has it, gives (log s, ∇log s)
    without underflow and is then used for the start, the preconditioned step and denoising.
    levels=(ε_min, ε_max): log_fields_fn(x, ε) gives the fields of p_ε in that range, which
    the anneal sampler needs.
    """
    if cfg.sampler == "anneal" and (levels is None or log_fields_fn is None):
        raise BdiffError("the anneal sampler needs a model trained with noise levels "
                         "(bdiff fit --eps-max, automatic for log fields)")
    cfg.validate()
    if n < 1:
        raise BdiffError(f"--n must be a positive number of samples, got {n}")
    exact_log = log_fields_fn is not None
    log_fields_fn = log_fields_fn or linear_to_log(fields_fn)
    log_s_max, g_scale = field_scale(fields_fn, log_fields_fn, dim, cfg, device)
    log_floor = math.log(cfg.floor_rel) + log_s_max if cfg.floor_rel > 0 else -math.inf
    if cfg.sampler == "bellman":
        h, log_delta = cfg.step_frac * math.sqrt(eps) / g_scale, None
    elif cfg.sampler == "anneal":
        h, log_delta = None, None
    else:
        # delta_rel = 0: the δ → 0 limit, Langevin dynamics on ∇log s
        log_delta = math.log(cfg.delta_rel) + log_s_max if cfg.delta_rel > 0 else -math.inf
        h = cfg.precond_step * eps
    batches = []
    for start in range(0, n, cfg.batch_size):
        count = min(cfg.batch_size, n - start)
        generator = torch.Generator().manual_seed(cfg.seed * 7_919 + start)
        x = _initial(log_fields_fn, count, dim, cfg, log_floor, generator, device, levels)
        if cfg.sampler == "anneal":
            x = anneal(log_fields_fn, x, levels, cfg, start)
        else:
            for step in range(cfg.steps):
                x = _advance(fields_fn, log_fields_fn if exact_log else None, x, log_floor, h,
                             cfg.seed, step, start, log_delta, cfg.backend)
        if cfg.denoise:
            log_s, score = log_fields_fn(x)
            x = x + eps * torch.where((log_s > log_floor).unsqueeze(1), score, torch.zeros_like(score))
        batches.append(x)
        if on_batch is not None:
            on_batch(start + count, n)
    x = torch.cat(batches)
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x).all(1)).sum())
        raise BdiffError(f"{bad} particles left the finite range; try fewer --steps or another "
                         "--sampler")
    log_s_end, _ = log_fields_fn(x)
    report = {"sampler": cfg.sampler, "init": cfg.init, "steps": cfg.steps, "step_size": h,
              "s_max": math.exp(min(log_s_max, 700.0)), "denoise": cfg.denoise,
              "levels": None if cfg.sampler != "anneal" else list(levels),
              "low_density_share": float((log_s_end <= log_floor).float().mean())}
    return x, report

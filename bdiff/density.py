"""The learned density as a proper density: its log at any level, its normaliser by importance
sampling, and the choice of ε by the learned model's own held-out likelihood (docs/design.md §2.3)."""
import math

import torch

from bdiff.backend import draw, field_matching


def log_density_std(fields_net, x_std, eps, log_c):
    """log p̂_ε at standardised points (float64): s ≈ exp(log ŝ - log C), ŝ = (2πε)^{D/2} p_ε,
    one log C for every level (each p_ε is a mean of normalised kernels); -inf where a linear
    s ≤ 0. Not renormalised: `normaliser` estimates its integral."""
    log_s, _ = fields_net.fields_batched(x_std, log=True, eps=eps)
    return log_s.double() + log_c - 0.5 * x_std.shape[1] * math.log(2 * math.pi * eps)


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
    log_broad = (-0.5 * points.double().pow(2).sum(1) / broad_std**2
                 - 0.5 * dim * math.log(2 * math.pi * broad_std**2))
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
    Returns (ε, [(ε, score, Z, se)])."""
    scores = []
    for eps in candidates:
        def log_p(x, eps=eps):
            return log_density_std(fields_net, x, eps, log_c)
        z, se = normaliser(log_p, refs, eps, n=8192, seed=seed)
        score = float(log_p(val_rows).mean()) - math.log(max(z, 1e-300))
        scores.append((eps, score, z, se))
    usable = []
    for item in scores:
        if not reliable(item[2], item[3]):
            break
        usable.append(item)
    return (max(usable, key=lambda item: item[1])[0] if usable else candidates[0]), scores

"""Float64 reference twins of every kernel: plain, materialised, slow, obviously right.

Tests compare the fast paths against these; nothing on a hot path calls them.
"""
import math

import torch


def field_matching_reference(x, y, eps, exclude=None):
    """log ŝ(x) - log(#refs) and the softmax-weighted mean of (y - x)/eps, in float64.

    eps: a float or a (B,) tensor, one ε per query row. exclude: optional (B,) long tensor,
    reference index skipped for each query (-1: none).
    """
    x64, y64 = x.double(), y.double()
    if torch.is_tensor(eps):
        eps = eps.to(x.device, torch.float64)[:, None]
    logits = -torch.cdist(x64, y64).pow(2) / (2 * eps)
    count = torch.full((x.shape[0],), y.shape[0], dtype=torch.float64, device=x.device)
    if exclude is not None:
        rows = torch.nonzero(exclude >= 0).squeeze(1)
        logits[rows, exclude[rows]] = -math.inf
        count[rows] -= 1
    lse = torch.logsumexp(logits, dim=1)
    weights = torch.softmax(logits, dim=1)
    mean = (weights @ y64 - x64) / eps
    return lse - count.log(), mean


def sde_step_reference(x, s, g, noise, h, delta=None):
    """One Euler-Maruyama step of dx = a∇p dt + sqrt(a p) dW from given field values.

    delta=None: the paper's SDE (a = 1). delta > 0: a = 1/(p + delta), whose drift
    a∇p + ½p∇a = g (p + 2δ) / (2 (p + δ)²) and diffusion sqrt(p / (p + δ)).
    """
    x64, g64, noise64 = x.double(), g.double(), noise.double()
    p = s.double().clamp_min(0).unsqueeze(1)
    if delta is None:
        drift, diffusion = g64, p.sqrt()
    else:
        drift = g64 * (p + 2 * delta) / (2 * (p + delta) ** 2)
        diffusion = (p / (p + delta)).sqrt()
    return x64 + h * drift + math.sqrt(h) * diffusion * noise64

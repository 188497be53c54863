"""Pareto-smoothed importance sampling (PSIS; Vehtari, Simpson, Gelman, Yao and Gabry 2024).

Written here rather than imported: arviz-stats has it, but importing that package pulls in
scipy's signal, optimize and stats modules, 1.4 s of every `bdiff sample` on a slow 2-core
machine, where the whole command has 10 s (NOTES.md). tests/test_sampler.py checks this
against arviz-stats's `psislw` on heavy-tailed weights.
"""
import math

import numpy as np

PRIOR_SHAPE, PRIOR_SHAPE_WEIGHT = 0.5, 10  # the paper's weakly informative prior on k: 10 draws' worth at 0.5


def tail_size(n):
    """How many of the largest weights the Pareto fit replaces: 3 sqrt(n), or n/5 for n ≤ 225."""
    return int(math.floor(3 * math.sqrt(n))) if n > 225 else n // 5


def fit_generalized_pareto(exceedances):
    """(k, σ) of a generalized Pareto law fitted to sorted positive exceedances by Zhang and
    Stephens's (2009) empirical Bayes estimate, k then shrunk towards 0.5 by the paper's prior."""
    n = len(exceedances)
    grid = 30 + int(math.sqrt(n))
    # candidate θ = -k/σ, spread between -∞ and 1/max by quantiles of the profile's prior
    theta = 1 / exceedances[-1] + (1 - np.sqrt(grid / (np.arange(1, grid + 1) - 0.5))) / (
        3 * exceedances[int(n / 4 + 0.5) - 1])
    k = np.log1p(-theta[:, None] * exceedances).mean(1)
    profile = n * (np.log(-theta / k) - k - 1)  # the profile log-likelihood of each θ
    weights = np.exp(profile - profile.max())
    weights /= weights.sum()
    kept = weights >= 10 * np.finfo(float).eps  # negligible θ only add rounding
    theta_mean = np.sum(theta[kept] * weights[kept]) / weights[kept].sum()
    k = np.log1p(-theta_mean * exceedances).mean()
    sigma = -k / theta_mean
    return (n * k + PRIOR_SHAPE_WEIGHT * PRIOR_SHAPE) / (n + PRIOR_SHAPE_WEIGHT), sigma


def pareto_smoothed(log_weights):
    """(smoothed log weights, k̂) of a 1-D array of log importance weights: the tail_size(n)
    largest become the quantiles (i - 1/2)/M of the generalized Pareto fitted to their excess over
    the next largest, capped at the largest raw weight. The log weights come back shifted by
    their maximum (weights are defined up to a constant). Raises ValueError where the tail is
    under 5 weights or all ties: there is nothing to fit."""
    log_w = np.array(log_weights, dtype=np.float64)
    log_w -= log_w.max()
    size = tail_size(len(log_w))
    if size < 5:
        raise ValueError(f"PSIS needs a tail of at least 5 weights, got {size} of {len(log_w)}")
    order = np.argsort(log_w)
    tail = order[-size:]
    largest = log_w[tail]
    if largest[-1] - largest[0] < np.finfo(float).tiny:
        raise ValueError("the tail's weights are all equal")
    cutoff = math.exp(log_w[order[-size - 1]])
    k, sigma = fit_generalized_pareto(np.exp(largest) - cutoff)
    if np.isfinite(k):
        quantiles = generalized_pareto_quantiles((np.arange(size) + 0.5) / size, k, sigma)
        log_w[tail] = np.minimum(np.log(cutoff + quantiles), largest[-1])
    return log_w, float(k)


def generalized_pareto_quantiles(probs, k, sigma):
    """The quantiles at `probs` of a generalized Pareto law of shape k and scale σ from 0 (NaN
    where σ ≤ 0: no law to read)."""
    if sigma <= 0:
        return np.full(len(probs), np.nan)
    if k == 0:
        return -sigma * np.log1p(-probs)
    return sigma * np.expm1(-k * np.log1p(-probs)) / k

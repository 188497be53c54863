"""Sample and density quality: MMD, sliced Wasserstein, energy distance, log-likelihood,
field error against a known density, and mixture mode-weight error."""
import math

import numpy as np
import torch

from bdiff.backend import field_matching
from bdiff.errors import BdiffError

MMD_BANDWIDTH = 0.3  # Gaussian kernel width, in standardised units


def _tensor(values):
    return torch.as_tensor(np.ascontiguousarray(values), dtype=torch.float32)


def _mean_kernel(x, y, bandwidth, same):
    """Mean of exp(-‖x - y‖²/(2 bw²)) over pairs, skipping i = j when x is y (U-statistic)."""
    exclude = torch.arange(len(x)) if same else None
    lse, _ = field_matching(x, y, bandwidth**2, exclude)
    return float(torch.exp(lse.double()).mean())


def mmd(x, y, bandwidth=MMD_BANDWIDTH):
    """Unbiased estimate of MMD² with a Gaussian kernel (can be slightly negative)."""
    x, y = _tensor(x), _tensor(y)
    return (_mean_kernel(x, x, bandwidth, True) + _mean_kernel(y, y, bandwidth, True)
            - 2 * _mean_kernel(x, y, bandwidth, False))


def sliced_wasserstein(x, y, projections=256, seed=0, directions=None):
    """Mean over random unit directions (D, P) of the exact 1-D W1 between the projections."""
    x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    if directions is None:
        generator = torch.Generator().manual_seed(seed)
        directions = torch.randn(x.shape[1], projections, generator=generator, dtype=torch.float64)
    dirs = torch.as_tensor(directions, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    projections = dirs.shape[1]
    total = 0.0
    for chunk in dirs.split(32, dim=1):
        total += float(_w1_1d(x @ chunk, y @ chunk).sum())
    return total / projections


def _w1_1d(a, b):
    """Exact W1 = ∫|F_a - F_b| for each column of a (n, P) and b (m, P)."""
    values = torch.cat([a, b])
    order = values.argsort(0)
    sorted_values = values.gather(0, order)
    step = torch.cat([torch.full_like(a, 1 / len(a)), torch.full_like(b, -1 / len(b))]).gather(0, order)
    cdf_gap = step.cumsum(0)[:-1].abs()
    return (cdf_gap * sorted_values.diff(dim=0)).sum(0)


def _mean_distance(x, y, chunk=2048):
    total = 0.0
    for i in range(0, len(x), chunk):
        total += float(torch.cdist(x[i:i + chunk], y).sum())
    return total / (len(x) * len(y))


def energy_distance(x, y):
    """sqrt(2E|X-Y| - E|X-X'| - E|Y-Y'|) over the empirical laws (scipy's definition)."""
    x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    value = 2 * _mean_distance(x, y) - _mean_distance(x, x) - _mean_distance(y, y)
    return math.sqrt(max(value, 0.0))


def mode_weights(law, values):
    return np.bincount(law.component(values), minlength=len(law.weights)) / len(values)


def mode_weight_error(law, values):
    """Largest absolute error of the mixture weights, samples assigned to their component."""
    return float(np.abs(mode_weights(law, values) - law.weights).max())


def field_grid(values, points=160):
    """A regular grid over the data range (1-D or 2-D), padded by 15%."""
    low, high = values.min(0), values.max(0)
    pad = 0.15 * (high - low)
    axes = [np.linspace(lo, hi, points) for lo, hi in zip(low - pad, high + pad)]
    mesh = np.meshgrid(*axes, indexing="ij")
    return axes, np.stack([m.ravel() for m in mesh], 1)


def field_errors(model, law, reference_values):
    """Relative L1 error of the density and relative L2 error of its gradient on a grid,
    against the true density smoothed by the model's ε (the model's own target)."""
    _, grid = field_grid(reference_values)
    noise_var = model.eps * model.standardizer.std**2
    true = law.smoothed_density(grid, noise_var)
    step = 1e-4 * model.standardizer.std
    true_grad = np.stack([(law.smoothed_density(grid + step * e, noise_var)
                           - law.smoothed_density(grid - step * e, noise_var)) / (2 * step[i])
                          for i, e in enumerate(np.eye(grid.shape[1]))], 1)
    density, gradient = model.fields_in_data_units(grid.astype(np.float32))
    return {"field_error_s": float(np.abs(density - true).sum() / true.sum()),
            "field_error_g": float(np.sqrt(((gradient - true_grad) ** 2).sum() / (true_grad**2).sum()))}


def held_out_loglik(model, values):
    """Mean held-out log-likelihood of the normalised scalar field. Points where s is below
    1e-6 of the largest held-out density are floored there (their share is reported);
    `loglik_unfloored` is the plain mean (-inf where a linear s is not positive)."""
    log_p = model.log_density(values)
    floor = np.max(log_p) + math.log(1e-6)
    return {"loglik": float(np.maximum(log_p, floor).mean()),
            "loglik_floored_share": float((log_p < floor).mean()),
            "loglik_unfloored": float(log_p.mean())}


def split_heldout(values, seed=0):
    """Two disjoint halves: A to compare against, B to build the ideal reference from."""
    if len(values) < 4:
        raise BdiffError("held-out data needs at least 4 rows to evaluate against")
    order = np.random.default_rng(seed).permutation(len(values))
    half = len(values) // 2
    return values[order[:half]], values[order[half:2 * half]]


def sample_metrics(samples_std, reference_std, bandwidth=MMD_BANDWIDTH):
    return {"mmd": mmd(samples_std, reference_std, bandwidth),
            "sliced_wasserstein": sliced_wasserstein(samples_std, reference_std),
            "energy_distance": energy_distance(samples_std, reference_std)}


def evaluate(model, heldout, samples, law=None, seed=0):
    """All metrics as a flat dict. `samples` and `heldout` are in data units; distances are
    computed in the model's standardised units. The ideal reference is held-out half B plus
    N(0, εI) noise, compared against half A exactly as the model's samples are."""
    model.check_dim(heldout, "the held-out data")
    model.check_dim(samples, "the samples")
    half_a, half_b = split_heldout(heldout, seed)
    rng = np.random.default_rng(seed + 1)
    to_std = model.standardizer.forward
    a_std = to_std(half_a)
    ideal_std = to_std(half_b) + rng.normal(size=half_b.shape).astype(np.float32) * math.sqrt(model.eps)
    picked = samples[rng.permutation(len(samples))[:len(half_b)]]
    result = sample_metrics(to_std(picked), a_std)
    result.update({f"{k}_ideal": v for k, v in sample_metrics(ideal_std, a_std).items()})
    result.update(held_out_loglik(model, heldout))
    result["n_samples"], result["n_heldout"] = len(picked), len(heldout)
    if law is not None:
        noise_var = model.eps * model.standardizer.std**2
        result["loglik_true"] = float(np.log(law.smoothed_density(heldout.astype(np.float64), noise_var)).mean())
        if heldout.shape[1] <= 2:
            result.update(field_errors(model, law, heldout))
        if hasattr(law, "component") and law.weights is not None and len(law.weights) <= 8:
            result["mode_weight_error"] = mode_weight_error(law, samples)
            result["mode_weight_error_ideal"] = mode_weight_error(law, model.standardizer.inverse(ideal_std))
        if hasattr(law, "outside_share") and heldout.shape[1] == 1:
            margin = 2 * math.sqrt(model.eps) * model.standardizer.std
            result["outside_share"] = law.outside_share(samples, margin)
    return result

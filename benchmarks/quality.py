"""Quality and speed of every gradient loss x sampler on the built-in mixture and intervals.

    python benchmarks/quality.py                       # full table (about 15 min on 2 cores)
    python benchmarks/quality.py --losses direct --datasets mixture

Fits each loss with the default settings, samples 10 000 points with each sampler/start,
and evaluates against the held-out split. Prints a markdown table; --json writes records.
"""
import argparse
import json
import os
import time

import torch

from bdiff.datasets import BUILTINS
from bdiff.errors import BdiffError
from bdiff.metrics import evaluate
from bdiff.model import TrainedModel
from bdiff.sampler import SampleConfig, sample
from bdiff.trainer import FitConfig, Trainer

COMBOS = [("bellman", "importance"), ("precond", "importance"), ("bellman", "gaussian"),
          ("precond", "gaussian")]
KEYS = ["mmd", "mmd_ideal", "sliced_wasserstein", "sliced_wasserstein_ideal", "mode_weight_error",
        "outside_share", "field_error_s", "loglik", "loglik_true"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["mixture", "intervals"])
    parser.add_argument("--losses", nargs="+", default=["direct", "divergence", "sliced"])
    parser.add_argument("--steps", type=int, default=FitConfig.steps)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--json", default=None)
    parser.add_argument("--reuse", action="store_true", help="load an earlier run's checkpoints")
    args = parser.parse_args()
    torch.set_num_threads(2)
    records = []
    for name in args.datasets:
        train, heldout = BUILTINS[name].load("train"), BUILTINS[name].load("heldout")
        for loss in args.losses:
            path = f"/tmp/bdiff-quality-{name}-{loss}.safetensors"
            if not (args.reuse and os.path.exists(path)):
                Trainer(train, FitConfig(steps=args.steps, grad_loss=loss), name).run(path)
            model = TrainedModel.load(path)
            fit_s = model.meta["train_seconds"]
            for sampler_name, init in COMBOS:
                start = time.perf_counter()
                try:
                    x, report = sample(model.fields, model.dim, model.eps, args.n,
                                       SampleConfig(sampler=sampler_name, init=init))
                except BdiffError as error:
                    records.append({"dataset": name, "loss": loss, "sampler": sampler_name,
                                    "init": init, "fit_s": round(fit_s, 1), "error": str(error)})
                    print(json.dumps(records[-1]), flush=True)
                    continue
                sample_s = time.perf_counter() - start
                values = model.standardizer.inverse(x.numpy())
                metrics = evaluate(model, heldout, values, BUILTINS[name].law)
                record = {"dataset": name, "loss": loss, "sampler": sampler_name, "init": init,
                          "fit_s": round(fit_s, 1), "sample_s": round(sample_s, 2),
                          "low_density_share": report["low_density_share"]}
                record.update({k: metrics[k] for k in KEYS if k in metrics})
                records.append(record)
                print(json.dumps(record), flush=True)
    cols = ["dataset", "loss", "sampler", "init", "fit_s", "sample_s", "mmd", "mmd_ideal",
            "sliced_wasserstein", "mode_weight_error", "outside_share", "field_error_s",
            "low_density_share", "error"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in records:
        print("| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(records, handle, indent=1)


def _fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)


if __name__ == "__main__":
    main()

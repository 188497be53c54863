"""Digits (sklearn 8x8, fixed 80/20 split): Bellman Diffusion against a small DDPM and
sklearn KDE (raw pixels and PCA-15), same data and split, the same training steps (bdiff
with the CLI defaults). One table: digits FD, class-histogram entropy, mean classifier
confidence, memorisation ratio, the pixel checks (share outside the data's range, blank-pixel
sd, pixel W1), held-out log-likelihood where defined, training and sampling time.

    python benchmarks/digits.py [--steps 6000] [--n 2000] [--seeds 3] [--draws 3]

FD on 2000 samples is noisy: one model's sampler seeds spread 4.3-6.4, and 2000 training rows
drawn again read 2.4-3.5. Each trained model is therefore sampled `--draws` times, and the
table gives the mean FD over every draw with its standard error.

Writes benchmarks/results/digits.json and the sample grids digits_<method>.png.
"""
import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from sklearn.decomposition import PCA
from sklearn.neighbors import KernelDensity

from baselines.ddpm import DDPM
from bdiff.data import Standardizer, load_data
from bdiff.images import image_metrics, pixel_metrics
from bdiff.model import TrainedModel
from bdiff.plots import plot_image_grid
from bdiff.trainer import IMAGE_STEPS, FitConfig, Trainer

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def kde_by_heldout(train, bandwidths, seed=0):
    """Bandwidth by held-out likelihood on a fixed 20% of the training rows, refit on all."""
    order = np.random.default_rng(seed).permutation(len(train))
    cut = int(0.8 * len(train))
    fit, check = train[order[:cut]], train[order[cut:]]
    scores = [KernelDensity(bandwidth=b).fit(fit).score_samples(check).mean() for b in bandwidths]
    best = float(bandwidths[int(np.argmax(scores))])
    return KernelDensity(bandwidth=best).fit(train), best


def run_bdiff(train, steps, n, seed, draws):
    """The CLI defaults (`bdiff fit digits`, `bdiff sample`), with --steps and a seed; `draws`
    sample sets from sampler seeds seed·draws + k."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "digits.safetensors")
        trainer = Trainer(train, FitConfig(steps=steps, seed=seed), "digits", (8, 8))
        fit_s = trainer.run(path)
        model = TrainedModel.load(path)
    sets = []
    for k in range(draws):
        cfg = model.sample_config(seed=seed * draws + k)
        start = time.perf_counter()
        x, report = model.sample(n, cfg)
        sets.append((model.standardizer.inverse(x.numpy()), time.perf_counter() - start))
    extra = {"eps": model.eps, "levels": model.levels, "low_density_share": report["low_density_share"],
             "parameters": sum(p.numel() for p in model.fields_net.parameters()),
             "sampler": f"{cfg.sampler}, {cfg.init} start, {cfg.steps} steps, denoise {cfg.denoise}"}
    return sets, fit_s, model, extra


def run_ddpm(train, steps, n, seed, draws):
    scaler = Standardizer.fit(train, pooled=True)
    ddpm = DDPM(train.shape[1], seed=seed)
    fit_s = ddpm.fit(torch.from_numpy(scaler.forward(train)), steps=steps)
    sets = []
    for _ in range(draws):
        start = time.perf_counter()
        x = ddpm.sample(n, train.shape[1])
        sets.append((scaler.inverse(x.numpy()), time.perf_counter() - start))
    return sets, fit_s, {"parameters": ddpm.n_parameters()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps, bdiff and DDPM (default: bdiff's for image data)")
    parser.add_argument("--n", type=int, default=2000, help="samples per method")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds for bdiff and DDPM")
    parser.add_argument("--draws", type=int, default=3, help="sample sets per trained model")
    parser.add_argument("--out", default=os.path.join(RESULTS, "digits.json"))
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    train, heldout = load_data("digits").values, load_data("digits", split="heldout").values
    rows = []

    def add(method, runs, **extra):
        """runs: (samples, fit_s, sample_s, held-out loglik or None) per sample set; the row
        holds the means, every set's FD, and the first set's class histogram and image grid."""
        per_seed = [{**image_metrics(samples, heldout, train), **pixel_metrics(samples, heldout, train)}
                    for samples, *_ in runs]
        row = {"method": method, **per_seed[0]}
        for key in ("digits_fd", "class_entropy", "mean_confidence", "nn_ratio", "classes_present",
                    "pixel_outside_share", "blank_pixel_sd", "pixel_w1"):
            row[key] = float(np.mean([m[key] for m in per_seed]))
        row["digits_fd_seeds"] = [m["digits_fd"] for m in per_seed]
        row["digits_fd_se"] = float(np.std(row["digits_fd_seeds"], ddof=1) / np.sqrt(len(per_seed))) \
            if len(per_seed) > 1 else None
        logliks = [run[3] for run in runs if run[3] is not None]
        row["heldout_loglik"] = float(np.mean(logliks)) if logliks else None
        row["fit_s"] = float(np.mean([run[1] for run in runs]))
        row["sample_s"] = float(np.mean([run[2] for run in runs]))
        rows.append({**row, **extra})
        slug = "".join(c for c in method.split(" (")[0].lower().replace(" ", "_") if c.isalnum() or c == "_")
        plot_image_grid(os.path.join(RESULTS, f"digits_{slug}.png"), runs[0][0], (8, 8), title=method)
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "class_histogram"}), flush=True)

    pick = np.random.default_rng(0).permutation(len(train))[:len(heldout)]
    add("training images (floor)", [(train[pick], 0.0, 0.0, None)])

    runs, unnormalised = [], []
    for seed in range(args.seeds):
        sets, fit_s, model, extra = run_bdiff(train, args.steps, args.n, seed, args.draws)
        # in 64-D the normaliser cannot be estimated: no likelihood in the table (as `evaluate`)
        unnormalised.append(float(model.log_density(heldout).mean()))
        runs += [(samples, fit_s, sample_s, None) for samples, sample_s in sets]
    add("bdiff", runs, heldout_loglik_unnormalised=float(np.mean(unnormalised)), **extra)

    runs = []
    for seed in range(args.seeds):
        sets, fit_s, extra = run_ddpm(train, args.steps or IMAGE_STEPS, args.n, seed, args.draws)
        runs += [(samples, fit_s, sample_s, None) for samples, sample_s in sets]
    add("DDPM", runs, **extra)

    start = time.perf_counter()
    kde, bandwidth = kde_by_heldout(train, np.logspace(-0.5, 1.0, 16))
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    samples = kde.sample(args.n, random_state=0).astype(np.float32)
    add("KDE raw pixels", [(samples, fit_s, time.perf_counter() - start,
                            float(kde.score_samples(heldout).mean()))], bandwidth=bandwidth)

    start = time.perf_counter()
    pca = PCA(15, whiten=False, random_state=0).fit(train)
    kde, bandwidth = kde_by_heldout(pca.transform(train), np.logspace(-0.5, 1.0, 16))
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    samples = pca.inverse_transform(kde.sample(args.n, random_state=0)).astype(np.float32)
    add("KDE PCA-15", [(samples, fit_s, time.perf_counter() - start, None)], bandwidth=bandwidth,
        note="likelihood lives in the 15-D PCA space, not comparable")

    table = Table(title=f"digits: {args.n} samples each, FD to the 360 held-out images; "
                        f"bdiff and DDPM: mean ± s.e. (range) over {args.seeds} training seeds × "
                        f"{args.draws} draws")
    for column in ("method", "digits FD", "class entropy", "classes", "confidence", "nn ratio",
                   "outside", "blank sd", "pixel W1", "held-out loglik", "fit s", "sample s"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for row in rows:
        loglik = "–" if row["heldout_loglik"] is None else f"{row['heldout_loglik']:.1f}"
        seeds = row["digits_fd_seeds"]
        fd = f"{row['digits_fd']:.2f}" + (f" ± {row['digits_fd_se']:.2f} ({min(seeds):.2f}–{max(seeds):.2f})"
                                          if len(seeds) > 1 else "")
        table.add_row(row["method"], fd, f"{row['class_entropy']:.3f}",
                      f"{row['classes_present']:g}", f"{row['mean_confidence']:.3f}",
                      f"{row['nn_ratio']:.2f}", f"{row['pixel_outside_share']:.4f}",
                      f"{row['blank_pixel_sd']:.3f} ({row['blank_pixel_sd_ideal']:.3f})",
                      f"{row['pixel_w1']:.3f}", loglik, f"{row['fit_s']:.1f}", f"{row['sample_s']:.1f}")
    Console(width=150).print(table)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()

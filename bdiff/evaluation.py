"""`bdiff evaluate` as one engine function: which data to score against, the samples (given
or drawn now), every metric, the warnings. The CLI only parses and prints (docs/design.md §4)."""
import os
from dataclasses import dataclass, field

import numpy as np

from bdiff.data import fingerprint, is_image, load_data
from bdiff.datasets import BUILTINS
from bdiff.errors import BdiffError
from bdiff.images import image_metrics, is_digits_shape, pixel_metrics
from bdiff.metrics import evaluate, quality_warnings
from bdiff.model import TrainedModel
from bdiff.sampler import sampler_warnings

DEFAULT_SAMPLES = 10_000
SAMPLING_OPTIONS = ("n", "sampler", "init", "steps", "denoise", "trim")


@dataclass
class Evaluation:
    metrics: dict
    model: TrainedModel
    data_name: str
    heldout: np.ndarray
    train: np.ndarray      # None where unknown
    samples: np.ndarray
    item_shape: tuple
    law: object            # the known density of a built-in, else None
    warnings: list = field(default_factory=list)


def _builtin(name):
    return BUILTINS.get(name) if name in BUILTINS and not os.path.exists(name) else None


def evaluate_checkpoint(checkpoint, data=None, train=None, samples=None, key=None, seed=0,
                        device="cpu", sampling=None, on_batch=None):
    """Score the model in `checkpoint` against held-out rows.

    data: a file or a built-in name (its held-out split); None only for models of a built-in,
    because a path stored in a checkpoint is never opened. The held-out rows must not be the
    training rows (checked by fingerprint). sampling: the options for drawing samples now
    (n, sampler, init, steps, denoise, trim; None values take the model's defaults); refused with
    `samples`, where they would do nothing."""
    sampling = {k: v for k, v in (sampling or {}).items() if v is not None}
    unknown = set(sampling) - set(SAMPLING_OPTIONS)
    if unknown:
        raise ValueError(f"unknown sampling options {sorted(unknown)}")
    if samples is not None and sampling:
        names = ", ".join(f"--{k}" for k in sampling)
        raise BdiffError(f"{names} apply when evaluate draws the samples; with --samples they would "
                         "do nothing")
    model = TrainedModel.load(checkpoint, device)
    source = model.meta.get("source")
    if data is None:
        if _builtin(source) is None:
            raise BdiffError(f"give held-out data with --data: the model was trained on {source!r}, "
                             "and a path stored in a checkpoint is never opened")
        data = source
    heldout = load_data(data, key=key, split="heldout").values
    model.check_dim(heldout, f"held-out data {data}")
    if _builtin(data) is None and fingerprint(heldout) == model.meta["fingerprint"]:
        raise BdiffError(f"{data} is the training data of this model; evaluate needs rows it never saw")
    builtin = _builtin(data)
    warnings = []
    if train is not None:
        train_values = load_data(train, key=key).values
        model.check_dim(train_values, f"training data {train}")
        if fingerprint(train_values) != model.meta["fingerprint"]:
            warnings.append(f"{train} is not the data this model was trained on")
    else:
        train_values = load_data(data, split="train").values if builtin is not None else None
    report = {}
    if samples is not None:
        values = load_data(str(samples)).values
    else:
        cfg = model.sample_config(seed=seed, **{k: v for k, v in sampling.items() if k != "n"})
        values, report = model.sample_values(sampling.get("n", DEFAULT_SAMPLES), cfg, on_batch)
    law = builtin.law if builtin is not None else None
    metrics = evaluate(model, heldout, values, train=train_values, law=law, seed=seed)
    shape = model.item_shape
    if is_image(shape):  # images: the pixel checks a feature-space metric cannot see
        metrics.update(pixel_metrics(values, heldout, train_values))
    if is_digits_shape(shape):
        metrics.update(image_metrics(values, heldout, train_values))
    for name in ("low_density_share", "trimmed_share", "final_ess", "pareto_k", "corrected_share"):
        if report.get(name) is not None:
            metrics[name] = report[name]
    warnings += quality_warnings(metrics) + sampler_warnings(report)
    return Evaluation(metrics, model, str(data), heldout, train_values, values, shape, law, warnings)

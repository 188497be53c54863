"""Image metrics. For any image data, pixel checks a classifier cannot see (pixel_metrics): values
outside the data's range, noise on the pixels that are almost always blank, and the distance
between the pixel-value histograms. For 8x8 digits also a small classifier trained
deterministically at first use (sklearn's digits, training split only), whose penultimate
features give a Fréchet distance ("digits FD") between samples and held-out images, plus class
statistics and a memorisation check. Pixels are in data units (0-16 for digits)."""
import functools
import math

import numpy as np
import torch
from torch import nn

DIGITS_SHAPE = (8, 8)
PIXEL_MAX = 16.0


def is_digits_shape(item_shape):
    return tuple(item_shape) == DIGITS_SHAPE


class DigitsClassifier(nn.Module):
    def __init__(self, hidden=256, features=64):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, features), nn.ReLU())
        self.head = nn.Linear(features, 10)

    def features(self, pixels):
        return self.body(pixels / PIXEL_MAX)

    def forward(self, pixels):
        return self.head(self.features(pixels))


@functools.lru_cache(maxsize=1)
def digits_classifier(epochs=400):
    """Full-batch Adam from a fixed seed on the 1437 training digits (a few seconds); returns
    the classifier and its held-out accuracy."""
    from bdiff.datasets import BUILTINS, digits_labels
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    model = DigitsClassifier()
    torch.random.set_rng_state(generator_state)  # leave the caller's random stream untouched
    x = torch.from_numpy(BUILTINS["digits"].load("train"))
    labels = torch.from_numpy(digits_labels("train"))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    for _ in range(epochs):
        loss = nn.functional.cross_entropy(model(x), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval().requires_grad_(False)
    heldout = torch.from_numpy(BUILTINS["digits"].load("heldout"))
    accuracy = float((model(heldout).argmax(1).numpy() == digits_labels("heldout")).mean())
    return model, accuracy


def frechet_distance(a, b):
    """‖μa - μb‖² + Tr(Σa + Σb - 2 (Σa Σb)^½) between two feature sets (rows).

    Tr (Σa Σb)^½ is the sum of square roots of the eigenvalues of the symmetric Σa^½ Σb Σa^½,
    which stays real and stable where dead ReLU features make the covariances singular."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    values, vectors = np.linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(values.clip(min=0))) @ vectors.T
    cross = np.sqrt(np.linalg.eigvalsh(root_a @ cov_b @ root_a).clip(min=0)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * cross)


def nearest_distance(points, train, chunk=2048):
    """Euclidean distance from each point to its nearest training row."""
    train_t = torch.from_numpy(np.asarray(train, np.float32))
    out = []
    for start in range(0, len(points), chunk):
        block = torch.from_numpy(np.asarray(points[start:start + chunk], np.float32))
        out.append(torch.cdist(block, train_t).min(1).values)
    return torch.cat(out).numpy()


BLANK_SHARE = 0.95  # a pixel at the data's lowest value in this share of images is "blank"
RANGE_MARGIN = 0.03  # of the data's value range: half a grey level on digits' 0-16


def pixel_metrics(samples, heldout, train=None):
    """Pixel-space checks against the data (images flattened to rows of pixels):
    pixel_outside_share, sample pixels outside the data's value range widened by 3 %;
    blank_pixel_sd beside blank_pixel_sd_ideal, the spread of samples and of held-out images on
    the pixels at the data's lowest value in ≥ 95 % of images; pixel_w1, the Wasserstein-1
    distance between the pooled pixel values of samples and held-out images, with
    pixel_w1_ideal, the training images' (a perfect sampler), when they are given."""
    from scipy.stats import wasserstein_distance
    samples, heldout = (np.asarray(v, np.float64).reshape(len(v), -1) for v in (samples, heldout))
    known = heldout if train is None else np.concatenate([heldout, np.asarray(train).reshape(len(train), -1)])
    low, high = known.min(), known.max()
    margin = RANGE_MARGIN * (high - low)
    blank = (known == low).mean(0) >= BLANK_SHARE
    result = {"pixel_outside_share": float(((samples < low - margin) | (samples > high + margin)).mean()),
              "blank_pixels": int(blank.sum()),
              "blank_pixel_sd": float(samples[:, blank].std()) if blank.any() else None,
              "blank_pixel_sd_ideal": float(heldout[:, blank].std()) if blank.any() else None,
              "pixel_w1": float(wasserstein_distance(samples.ravel(), heldout.ravel()))}
    if train is not None:
        train_pixels = np.asarray(train, np.float64).ravel()
        result["pixel_w1_ideal"] = float(wasserstein_distance(train_pixels, heldout.ravel()))
    return result


def image_metrics(samples, heldout, train=None):
    """digits_fd, class statistics, mean confidence and, given the training rows, nn_ratio
    (median nearest-training distance of samples over that of held-out images: well below 1
    means memorisation)."""
    model, accuracy = digits_classifier()
    with torch.no_grad():
        sample_t = torch.from_numpy(np.asarray(samples, np.float32))
        heldout_t = torch.from_numpy(np.asarray(heldout, np.float32))
        probs = torch.softmax(model(sample_t), 1).numpy()
        fd = frechet_distance(model.features(sample_t).double().numpy(),
                              model.features(heldout_t).double().numpy())
    histogram = np.bincount(probs.argmax(1), minlength=10) / len(probs)
    nonzero = histogram[histogram > 0]
    result = {"digits_fd": fd,
              "class_entropy": float(-(nonzero * np.log(nonzero)).sum()),
              "class_entropy_max": math.log(10),
              "classes_present": int((histogram > 0).sum()),
              "class_histogram": [float(v) for v in histogram],
              "mean_confidence": float(probs.max(1).mean()),
              "classifier_heldout_accuracy": accuracy}
    if train is not None:
        result["nn_ratio"] = float(np.median(nearest_distance(samples, train))
                                   / np.median(nearest_distance(heldout, train)))
    return result

"""Built-in datasets, with their true densities where one exists.

The paper's three synthetic sets (disjoint intervals, unbalanced mixture, unusually
clustered data), the usual 2-D toys, and sklearn's 8x8 digits. `smoothed_density`
is the true density convolved with N(0, diag(noise_var)), the law a perfect model
with bandwidth ε reproduces; `component` assigns points to mixture components for
the mode-weight error.
"""
from dataclasses import dataclass, field

import numpy as np


@dataclass
class GaussianMixture:
    weights: np.ndarray
    means: np.ndarray
    covs: np.ndarray  # (K, D, D)

    def sample(self, n, rng):
        counts = rng.multinomial(n, self.weights)
        parts = [rng.multivariate_normal(m, c, size=k) for m, c, k in zip(self.means, self.covs, counts)]
        return rng.permutation(np.concatenate(parts))

    def _component_logpdf(self, x, noise_var):
        out = []
        for mean, cov in zip(self.means, self.covs):
            c = cov + np.diag(noise_var)
            diff = x - mean
            _, logdet = np.linalg.slogdet(c)
            maha = np.einsum("nd,dk,nk->n", diff, np.linalg.inv(c), diff)
            out.append(-0.5 * (maha + logdet + len(mean) * np.log(2 * np.pi)))
        return np.stack(out, 1) + np.log(self.weights)

    def smoothed_density(self, x, noise_var):
        # scipy on first use: at import it would add a second to every `bdiff sample`
        from scipy.special import logsumexp
        return np.exp(logsumexp(self._component_logpdf(x, noise_var), axis=1))

    def component(self, x):
        return np.argmax(self._component_logpdf(x, np.zeros(x.shape[1])), axis=1)


@dataclass
class UniformBoxes:
    """Uniform on a union of disjoint axis-aligned boxes (intervals in 1-D, squares in 2-D)."""
    lows: np.ndarray   # (K, D)
    highs: np.ndarray  # (K, D)
    weights: np.ndarray = field(init=False)

    def __post_init__(self):
        volume = np.prod(self.highs - self.lows, axis=1)
        self.weights = volume / volume.sum()

    def sample(self, n, rng):
        which = rng.choice(len(self.weights), size=n, p=self.weights)
        return self.lows[which] + rng.random((n, self.lows.shape[1])) * (self.highs - self.lows)[which]

    def smoothed_density(self, x, noise_var):
        from scipy.special import ndtr  # the standard normal CDF
        total = np.prod(self.highs - self.lows, axis=1).sum()
        sd = np.sqrt(np.maximum(noise_var, 1e-300))
        dens = np.zeros(len(x))
        for low, high in zip(self.lows, self.highs):
            dens += np.prod(ndtr((high - x) / sd) - ndtr((low - x) / sd), axis=1)
        return dens / total

    def component(self, x):
        centres = (self.lows + self.highs) / 2
        outside = np.maximum(np.maximum(self.lows[None] - x[:, None], x[:, None] - self.highs[None]), 0)
        # nearest box, ties (inside) broken by the nearest centre
        dist = np.linalg.norm(outside, axis=2) * 1e6 + np.linalg.norm(x[:, None] - centres[None], axis=2)
        return np.argmin(dist, axis=1)

    def outside_share(self, x, margin):
        """Share of points farther than `margin` (per dimension) from every box."""
        inside = np.zeros(len(x), dtype=bool)
        for low, high in zip(self.lows, self.highs):
            inside |= np.all((x >= low - margin) & (x <= high + margin), axis=1)
        return float(1 - inside.mean())


DEFAULT_SIZE = 10_000
TRAIN_SEED, HELDOUT_SEED = 0, 1


@dataclass
class Builtin:
    name: str
    description: str
    sampler: object  # callable (n, rng) -> array, or a law with .sample
    law: object = None  # GaussianMixture / UniformBoxes when the density is known
    is_mixture: bool = False

    def load(self, split="train", n=None):
        """The training set (seed 0) or an independent held-out set (seed 1) of n points."""
        rng = np.random.default_rng(TRAIN_SEED if split == "train" else HELDOUT_SEED)
        if self.sampler in FIXED_SETS:
            return self.sampler(split)
        draw = self.law.sample if self.law is not None else self.sampler
        return np.asarray(draw(n or DEFAULT_SIZE, rng), dtype=np.float32)


def _isotropic(stds, dim):
    return np.stack([np.eye(dim) * s**2 for s in stds])


def _moons(n, rng):
    from sklearn.datasets import make_moons
    return make_moons(n, noise=0.06, random_state=int(rng.integers(2**31)))[0]


def _swissroll(n, rng):
    from sklearn.datasets import make_swiss_roll
    x = make_swiss_roll(n, noise=0.4, random_state=int(rng.integers(2**31)))[0]
    return x[:, [0, 2]] / 5


def _fixed_split(loader, split, labels=False):
    """A fixed 80/20 split (permutation seed 0) of a data set shipped with scikit-learn;
    with labels=True, the class labels of the same rows."""
    import sklearn.datasets
    bunch = getattr(sklearn.datasets, loader)()
    values = bunch.target.astype(np.int64) if labels else bunch.data.astype(np.float32)
    order = np.random.default_rng(0).permutation(len(values))
    cut = int(0.8 * len(values))
    return values[order[:cut]] if split == "train" else values[order[cut:]]


def digits_labels(split):
    """Class labels (0-9) of the digits rows that `load("digits", split)` returns."""
    return _fixed_split("load_digits", split, labels=True)


def _digits(split):
    """1437 training and 360 held-out 8x8 images."""
    return _fixed_split("load_digits", split)


def _wine(split):
    return _fixed_split("load_wine", split)


def _breast_cancer(split):
    return _fixed_split("load_breast_cancer", split)


FIXED_SETS = (_digits, _wine, _breast_cancer)

_CHECKER_CELLS = [(i, j) for i in range(4) for j in range(4) if (i + j) % 2 == 0]

BUILTINS = {
    b.name: b for b in [
        Builtin("intervals", "1-D uniform on three disjoint intervals (paper Fig. 1)", None,
                UniformBoxes(np.array([[-4.0], [-1.0], [2.0]]), np.array([[-2.5], [0.5], [3.0]])),
                is_mixture=True),
        Builtin("mixture", "2-D unbalanced Gaussian mixture, weights .75/.2/.05 (paper Fig. 2)", None,
                GaussianMixture(np.array([0.75, 0.2, 0.05]),
                                np.array([[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]]),
                                _isotropic([0.4, 0.4, 0.4], 2)), is_mixture=True),
        Builtin("clusters", "2-D clusters of very different size and spread (paper Fig. 3)", None,
                GaussianMixture(np.array([0.55, 0.3, 0.15]),
                                np.array([[0.0, 0.0], [3.5, 3.0], [-3.0, 2.5]]),
                                np.array([[[1.0, 0.0], [0.0, 1.0]],
                                          [[0.02, 0.0], [0.0, 0.02]],
                                          [[0.6, 0.35], [0.35, 0.25]]])), is_mixture=True),
        Builtin("checkerboard", "2-D uniform on the dark squares of a 4x4 board", None,
                UniformBoxes(np.array([[i - 2.0, j - 2.0] for i, j in _CHECKER_CELLS]),
                             np.array([[i - 1.0, j - 1.0] for i, j in _CHECKER_CELLS]))),
        Builtin("moons", "2-D two interleaving half circles (sklearn make_moons)", _moons),
        Builtin("swissroll", "2-D swiss roll (sklearn make_swiss_roll, x and z)", _swissroll),
        Builtin("digits", "64-D sklearn 8x8 digit images, pixel values 0-16 (fixed 80/20 split)", _digits),
        Builtin("wine", "13-D sklearn wine measurements (fixed 80/20 split of 178 rows)", _wine),
        Builtin("breast_cancer", "30-D sklearn breast cancer features (fixed 80/20 split of 569 rows)",
                _breast_cancer),
    ]
}


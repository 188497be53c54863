"""Shapes outside the suite, the kind a user brings: a bounded cube, a table of many duplicated
records, mixed count / binary / continuous columns, columns in wildly different units, and
correlated heavy tails (Student-t with 3 degrees of freedom, and Cauchy). bdiff with its CLI
defaults beside KDE-CV and the BIC Gaussian mixture, 5000 training and 5000 held-out rows each
(data seed 5), scored as in suite.py: held-out log-likelihood in data units, C2ST of 10 000
samples against the held-out rows, far share; "ref" is the training rows themselves, what a
perfect sampler scores. A peer that fails on a shape is recorded with its error.

    python benchmarks/shapes.py [--only cube4d,t3_2d] [--methods bdiff]
"""
import numpy as np

from suite import _load_results, _save_results, compare_peers, peer_arguments


def cube4d(n, rng):
    return rng.uniform(0, 1, (n, 4))  # bounded support: a smoothed density leaks past the faces


def duplicates(n, rng):
    """Half the rows repeat 50 distinct records: atoms no density on the real line can hold."""
    records = rng.normal(size=(50, 2))
    x = rng.normal(size=(n, 2)) * [1, 0.5]
    repeated = rng.random(n) < 0.5
    x[repeated] = records[rng.integers(0, 50, repeated.sum())]
    return x


def mixed(n, rng):
    """A Poisson(3) count, a 0/1 column, and two continuous columns that depend on them."""
    count, flag = rng.poisson(3, n), rng.random(n) < 0.3
    return np.column_stack([count, flag, count + rng.normal(0, 0.5, n),
                            np.where(flag, 2, -1) + rng.gamma(2, 0.5, n)]).astype(float)


def scales(n, rng):
    x = rng.normal(size=(n, 3)) @ np.array([[1, .5, 0], [0, 1, .3], [0, 0, 1]])
    return x * [1e-6, 1.0, 1e6] + [5e-6, -3, 2e7]


def t3_2d(n, rng):
    return rng.standard_t(3, (n, 2)) @ np.array([[1, .6], [0, .8]])


def cauchy2d(n, rng):
    """Correlated Cauchy columns: a tail, not a few rows, sets each column's spread."""
    return rng.standard_cauchy((n, 2)) @ np.array([[1, .6], [0, .8]])


SHAPES = {"cube4d": cube4d, "duplicates": duplicates, "mixed": mixed, "scales": scales, "t3_2d": t3_2d,
          "cauchy2d": cauchy2d}
def main():
    names, methods, out = peer_arguments(__doc__, SHAPES, "shapes", "shapes.json")
    results = _load_results(out)
    for name in names:
        data = SHAPES[name](10_000, np.random.default_rng(5))
        train, test = data[:5000], data[5000:]
        compare_peers(name, results.setdefault(name, {}), methods, train, test, train,
                      ("steps", "powers", "end_level", "end_search"))
        _save_results(out, results)


if __name__ == "__main__":
    main()

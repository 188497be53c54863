"""Tables that break a per-column standardisation: a mistyped value among ordinary rows, and
columns whose spread a heavy tail sets (Cauchy, Student-t with 1.5 degrees of freedom), beside a
mixture with a light mode far out that reads like one. bdiff with its CLI defaults beside KDE-CV
and the BIC Gaussian mixture, scored as in suite.py against held-out rows drawn without typos:
held-out log-likelihood in data units, C2ST of 10 000 samples, far share; "ref" is the clean
training rows themselves, what a perfect sampler scores. A peer that fails is recorded with its
error (the mixture on Cauchy rows: collapsed components).

    python benchmarks/hostile.py [--only typo1d,cauchy1d] [--methods bdiff]
"""
import numpy as np

from suite import _load_results, _save_results, compare_peers, peer_arguments


def _bimodal(n, rng):
    return np.where(rng.random(n) < 0.3, rng.normal(-2, 0.4, n), rng.normal(1, 0.7, n))[:, None]


def _two_modes_2d(n, rng):
    mode = rng.random(n) < 0.2
    return np.column_stack([np.where(mode, rng.normal(3, 0.3, n), rng.normal(0, 1, n)),
                            rng.normal(0, 1, n) + 2 * mode])


def _with_typo(draw, row, column, value):
    """(training rows with one mistyped value, the same rows without it)."""
    def tables(n, rng):
        clean = draw(n, rng)
        typo = clean.copy()
        typo[row, column] = value
        return typo, clean
    return tables


def _plain(draw):
    def tables(n, rng):
        rows = draw(n, rng)
        return rows, rows
    return tables


def _far_mode(n, rng):
    """A 0.5 % mode 300 sd out: a mixture that reads like a heavy tail."""
    return np.where(rng.random((n, 1)) < 0.005, rng.normal(300, 1, (n, 2)), rng.normal(0, 1, (n, 2)))


# name: (rows, (training rows, clean training rows) from (n, rng))
TABLES = {
    "typo1d": (2000, _with_typo(_bimodal, 1234, 0, 1e6)),
    "typo2d": (5000, _with_typo(_two_modes_2d, 77, 1, 1e5)),
    "cauchy1d": (5000, _plain(lambda n, rng: rng.standard_cauchy((n, 1)))),
    "cauchy2d_corr": (5000, _plain(lambda n, rng: rng.standard_cauchy((n, 2)) @ np.array([[1, .6], [0, .8]]))),
    "t1.5": (5000, _plain(lambda n, rng: rng.standard_t(1.5, (n, 1)))),
    "cauchy_normal_lognormal": (5000, _plain(lambda n, rng: np.column_stack(
        [rng.standard_cauchy(n), rng.normal(size=n), rng.lognormal(0, 1, n)]))),
    "far_mode": (5000, _plain(_far_mode)),
}
def main():
    names, methods, out = peer_arguments(__doc__, TABLES, "tables", "hostile.json")
    results = _load_results(out)
    for name in names:
        rows, tables = TABLES[name]
        train, clean = tables(rows, np.random.default_rng(11))
        test = tables(rows, np.random.default_rng(12))[1]
        compare_peers(name, results.setdefault(name, {}), methods, train, test, clean, ("steps", "powers"))
        _save_results(out, results)


if __name__ == "__main__":
    main()

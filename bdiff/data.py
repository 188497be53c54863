"""Loading, validating and standardising data sets; writing outputs safely."""
import csv
import fcntl
import hashlib
import json
import math
import os
import stat
import warnings
import zipfile
from dataclasses import dataclass

import numpy as np

from bdiff.datasets import BUILTINS
from bdiff.errors import BdiffError

SUPPORTED = (".npy", ".npz", ".csv", ".safetensors")


@dataclass
class Data:
    values: np.ndarray  # (N, D) float32
    source: str
    item_shape: tuple   # shape of one item before flattening: (D,) or image dims


def load_data(spec, key=None, split="train", n=None):
    """A built-in dataset by name or a file; validated and flattened to (N, D) float32."""
    spec = str(spec)
    check_key(spec, key)
    if spec in BUILTINS and not os.path.exists(spec):
        array = BUILTINS[spec].load(split, n)
        item_shape = (8, 8) if spec == "digits" else (array.shape[1],)
        return Data(array, spec, item_shape)
    array = _read_file(spec, key)
    return _validated(array, spec)


def check_key(spec, key):
    """--key names an array inside a .npz or .safetensors file; anywhere else it would be
    silently ignored."""
    if key is not None and os.path.splitext(str(spec))[1].lower() not in (".npz", ".safetensors"):
        raise BdiffError(f"--key names an array inside a .npz or .safetensors file; {spec} has none")


def _read_file(path, key):
    ext = os.path.splitext(path)[1].lower()
    if not os.path.exists(path):
        if ext not in SUPPORTED:
            names = ", ".join(BUILTINS)
            raise BdiffError(f"{path!r} is neither a file nor a built-in dataset ({names})")
        raise BdiffError(f"no such file: {path}")
    if os.path.isdir(path):
        raise BdiffError(f"{path} is a directory, not a data file")
    if ext not in SUPPORTED:
        raise BdiffError(f"cannot read {path}: supported formats are {', '.join(SUPPORTED)}")
    try:
        if ext == ".npy":
            with open(path, "rb") as handle:
                if handle.read(6) != b"\x93NUMPY":  # else np.load mistakes it for a pickle
                    raise BdiffError(f"cannot read {path}: not a .npy file")
            return np.load(path, allow_pickle=False, mmap_mode="r")  # read in _validated's chunks
        if ext == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                return _pick(dict(archive.items()), key, path)
        if ext == ".csv":
            return _read_csv(path)
        from safetensors.numpy import load_file
        return _pick(load_file(path), key, path)
    except BdiffError:
        raise
    except ValueError as err:
        if "pickle" in str(err).lower() or "python objects" in str(err).lower():
            raise BdiffError(f"{path} holds Python objects (pickled); bdiff reads numeric arrays only")
        raise BdiffError(f"cannot read {path}: {err}")
    except (OSError, EOFError, zipfile.BadZipFile, Exception) as err:  # noqa: B014 - any parser failure
        raise BdiffError(f"cannot read {path}: {type(err).__name__}: {err}")


def _pick(arrays, key, path):
    if key is not None:
        if key not in arrays:
            raise BdiffError(f"{path} has no array {key!r}; it has: {', '.join(arrays) or 'none'}")
        return arrays[key]
    if len(arrays) != 1:
        raise BdiffError(f"{path} holds {len(arrays)} arrays ({', '.join(arrays) or 'none'}); "
                         f"choose one with --key")
    return next(iter(arrays.values()))


def _read_csv(path):
    with open(path) as handle:
        first = handle.readline()
    try:
        [float(v) for v in first.strip().split(",")]
        header = 0
    except ValueError:
        header = 1  # the first line is a header
    try:
        with warnings.catch_warnings():  # "input contained no data": the emptiness check says it
            warnings.simplefilter("ignore", UserWarning)
            return np.loadtxt(path, delimiter=",", skiprows=header, ndmin=2, dtype=np.float64)
    except ValueError as err:
        raise BdiffError(f"{path} is not a numeric CSV: {_first_bad_line(path, header) or err}")


def _first_bad_line(path, header):
    """Where a CSV that np.loadtxt refused goes wrong, counted as an editor counts lines (numpy's
    message counts data rows, from 0 in one message and from 1 in another); None if not found."""
    width = None
    with open(path) as handle:
        for number, line in enumerate(handle, 1):
            fields = line.split("#", 1)[0].strip()  # loadtxt's comments and blank lines
            if number <= header or not fields:
                continue
            values = fields.split(",")
            if width is None:
                width = (len(values), number)
            elif len(values) != width[0]:
                return f"line {number} has {len(values)} values, but line {width[1]} has {width[0]}"
            for column, text in enumerate(values, 1):
                try:
                    float(text)
                except ValueError:
                    if not text.strip():
                        return f"line {number}, column {column} is empty"
                    return f"line {number}, column {column}: {text.strip()!r} is not a number"
    return None


def _validated(array, source):
    array = np.asarray(array)
    if array.dtype.kind not in "biuf":
        raise BdiffError(f"{source}: expected numbers, found dtype {array.dtype}")
    if array.ndim == 0 or array.ndim > 4:
        raise BdiffError(f"{source}: expected shape (N,), (N, D), (N, H, W) or (N, C, H, W), "
                         f"got {array.shape}")
    if array.ndim == 1:
        array = array[:, None]
    if array.shape[0] == 0 or array[0].size == 0:
        raise BdiffError(f"{source}: the data set is empty (shape {array.shape})")
    if array.shape[0] < 2:
        raise BdiffError(f"{source}: one row is not a distribution; need at least 2 rows")
    item_shape = array.shape[1:]
    flat = array.reshape(array.shape[0], -1)
    values = np.empty(flat.shape, dtype=np.float32)
    lows, highs = [], []
    for rows in _chunks(len(flat)):  # one float32 copy; float64 only one chunk at a time
        chunk = np.asarray(flat[rows], dtype=np.float64)
        bad = ~np.isfinite(chunk).all(axis=1)
        if bad.any():
            raise BdiffError(f"{source}: rows contain NaN or inf (first: row {rows.start + int(np.argmax(bad))}); "
                             "clean them first")
        lows.append(chunk.min(0))
        highs.append(chunk.max(0))
        largest = max(-lows[-1].min(), highs[-1].max())
        if largest > 1e30:
            raise BdiffError(f"{source}: values up to {largest:.3g} overflow float32")
        values[rows] = chunk
    _check_float32_resolution(np.min(lows, 0), np.max(highs, 0), source)
    return Data(values, source, tuple(item_shape))


def _check_float32_resolution(low, high, source):
    """The model works in float32: a column whose spread is small beside its magnitude (1e6 ±
    0.001, coordinates in metres from a far origin) turns into a coarse grid or one value there."""
    magnitude = np.maximum(np.abs(low), np.abs(high))
    step = np.spacing(magnitude.astype(np.float32)).astype(np.float64)
    coarse = (high > low) & (step > 0.01 * (high - low))
    if coarse.any():
        column = int(np.argmax(coarse))
        raise BdiffError(f"{source}: column {column} spans {high[column] - low[column]:.3g} at magnitude "
                         f"{magnitude[column]:.3g}, where float32 (the model's precision) steps by "
                         f"{step[column]:.3g}, over 1 % of that span; subtract an offset (e.g. the "
                         "column's mean) first")


CHUNK_ROWS = 1 << 20


def _chunks(count):
    return [slice(start, min(start + CHUNK_ROWS, count)) for start in range(0, count, CHUNK_ROWS)]


def is_image(item_shape):
    """Items with two or more axes ((H, W) or (C, H, W)) are images: pooled scale, coded pixels."""
    return len(item_shape) >= 2


PIXEL_SQUEEZE = 0.02  # α of the logit coding: the box maps to [logit α, logit (1 - α)]


@dataclass
class PixelCoding:
    """Image pixels in the data's box [low, high] ↔ an unbounded space, as flows code images
    (Dinh et al. 2017): u = logit(α + (1 - 2α) t), t the pixel's place in the box. Integer pixels
    (every value whole) are dequantised, t = (v - low + U) / (high - low + 1) with U ~ U(0, 1),
    and floored back. Samples then never leave the data's range and are pixels of its own grid,
    and a Gaussian blur near a saturated value shrinks to nothing instead of crossing it
    (digits: 8 % of sample pixels outside [-0.5, 16.5] raw, none coded; NOTES.md)."""
    low: float
    high: float
    integer: bool

    @classmethod
    def fit(cls, values):
        low, high, integer = math.inf, -math.inf, True
        for rows in _chunks(len(values)):  # one pass: the values may be a memory-mapped file
            part = values[rows]
            low, high = min(low, float(part.min())), max(high, float(part.max()))
            integer = integer and np.array_equal(part, np.floor(part))
        if not (math.isfinite(low) and math.isfinite(high) and high > low):
            raise BdiffError("image data need at least two distinct finite pixel values")
        return cls(low, high, integer)

    @property
    def span(self):
        return self.high - self.low + 1 if self.integer else self.high - self.low

    def _place(self, values, noise):
        """t in [0, 1]: integer pixels at their cell's centre, or at `noise` (U(0, 1)) in it."""
        if not self.integer:
            return (values - self.low) / self.span
        return (values - self.low + (0.5 if noise is None else noise)) / self.span

    def forward(self, values, noise=None):
        p = PIXEL_SQUEEZE + (1 - 2 * PIXEL_SQUEEZE) * self._place(np.asarray(values, np.float64), noise)
        return np.log(p) - np.log1p(-p)

    def inverse(self, u):
        t = (1 / (1 + np.exp(-np.asarray(u, np.float64))) - PIXEL_SQUEEZE) / (1 - 2 * PIXEL_SQUEEZE)
        if self.integer:
            return np.clip(np.floor(t * self.span), 0, self.span - 1) + self.low
        return np.clip(np.round(t, 9), 0, 1) * self.span + self.low  # exact at the box's ends

    def log_jacobian(self, values):
        """Σ log |du/dv| per row, integer pixels at their cells' centres: a density of the codes
        times this is one of the pixels (of the dequantised pixels for integer data)."""
        p = PIXEL_SQUEEZE + (1 - 2 * PIXEL_SQUEEZE) * self._place(np.asarray(values, np.float64), None)
        per_pixel = math.log((1 - 2 * PIXEL_SQUEEZE) / self.span) - np.log(p) - np.log1p(-p)
        return per_pixel.sum(1)

    def to_dict(self):
        return {"low": self.low, "high": self.high, "integer": self.integer}


# Yeo-Johnson powers are kept in [0, 2]: there the transform maps the whole line onto the whole
# line, so every sample the model draws has a value in data units
POWER_RANGE = (0.0, 2.0)
POWER_NEAR_ONE = 0.1  # a column whose fitted power is this close to 1 stays as it is (a normal
# column of 500 rows fits a power 0.07 from 1)
# A column whose rows leave an empty gap wider than this many standard deviations inside its
# central 98 % holds separate clusters: a power would squeeze one and stretch another (two tight
# 80/20 clusters in 16-D, power 0: the small one sampled at 14 % against the exact fields' 20 %).
# Skewed columns of a few hundred rows leave gaps of up to 0.65 sd (engel, tips, breast_cancer).
POWER_CLUSTER_GAP = 1.0
POWER_PROBE_ROWS = 5000  # rows the powers are fitted on, a random subset of larger tables: a
# power's standard error there is about 0.03, and a 300-column table is fitted in seconds


def _yeo_johnson(z, power):
    """The Yeo-Johnson transform of z, column by column (power in [0, 2])."""
    positive = z >= 0
    up = np.where(power == 0, np.log1p(np.abs(z)),
                  ((np.abs(z) + 1) ** power - 1) / np.where(power == 0, 1, power))
    low_power = 2 - power
    down = np.where(low_power == 0, -np.log1p(np.abs(z)),
                    -((np.abs(z) + 1) ** low_power - 1) / np.where(low_power == 0, 1, low_power))
    return np.where(positive, up, down)


def _yeo_johnson_inverse(y, power):
    positive = y >= 0
    with np.errstate(over="ignore", invalid="ignore"):
        up = np.where(power == 0, np.expm1(np.abs(y)),
                      (power * np.abs(y) + 1) ** (1 / np.where(power == 0, 1, power)) - 1)
        low_power = 2 - power
        down = np.where(low_power == 0, -np.expm1(np.abs(y)),
                        1 - (low_power * np.abs(y) + 1) ** (1 / np.where(low_power == 0, 1, low_power)))
    return np.where(positive, up, down)


def _yeo_johnson_log_slope(z, power):
    """log |d yeo_johnson(z) / dz| per value."""
    return np.where(z >= 0, power - 1, 1 - power) * np.log1p(np.abs(z))


def _golden_max(profile, grid, tolerance=1e-4):
    """The argument of profile's largest value on the interval grid by golden-section search (one
    maximum there), its ends included."""
    low, high = grid
    ratio = (math.sqrt(5) - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    fa, fb = profile(a), profile(b)
    while high - low > tolerance:
        if fa < fb:
            low, a, fa = a, b, fb
            b = low + ratio * (high - low)
            fb = profile(b)
        else:
            high, b, fb = b, a, fa
            a = high - ratio * (high - low)
            fa = profile(a)
    best = (low + high) / 2
    ends = {grid[0]: profile(grid[0]), grid[1]: profile(grid[1]), best: profile(best)}
    return max(ends, key=ends.get)


def yeo_johnson_power(z, grid=POWER_RANGE):
    """The power in [0, 2] of largest Gaussian profile log-likelihood of yeo_johnson(z) (Yeo &
    Johnson 2000): -n/2 log var(y) + (power - 1) Σ sign(z) log(1 + |z|), by golden-section
    search (one maximum on every column tried). scipy.stats.yeojohnson_normmax finds the same
    one (tests), but importing scipy.stats costs every fit 1.5 s here."""
    z = np.asarray(z, np.float64)
    return _golden_max(lambda power: _coded_profile(z, power, 1.0), grid)


# Tail powers δ in [0, 1] pull a symmetric heavy tail in: y -> sinh(δ asinh y) / δ is y near 0
# and |y|^δ far out (asinh y at δ = 0; Jones & Pewsey's sinh-arcsinh). It maps the line onto the
# line, so every sample decodes. Normal columns of 200 rows fit δ under 0.76 one time in twenty
# (of 1000 rows, under 0.89), a Student-t of 3 degrees of freedom 0, of 10 about 0.75.
TAIL_RANGE = (0.0, 1.0)
TAIL_KEPT_BELOW = 0.75


def _tail(y, tail):
    stretch = np.arcsinh(y)
    return np.where(tail == 0, stretch, np.sinh(tail * stretch) / np.where(tail == 0, 1, tail))


def _tail_inverse(u, tail):
    with np.errstate(over="ignore"):
        return np.sinh(np.where(tail == 0, u, np.arcsinh(tail * u) / np.where(tail == 0, 1, tail)))


def _tail_log_slope(y, tail):
    """log |d tail(y) / dy| = log cosh(δ asinh y) - log(1 + y²) / 2, per value."""
    bent = np.abs(tail * np.arcsinh(y))
    return bent + np.log1p(np.exp(-2 * bent)) - math.log(2) - 0.5 * np.log1p(y * y)


def _coded_profile(z, power, tail):
    """The Gaussian profile log-likelihood of z coded by (power, tail): -n/2 log var(u) + Σ log
    |du/dz|."""
    y = _yeo_johnson(z, np.float64(power))
    slope = _yeo_johnson_log_slope(z, np.float64(power))
    if tail != 1:  # tail 1 is the identity: skipped, not computed to rounding
        y, slope = _tail(y, np.float64(tail)), slope + _tail_log_slope(y, np.float64(tail))
    return -0.5 * len(z) * math.log(max(float(y.var()), 1e-300)) + float(slope.sum())


TAIL_ROUNDS = 5  # at most; coordinate ascent over (power, tail) stops once neither moves by 0.01


def column_powers(z, tails=False):
    """(power, tail) of a standardised column. The Yeo-Johnson power alone first, then (with
    `tails`) the tail power given it: a column whose tail power is not below TAIL_KEPT_BELOW
    keeps tail 1 (light tails: coded by Yeo-Johnson alone). Otherwise both are fitted together,
    by coordinate ascent of their Gaussian profile log-likelihood, because one far row of a
    heavy symmetric tail pulls the power alone away from 1 (a Student-t sample of 3000 rows: 0.88
    alone, 1 with its tail). A power within POWER_NEAR_ONE of 1 gives way to 1 (and the tail is
    fitted again without it)."""
    z = np.asarray(z, np.float64)
    power = yeo_johnson_power(z)
    tail = _golden_max(lambda t: _coded_profile(z, power, t), TAIL_RANGE) if tails else 1.0
    if tail < TAIL_KEPT_BELOW:
        for _ in range(TAIL_ROUNDS):
            before = power, tail
            power = _golden_max(lambda p: _coded_profile(z, p, tail), POWER_RANGE)
            tail = _golden_max(lambda t: _coded_profile(z, power, t), TAIL_RANGE)
            if max(abs(power - before[0]), abs(tail - before[1])) < 0.01:
                break
        if abs(power - 1) <= POWER_NEAR_ONE:
            tail = _golden_max(lambda t: _coded_profile(z, 1.0, t), TAIL_RANGE)
    if abs(power - 1) <= POWER_NEAR_ONE:
        power = 1.0
    return power, (tail if tail < TAIL_KEPT_BELOW else 1.0)


def _cluster_gap(z):
    """Whether the standardised column z leaves an empty gap of more than POWER_CLUSTER_GAP
    inside its central 98 %."""
    low, high = np.quantile(z, [0.01, 0.99])
    central = np.sort(z[(z >= low) & (z <= high)])
    return len(central) > 1 and float(np.diff(central).max()) > POWER_CLUSTER_GAP


@dataclass
class PowerCoding:
    """Skewed or heavy-tailed table columns ↔ nearly normal ones, as tabular models often code
    them: per column z = (v - center) / scale, the Yeo-Johnson transform with the column's own
    power, then the tail transform with its tail power (1 and 1: the identity). A density
    smoothed by one bandwidth fits the dense part of such a column badly or its tail badly; after
    the transforms one bandwidth fits both. Fit chooses it only where a kernel density estimate
    predicts held-out rows better with it (NOTES.md: engel's income and food budgets, held-out
    log-likelihood -13.79 -> -13.61)."""
    center: np.ndarray
    scale: np.ndarray
    power: np.ndarray
    tail: np.ndarray = None  # None: all 1 (checkpoints from before tail powers)

    def __post_init__(self):
        if self.tail is None:
            self.tail = np.ones_like(self.power)

    @classmethod
    def fit(cls, values, skip=(), tails=()):
        """Powers (and for the columns in `tails`, tail powers) fitted on `values` (a random
        subset of a large table: POWER_PROBE_ROWS rows); columns in `skip` (codes), constant ones
        and those with separate clusters (_cluster_gap) keep 1 and 1, as do powers near 1 and
        tail powers not below TAIL_KEPT_BELOW. None when every column does. Columns of `tails`
        whose tail sets their spread (TAIL_SET_SPREAD) are standardised by their median and
        interquartile sd."""
        probe = np.asarray(values, np.float64)
        center, scale = probe.mean(0), probe.std(0)
        scale = np.where(scale > 0, scale, 1.0)
        z = (probe - center) / scale
        power, tail = np.ones(probe.shape[1]), np.ones(probe.shape[1])
        for column in range(probe.shape[1]):
            if column in skip or np.ptp(z[:, column]) == 0 or _cluster_gap(z[:, column]):
                continue
            if column in tails and _spread_ratio(z[:, column])[0] > TAIL_SET_SPREAD:
                # by its sd, a tail-set column's rows sit in a sliver near 0 where the tail power
                # is the identity, and a Yeo-Johnson power bent it instead (Cauchy: 0.46-1.68,
                # held-out -2.74; by its middle: power 1, -2.56, the law's own -2.53)
                center[column], scale[column] = _middle_and_spread(probe[:, column])
                z[:, column] = (probe[:, column] - center[column]) / scale[column]
            power[column], tail[column] = column_powers(z[:, column], column in tails)
        if np.all(power == 1) and np.all(tail == 1):
            return None
        return cls(center, scale, power, tail)

    def forward(self, values, noise=None):
        z = (np.asarray(values, np.float64) - self.center) / self.scale
        return _tail(_yeo_johnson(z, self.power), self.tail)

    def inverse(self, u):
        y = _tail_inverse(np.asarray(u, np.float64), self.tail)
        values = _yeo_johnson_inverse(y, self.power) * self.scale + self.center
        top = float(np.finfo(np.float32).max)  # a sample far past the data stays a number
        return np.clip(values, -top, top)

    def log_jacobian(self, values):
        """Σ log |du/dv| per row."""
        z = (np.asarray(values, np.float64) - self.center) / self.scale
        slope = _yeo_johnson_log_slope(z, self.power) + _tail_log_slope(_yeo_johnson(z, self.power), self.tail)
        return (slope - np.log(self.scale)).sum(1)

    def to_dict(self):
        return {"center": self.center.tolist(), "scale": self.scale.tolist(), "power": self.power.tolist(),
                "tail": self.tail.tolist()}


def coding_from_dict(d):
    """The coding a checkpoint stores: a PixelCoding or a PowerCoding, told apart by their keys."""
    if d is None:
        return None
    if "power" in d:
        return PowerCoding(*(np.asarray(d[key], np.float64) for key in ("center", "scale", "power")),
                           tail=np.asarray(d["tail"], np.float64) if "tail" in d else None)
    return PixelCoding(**d)


DISCRETE_MAX_VALUES = 20  # a column with at most this many distinct values is a code or a count
DISCRETE_MAX_UNSEEN = 0.1  # ... if a fresh row would take an unseen value at most this often
DISCRETE_PROBE_ROWS = 100_000  # rows looked at first, so long continuous columns are not sorted


def discrete_columns(values):
    """{column: its sorted distinct values} for the columns with 2..DISCRETE_MAX_VALUES of them
    whose values the rows cover: Good and Turing's estimate of the chance that a fresh row takes a
    value not seen yet, the share of rows holding a value seen once, is at most
    DISCRETE_MAX_UNSEEN. Under 21 rows every column has few values; 12 rows of measurements, each
    value seen once, came back as recombinations of the training values (NOTES.md)."""
    probe = values[:DISCRETE_PROBE_ROWS]
    counts = {}  # column → {value: rows}
    for column in range(values.shape[1]):
        distinct, seen = np.unique(probe[:, column], return_counts=True)
        if len(distinct) <= DISCRETE_MAX_VALUES:
            counts[column] = dict(zip(distinct.tolist(), seen.tolist()))
    # one pass over the remaining rows, reading them only while some column is still in question
    for start in range(DISCRETE_PROBE_ROWS, len(values) if counts else 0, CHUNK_ROWS):
        part = values[start:start + CHUNK_ROWS]
        for column in list(counts):
            for value, seen in zip(*(a.tolist() for a in np.unique(part[:, column], return_counts=True))):
                counts[column][value] = counts[column].get(value, 0) + seen
            if len(counts[column]) > DISCRETE_MAX_VALUES:
                del counts[column]
        if not counts:
            break
    covered = {column: seen for column, seen in counts.items()
               if 2 <= len(seen) and sum(n == 1 for n in seen.values()) <= DISCRETE_MAX_UNSEEN * len(values)}
    return {column: np.array(sorted(seen), dtype=np.float64) for column, seen in covered.items()}


# a column's standard deviation over its interquartile one (IQR / 1.349) from which a few far
# rows set its scale; every benchmark table here reads at most 4.1 (a random law's 2 % mode far
# out), one mistyped 1e6 among 2000 values of a few units about 20 000
SCALE_SET_BY_FAR_ROWS = 20.0


def scale_set_by_far_rows(rows, standardizer):
    """[(column, sd / interquartile sd, farthest row)] of the table's columns whose spread a few
    far rows set, judged on the rows in the model's units (after any column powers):
    standardised by such a spread, the other rows sit in a sliver of it."""
    z = np.asarray(rows, np.float64)
    columns = np.arange(z.shape[1]) if standardizer.model_columns is None else standardizer.model_columns
    found = []
    for place, column in enumerate(columns):
        if column in (standardizer.discrete or {}):
            continue
        ratio, middle = _spread_ratio(z[:, place])
        if ratio > SCALE_SET_BY_FAR_ROWS:
            found.append((int(column), float(ratio), int(np.argmax(np.abs(z[:, place] - middle)))))
    return found


def _middle_and_spread(column):
    """(median, interquartile sd: IQR / 1.349, a normal column's sd) of one column."""
    low, middle, high = np.percentile(column, [25, 50, 75])
    return middle, (high - low) / 1.349


def _spread_ratio(column):
    """(sd / interquartile sd, median) of one column; the ratio is 0 for a column mostly of one
    value (no interquartile spread: no call)."""
    middle, spread = _middle_and_spread(column)
    return (column.std() / spread if spread > 0 else 0.0), middle


# sd over interquartile sd above which a tail sets a column's spread: above it in 97 % of Cauchy
# columns of 2000 rows (55 % of 200); every benchmark table's columns read at most 5.2 (a random
# law's 2 % mode far out), daily returns 1.3, Student-t with 3 degrees of freedom 1.5
TAIL_SET_SPREAD = 10.0


# A tail index under 2 is a column without variance: its sd is whatever the draw's farthest rows
# make it (Student-t with 1.5 degrees of freedom, 5000 rows: sd 4 interquartile sds on one draw,
# under TAIL_SET_SPREAD). Hill's estimate on the farthest TAIL_INDEX_SHARE of rows reads 0.9-1.2
# on Cauchy columns, 1.6 on that t1.5, 2.5-2.9 on t3, 3.1 on daily returns (sp500), and over 3.5
# on every benchmark column but radar's first band (1.0) and breast_cancer's 17th (1.9).
NO_VARIANCE_INDEX = 2.0
TAIL_INDEX_SHARE = 0.02


def tail_index(column):
    """Hill's estimate of the tail index α (P(|x - median| > t) ~ t^-α) from the farthest
    TAIL_INDEX_SHARE of rows (at least 10); inf where they do not spread beyond the next."""
    x = np.asarray(column, np.float64)
    far = np.sort(np.abs(x - np.median(x)))[::-1]
    count = min(len(x) - 1, max(10, int(TAIL_INDEX_SHARE * len(x))))
    if count < 1 or far[count] <= 0:
        return math.inf
    spread = float(np.mean(np.log(far[:count] / far[count])))
    return 1 / spread if spread > 0 else math.inf


def tail_set_columns(values, skip=()):
    """Columns (not in `skip`) whose spread a tail sets: sd over TAIL_SET_SPREAD interquartile
    sds or a tail index under NO_VARIANCE_INDEX, with no few rows set apart (a Cauchy column,
    not a typo's)."""
    z = np.asarray(values, np.float64)
    return [column for column in range(z.shape[1]) if column not in skip
            and (_spread_ratio(z[:, column])[0] > TAIL_SET_SPREAD or tail_index(z[:, column]) < NO_VARIANCE_INDEX)
            and rows_set_apart(z[:, column]).size == 0]


# rows that alone set a column's scale stand this many times farther from its median than every
# other row: a mistyped 1e6 among values of a few units, about 10^5 times; the two farthest rows
# of a Cauchy sample (a tail, not a typo) are 100 times apart in about one table of 100
FAR_APART = 100.0


def rows_set_apart(column):
    """Indices of the fewest farthest rows without which the column's sd is at most
    SCALE_SET_BY_FAR_ROWS interquartile sds, where those rows lie FAR_APART beyond every other
    row; empty where nothing sets the spread or a tail does (no such gap)."""
    x = np.asarray(column, np.float64)
    middle, spread = _middle_and_spread(x)
    if spread == 0:
        return np.empty(0, dtype=np.int64)
    order = np.argsort(np.abs(x - middle), kind="stable")  # nearest first
    near = x[order] - middle
    count = np.arange(1, len(x) + 1)
    variance = np.cumsum(near ** 2) / count - (np.cumsum(near) / count) ** 2
    kept = 1 + np.flatnonzero(variance <= (SCALE_SET_BY_FAR_ROWS * spread) ** 2).max()
    if kept == len(x) or abs(near[kept]) < FAR_APART * abs(near[kept - 1]):
        return np.empty(0, dtype=np.int64)
    return order[kept:]


@dataclass
class Standardizer:
    """Data units ↔ the model's units: per-column (or pooled) standardisation, after the pixel
    coding where there is one (image data). Columns with few distinct values (codes, counts,
    a binary sex column) come back from inverse() snapped to those values: a density on the
    real line cannot put mass exactly on them, and a sample of 0.97 for a 0/1 column is one a
    user (and a classifier two-sample test) tells from the data at once (NOTES.md). A table's
    constant columns are left out of the model units: they have no density to learn."""
    mean: np.ndarray
    std: np.ndarray               # 1 for constant columns, so forward() stays finite
    constant: np.ndarray = None   # columns with no spread: inverse() puts them back exactly
    coding: PixelCoding = None
    discrete: dict = None         # column → sorted distinct values (tabular data)
    model_columns: np.ndarray = None  # the columns the model sees; None: all

    @classmethod
    def fit(cls, values, pooled=False, coding=None):
        """Per-column mean and std; pooled=True uses one std for all columns (images: pixels
        share units, and a near-constant border pixel must not be blown up by its tiny std)."""
        def coded(rows):
            return values[rows] if coding is None else coding.forward(values[rows])
        mean = sum(coded(rows).sum(0, dtype=np.float64) for rows in _chunks(len(values))) / len(values)
        squares = sum(((coded(rows) - mean) ** 2).sum(0) for rows in _chunks(len(values)))
        std = np.sqrt(squares / len(values))
        # judged in data units: a coded constant column can carry a rounding-level spread
        parts = (values[rows] for rows in _chunks(len(values)))
        lows, highs = zip(*((part.min(0), part.max(0)) for part in parts))  # one read of each chunk
        constant = np.min(lows, 0) == np.max(highs, 0)
        std = np.where(constant, 0.0, std)
        if pooled:
            std = np.full_like(std, np.sqrt(squares.sum() / (len(values) * squares.size)))
        discrete = None if pooled else discrete_columns(values)
        # a table's constant columns stay out of the model; an image keeps its fixed border pixels
        model_columns = None if pooled or not constant.any() or constant.all() else np.flatnonzero(~constant)
        return cls(mean, np.where(std > 0, std, 1.0), constant, coding, discrete or None, model_columns)

    @property
    def model_dim(self):
        return self.mean.size if self.model_columns is None else self.model_columns.size

    def forward(self, values, noise=None):
        """Model units (float32); noise: the pixel coding's dequantisation draws, one per value."""
        out = np.empty(values.shape, dtype=np.float32)
        for rows in _chunks(len(values)):
            part = values[rows]
            if self.coding is not None:
                part = self.coding.forward(part, None if noise is None else noise[rows])
            out[rows] = (part - self.mean) / self.std
        return out if self.model_columns is None else out[:, self.model_columns]

    def inverse(self, values):
        if self.model_columns is not None:  # constant columns at 0 in model units: their value
            values, seen = np.zeros((len(values), self.mean.size), values.dtype), values
            values[:, self.model_columns] = seen
        scale = self.std if self.constant is None else np.where(self.constant, 0.0, self.std)
        out = values * scale + self.mean
        if self.coding is not None:
            out = self.coding.inverse(out)
        for column, distinct in (self.discrete or {}).items():
            between = (distinct[1:] + distinct[:-1]) / 2
            out[:, column] = distinct[np.searchsorted(between, out[:, column])]
        return out.astype(np.float32)

    def scaled_without_rows_set_apart(self, rows, far_scaled):
        """Rows (model units) with each far-scaled column (scale_set_by_far_rows' findings) whose
        few far rows stand apart (rows_set_apart) standardised by its other rows, and this
        standardizer changed to match; {column: those rows}. Scaled with them, the other rows
        sat in a sliver of the column's range that no ε fits (NOTES.md)."""
        rows = np.array(rows, np.float64)
        places = range(self.mean.size) if self.model_columns is None else list(self.model_columns)
        set_apart = {}
        for column, _, _ in far_scaled:
            place = places.index(column)
            apart = rows_set_apart(rows[:, place])
            if apart.size == 0:
                continue
            others = np.delete(rows[:, place], apart)
            centre, spread = others.mean(), others.std()
            rows[:, place] = (rows[:, place] - centre) / spread
            self.mean[column] += self.std[column] * centre
            self.std[column] *= spread
            set_apart[column] = [int(row) for row in apart]
        return rows.astype(np.float32), set_apart

    def log_jacobian(self, values):
        """log |d(model units)/d(data units)| per row (numpy); a constant column's std is 1 and its
        power 1, so it adds nothing."""
        log_det = -np.log(self.std).sum()
        if self.coding is None:
            return np.full(len(values), log_det)
        return log_det + self.coding.log_jacobian(values)

    def to_dict(self):
        d = {"mean": self.mean.tolist(), "std": self.std.tolist()}
        if self.constant is not None:
            d["constant"] = [int(i) for i in np.flatnonzero(self.constant)]
        if self.coding is not None:
            d["coding"] = self.coding.to_dict()
        if self.discrete:
            d["discrete"] = {str(column): distinct.tolist() for column, distinct in self.discrete.items()}
        if self.model_columns is not None:
            d["model_columns"] = [int(i) for i in self.model_columns]
        return d

    @classmethod
    def from_dict(cls, d):
        mean = np.asarray(d["mean"], dtype=np.float64)
        constant = np.zeros(len(mean), dtype=bool)
        constant[list(d.get("constant", []))] = True
        coding = coding_from_dict(d.get("coding"))
        discrete = {int(column): np.asarray(distinct, dtype=np.float64)
                    for column, distinct in d.get("discrete", {}).items()} or None
        model_columns = d.get("model_columns")  # absent: every column (checkpoints from before)
        return cls(mean, np.asarray(d["std"], dtype=np.float64), constant, coding, discrete,
                   None if model_columns is None else np.asarray(model_columns, dtype=np.int64))


def check_fit_output(output, data, resume, force):
    """The checkpoint path of a fit, checked before any work: an existing file needs --resume or
    --force, --resume needs one, and the input data is never the output."""
    exists = os.path.exists(output)
    if exists and not (resume or force):
        raise BdiffError(f"{output} exists; use --resume to continue it or --force to replace it")
    if resume and not exists:
        raise BdiffError(f"--resume: no checkpoint at {output}")
    check_output(output, (".safetensors",), replace=True, inputs=(data,))


def fingerprint(values):
    """Short content hash of a data set, stored in checkpoints to tell data sets apart."""
    return hashlib.sha256(np.ascontiguousarray(values, dtype=np.float32).data).hexdigest()[:16]


def save_array(path, values):
    """Write samples to .npy or .csv atomically: a complete temp file, then a rename."""
    path = check_writable(path, (".npy", ".csv"))
    ext = os.path.splitext(path)[1].lower()
    with atomic_path(path) as tmp:
        if ext == ".npy":
            with open(tmp, "wb") as handle:
                np.save(handle, values)
        else:
            flat = values.reshape(len(values), -1)
            np.savetxt(tmp, flat, delimiter=",", fmt="%.7g")


def check_writable(path, extensions=None):
    """One clear error unless `path` can be written: an allowed suffix, an existing writable
    folder, and nothing there but a regular file. Called before long work so it is not lost at
    the end (docs/design.md §5)."""
    path = os.path.abspath(path)
    if extensions and os.path.splitext(path)[1].lower() not in extensions:
        raise BdiffError(f"cannot write {path}: use a {' or '.join(extensions)} file name")
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise BdiffError(f"cannot write {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise BdiffError(f"cannot write {path}: folder {folder} is not writable")
    if os.path.isdir(path):
        raise BdiffError(f"cannot write {path}: it is a directory")
    if os.path.lexists(path) and not os.path.isfile(path):
        raise BdiffError(f"cannot write {path}: it is not a regular file")
    return path


def check_output(path, extensions, replace=False, inputs=()):
    """check_writable, and: an existing file is replaced only with `replace` (--force), and
    never when it is one of the `inputs` (the data a command reads), however it is named."""
    path = check_writable(path, extensions)
    if os.path.exists(path):
        for source in inputs:
            if source is not None and os.path.exists(source) and os.path.samefile(path, source):
                raise BdiffError(f"cannot write {path}: it is the input data {source}")
        if not replace:
            raise BdiffError(f"{path} exists; use --force to replace it")
    return path


def make_output_folder(path):
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise BdiffError(f"cannot create {path}: {err.strerror}")


def save_json(path, value):
    with atomic_path(path) as tmp:
        with open(tmp, "w") as handle:
            json.dump(value, handle, indent=1, default=str, allow_nan=False)


def save_csv(path, records, keys):
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=keys, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(records)


TMP_MARK = ".tmp-"


class atomic_path:
    """Context manager yielding a temp path beside `path`, renamed over it on success only.
    The temp file is flushed to disk before the rename (a crash leaves the old file or the new
    one), gets the mode of the file it replaces (a new file: the umask's), and temp files left
    by killed writers are removed."""

    def __init__(self, path):
        self.path = check_writable(path)
        self.tmp = f"{self.path}{TMP_MARK}{os.getpid()}"

    def __enter__(self):
        _remove_stale_temporaries(self.path)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            try:
                _sync(self.tmp)
                os.chmod(self.tmp, _mode_for(self.path))
                os.replace(self.tmp, self.path)
            except OSError as err:
                _remove(self.tmp)
                raise BdiffError(f"cannot write {self.path}: {err.strerror}")
        else:
            _remove(self.tmp)
            if isinstance(exc, OSError):
                raise BdiffError(f"cannot write {self.path}: {exc.strerror or exc}") from None
        return False


def _sync(path):
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def _mode_for(path):
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _remove_stale_temporaries(path):
    """`path.tmp-PID` files whose writer no longer runs (killed mid-save)."""
    folder, name = os.path.split(path)
    for entry in os.listdir(folder):
        if not entry.startswith(name + TMP_MARK):
            continue
        pid = entry[len(name + TMP_MARK):]
        if pid.isdigit() and not _alive(int(pid)):
            _remove(os.path.join(folder, entry))


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class output_lock:
    """An exclusive lock on an output for a whole command, so two processes never write the
    same checkpoint: the second gets one clear error. A lock file beside the output, removed
    at the end."""

    def __init__(self, path):
        self.path = os.path.abspath(path)
        folder, name = os.path.split(self.path)
        self.lock_path = os.path.join(folder, f".{name}.lock")

    def __enter__(self):
        try:
            self.handle = open(self.lock_path, "a")
        except OSError as err:
            raise BdiffError(f"cannot lock {self.lock_path}: {err.strerror}")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.close()
            raise BdiffError(f"another bdiff process is writing {self.path}; "
                             "wait for it or choose another --output") from None
        return self

    def __exit__(self, *exc):
        _remove(self.lock_path)
        self.handle.close()
        return False


def _remove(path):
    try:
        os.remove(path)
    except OSError:
        pass

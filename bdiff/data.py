"""Loading, validating and standardising data sets."""
import hashlib
import json
import os
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
    if spec in BUILTINS and not os.path.exists(spec):
        array = BUILTINS[spec].load(split, n)
        item_shape = (8, 8) if spec == "digits" else (array.shape[1],)
        return Data(array, spec, item_shape)
    array = _read_file(spec, key)
    return _validated(array, spec)


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
            return np.load(path, allow_pickle=False)
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
        if "pickle" in str(err).lower():
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
        return np.loadtxt(path, delimiter=",", skiprows=header, ndmin=2, dtype=np.float64)
    except ValueError as err:
        raise BdiffError(f"{path} is not a numeric CSV: {err}")


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
    flat = array.reshape(array.shape[0], -1).astype(np.float64)
    bad = ~np.isfinite(flat).all(axis=1)
    if bad.any():
        raise BdiffError(f"{source}: {int(bad.sum())} rows contain NaN or inf "
                         f"(first: row {int(np.argmax(bad))}); clean them first")
    if np.abs(flat).max() > 1e30:
        raise BdiffError(f"{source}: values up to {np.abs(flat).max():.3g} overflow float32")
    return Data(flat.astype(np.float32), source, tuple(item_shape))


@dataclass
class Standardizer:
    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, values, pooled=False):
        """Per-column mean and std; pooled=True uses one std for all columns (images: pixels
        share units, and a near-constant border pixel must not be blown up by its tiny std)."""
        std = values.std(0, dtype=np.float64)
        if pooled:
            std = np.full_like(std, (values - values.mean(0)).std(dtype=np.float64))
        return cls(values.mean(0, dtype=np.float64), np.where(std > 0, std, 1.0))

    def forward(self, values):
        return ((values - self.mean) / self.std).astype(np.float32)

    def inverse(self, values):
        return (values * self.std + self.mean).astype(np.float32)

    def to_dict(self):
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, d):
        return cls(np.asarray(d["mean"], dtype=np.float64), np.asarray(d["std"], dtype=np.float64))


def fingerprint(values):
    """Short content hash of a data set, stored in checkpoints to tell data sets apart."""
    return hashlib.sha256(np.ascontiguousarray(values, dtype=np.float32).tobytes()).hexdigest()[:16]


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
    folder, not a directory. Called before long work so it is not lost at the end."""
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
    return path


def save_json(path, value):
    with atomic_path(path) as tmp:
        with open(tmp, "w") as handle:
            json.dump(value, handle, indent=1, default=str, allow_nan=False)


class atomic_path:
    """Context manager yielding a temp path beside `path`, renamed over it on success only."""

    def __init__(self, path):
        self.path = check_writable(path)
        self.tmp = f"{self.path}.tmp-{os.getpid()}"

    def __enter__(self):
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            try:
                os.replace(self.tmp, self.path)
            except OSError as err:
                _remove(self.tmp)
                raise BdiffError(f"cannot write {self.path}: {err.strerror}")
        else:
            _remove(self.tmp)
            if isinstance(exc, OSError):
                raise BdiffError(f"cannot write {self.path}: {exc.strerror or exc}") from None
        return False


def _remove(path):
    try:
        os.remove(path)
    except OSError:
        pass

"""Checkpoints: one safetensors file with weights, EMA weights, optimiser state, RNG state and
JSON metadata. Written to a temp file and renamed, so a crash never leaves half a file. The
metadata carries a SHA-256 of the tensors, verified on load, and is checked against a schema
before anything is built from it (docs/design.md §5)."""
import hashlib
import json
import math

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from bdiff import __version__
from bdiff.data import DISCRETE_MAX_VALUES, POWER_RANGE, TAIL_RANGE, atomic_path
from bdiff.errors import BdiffError

FORMAT_VERSION = 3  # 2: tensor checksum; 3: preconditioned level fields down to ε_min below ε
META_KEY = "bdiff"


def save_checkpoint(path, model, ema, optimizer, generator, meta):
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    for index, state in optimizer.state_dict().items():
        for name, value in state.items():
            tensors[f"optim.{index}.{name}"] = torch.as_tensor(value)
    tensors["rng"] = generator.get_state()
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = dict(meta, format_version=FORMAT_VERSION, version=__version__, checksum=checksum(tensors))
    with atomic_path(path) as tmp:
        try:
            save_file(tensors, tmp, metadata={META_KEY: json.dumps(meta)})
        except SafetensorError as err:  # a full disk arrives as this, not as OSError
            raise OSError(str(err)) from None


def checksum(tensors):
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def read_checkpoint(path):
    """(tensors, meta) with clear errors for a missing, foreign, corrupt or newer file."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw_meta = (handle.metadata() or {}).get(META_KEY)
        tensors = load_file(str(path))
    except FileNotFoundError:
        raise BdiffError(f"no checkpoint at {path} (train one with `bdiff fit DATA`)")
    except IsADirectoryError:
        raise BdiffError(f"{path} is a directory, not a checkpoint")
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise BdiffError(f"{path} is not a readable checkpoint (corrupt or truncated?): {err}")
    if raw_meta is None:
        raise BdiffError(f"{path} is a safetensors file but not a bdiff checkpoint")
    try:
        meta = json.loads(raw_meta)
    except json.JSONDecodeError:
        raise BdiffError(f"{path}: checkpoint metadata is corrupt")
    if not isinstance(meta, dict):
        raise BdiffError(f"{path}: checkpoint metadata is not a JSON object")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise BdiffError(f"{path} has checkpoint format {version}; this bdiff {__version__} "
                         f"reads format {FORMAT_VERSION} (train it again with `bdiff fit`)")
    if meta.get("checksum") != checksum(tensors):
        raise BdiffError(f"{path}: the tensors do not match their checksum (the file is corrupt "
                         "or was edited)")
    try:
        validate_meta(meta, tensors)
    except MetaError as err:
        raise BdiffError(f"{path}: invalid checkpoint metadata: {err}") from None
    return tensors, meta


class MetaError(ValueError):
    pass


ARCHS, PARAMS = ("shared", "separate"), ("linear", "log")


def _mixture_ok(base, dim):
    """Whether a checkpoint's flow_base is None or a well-formed Gaussian mixture (density.flow_base)."""
    if base is None:
        return True
    if not isinstance(base, dict) or set(base) != {"weights", "means", "covariances"}:
        return False
    try:
        weights, means, covariances = (np.asarray(base[key], np.float64) for key in ("weights", "means", "covariances"))
    except (TypeError, ValueError):
        return False
    count = len(weights)
    if (weights.shape != (count,) or count < 1 or means.shape != (count, dim) or covariances.shape != (count, dim, dim)
            or not all(np.isfinite(part).all() for part in (weights, means, covariances))
            or np.any(weights <= 0) or abs(weights.sum() - 1) > 1e-6
            or not np.allclose(covariances, covariances.transpose(0, 2, 1))):
        return False
    return bool(np.all(np.linalg.eigvalsh(covariances) > 0))


def validate_meta(meta, tensors):
    """Every metadata field a model is built from: types, ranges, and the network sizes
    against the stored tensors' shapes, before anything is allocated from them."""
    def need(ok, what):
        if not ok:
            raise MetaError(what)

    def number(value):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    def whole(value):
        return isinstance(value, int) and not isinstance(value, bool)

    dim = meta.get("dim")
    need(whole(dim) and dim >= 1, f"dim must be a positive integer, got {dim!r}")
    need(number(meta.get("eps")) and meta["eps"] > 0, f"eps must be a positive number, got {meta.get('eps')!r}")
    need(number(meta.get("log_c")), f"log_c must be a finite number, got {meta.get('log_c')!r}")
    need(number(meta.get("eps_train")) and meta["eps_train"] > 0,
         f"eps_train must be a positive number, got {meta.get('eps_train')!r}")
    standardizer = meta.get("standardizer")
    need(isinstance(standardizer, dict), "standardizer missing")
    # the data's columns: dim (the model's) leaves out a table's constant columns, if any
    model_columns = standardizer.get("model_columns")
    mean = standardizer.get("mean")
    columns = len(mean) if model_columns is not None and isinstance(mean, list) else dim
    need(model_columns is None or (isinstance(model_columns, list) and len(model_columns) == dim
                                   and all(whole(i) and 0 <= i < columns for i in model_columns)
                                   and model_columns == sorted(set(model_columns)) and dim < columns),
         f"standardizer model_columns must be {dim} sorted distinct column indices of fewer than "
         f"{columns}, got {model_columns!r}")
    shape = meta.get("item_shape")
    need(isinstance(shape, list) and shape and all(whole(v) and v >= 1 for v in shape)
         and int(np.prod(shape)) == columns, f"item_shape must be positive integers with product {columns}, "
         f"got {shape!r}")

    def numbers(values, check=lambda v: True):
        return isinstance(values, list) and len(values) == columns and all(number(v) and check(v) for v in values)

    for key in ("mean", "std"):
        need(numbers(standardizer.get(key)), f"standardizer {key} must be {columns} finite numbers")
    need(all(v > 0 for v in standardizer["std"]), "standardizer std must be positive")
    coding = standardizer.get("coding")

    pixels = (isinstance(coding, dict) and set(coding) == {"low", "high", "integer"}
              and number(coding["low"]) and number(coding["high"])
              and coding["low"] < coding["high"] and isinstance(coding["integer"], bool))
    powers = (isinstance(coding, dict) and set(coding) - {"tail"} == {"center", "scale", "power"}
              and numbers(coding["center"]) and numbers(coding["scale"], lambda v: v > 0)
              and numbers(coding["power"], lambda v: POWER_RANGE[0] <= v <= POWER_RANGE[1])
              and numbers(coding.get("tail", [1.0] * columns), lambda v: TAIL_RANGE[0] <= v <= TAIL_RANGE[1]))
    need(coding is None or pixels or powers,
         f"standardizer coding must be null, {{low < high, integer}} or {columns} {{center, scale > 0, "
         f"power in {list(POWER_RANGE)}, tail in {list(TAIL_RANGE)}}} each, got {coding!r}")
    discrete = standardizer.get("discrete", {})
    need(isinstance(discrete, dict) and all(
        key.isdigit() and int(key) < columns and isinstance(distinct, list)
        and 2 <= len(distinct) <= DISCRETE_MAX_VALUES
        and all(number(v) for v in distinct) and distinct == sorted(set(distinct))
        for key, distinct in discrete.items()),
        f"standardizer discrete must map column indices to 2-{DISCRETE_MAX_VALUES} sorted distinct "
        "finite values")
    constant = standardizer.get("constant", [])
    need(isinstance(constant, list) and all(whole(i) and 0 <= i < columns for i in constant),
         "standardizer constant must list column indices")
    levels = meta.get("levels")
    need(levels is None or (isinstance(levels, list) and len(levels) == 2 and all(number(v) for v in levels)
                            and 0 < levels[0] < levels[1]), f"levels must be null or [ε_min, ε_max] "
         f"with 0 < ε_min < ε_max, got {levels!r}")
    flow_eps = meta.get("flow_eps")
    need(flow_eps is None or (levels is not None and number(flow_eps) and levels[0] <= flow_eps < levels[1]),
         f"flow_eps must be null or a level in [ε_min, ε_max) of a model with levels, got {flow_eps!r}")
    end = meta.get("end_level")
    need(end is None or (levels is not None and number(end) and levels[0] <= end <= levels[1]),
         f"end_level must be null or a level in [ε_min, ε_max] of a model with levels, got {end!r}")
    need(_mixture_ok(meta.get("flow_base"), dim), "flow_base must be null or {weights, means, covariances} "
         f"of a Gaussian mixture in {dim} dimensions: positive weights summing to 1, "
         "finite means, positive definite covariances")
    far = meta.get("far_scaled_columns", [])
    need(isinstance(far, list) and all(isinstance(item, list) and len(item) == 3 and whole(item[0])
                                       and number(item[1]) and whole(item[2]) for item in far),
         "far_scaled_columns must list [column, ratio, row] triples")
    support = meta.get("support_log_s")
    need(support is None or number(support), f"support_log_s must be null or a finite number, got {support!r}")
    config = meta.get("config")
    need(isinstance(config, dict), "config missing")
    need(config.get("arch") in ARCHS, f"arch must be one of {', '.join(ARCHS)}, got {config.get('arch')!r}")
    need(config.get("param", "linear") in PARAMS, f"param must be one of {', '.join(PARAMS)}")
    need(levels is None or config.get("param") == "log", "levels need log fields")
    for key in ("width", "depth"):
        need(whole(config.get(key)) and config[key] >= 1, f"{key} must be a positive integer, "
             f"got {config.get(key)!r}")
    need(whole(meta.get("step")) and meta["step"] >= 0, "step must be a non-negative integer")
    from bdiff.fields import MAX_FOURIER
    fourier = config.get("fourier", 0)  # checkpoints from before the option have none
    need(whole(fourier) and 0 <= fourier <= MAX_FOURIER,
         f"fourier must be an integer in [0, {MAX_FOURIER}], got {fourier!r}")
    _check_network_shapes(config, dim, levels, tensors, need)


def _check_network_shapes(config, dim, levels, tensors, need):
    """The EMA network's tensor shapes must be exactly those of the stored width and depth:
    computed from the numbers, so a forged width or depth allocates nothing."""
    from bdiff.fields import LEVEL_FEATURES
    fourier = config.get("fourier", 0)
    size_in = dim + (LEVEL_FEATURES if levels else 0) + 2 * fourier
    width, depth = config["width"], config["depth"]
    heads = {"net": 1 + dim} if config["arch"] == "shared" else {"scalar_net": 1, "gradient_net": dim}
    stored = {k[4:]: tuple(v.shape) for k, v in tensors.items() if k.startswith("ema.")}
    need(stored.pop("frequencies", None) == ((dim, fourier) if fourier else None),
         f"the stored Fourier frequencies do not match fourier {fourier}")
    need(len(stored) == 2 * (depth + 1) * len(heads), f"depth {depth} does not match the stored network")
    for head, size_out in heads.items():
        sizes = [size_in] + [width] * depth + [size_out]
        for layer in range(depth + 1):
            index = 2 * layer  # Linear, SiLU, Linear, ...: the linear layers sit at even indices
            need(stored.get(f"{head}.{index}.weight") == (sizes[layer + 1], sizes[layer])
                 and stored.get(f"{head}.{index}.bias") == (sizes[layer + 1],),
                 f"width {width} and depth {depth} do not match the stored network")


def split_state(tensors, prefix):
    return {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def optimizer_state(tensors):
    """The optimiser's state (parameter index -> its named tensors) from the flat tensors."""
    state = {}
    for key, value in split_state(tensors, "optim").items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return state

"""Checkpoints: one safetensors file with weights, EMA weights, optimiser state, RNG state and
JSON metadata. Written to a temp file and renamed, so a crash never leaves half a file."""
import json

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from bdiff import __version__
from bdiff.data import atomic_path
from bdiff.errors import BdiffError

FORMAT_VERSION = 1
META_KEY = "bdiff"


def save_checkpoint(path, model, ema, optimizer, generator, meta):
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    for index, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            tensors[f"optim.{index}.{name}"] = torch.as_tensor(value)
    tensors["rng"] = generator.get_state()
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = dict(meta, format_version=FORMAT_VERSION, version=__version__)
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={META_KEY: json.dumps(meta)})


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
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise BdiffError(f"{path} has checkpoint format {version}; this bdiff {__version__} "
                         f"reads format {FORMAT_VERSION}")
    return tensors, meta


def split_state(tensors, prefix):
    return {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def optimizer_state(tensors, optimizer):
    """Rebuild an optimiser state_dict from the flat tensors, keeping the current param groups."""
    state = {}
    for key, value in split_state(tensors, "optim").items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": optimizer.state_dict()["param_groups"]}

import os

# Triton kernels run on the CPU interpreter in tests; it must be set before Triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
# Under pytest-xdist (-n N) each of the N workers takes its share of the cores, and so do the
# commands the tests start (bdiff honours OMP_NUM_THREADS): N workers each on every core would
# oversubscribe them.
if "PYTEST_XDIST_WORKER" in os.environ:
    _WORKERS = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // _WORKERS))

import numpy as np
import pytest
import torch

from bdiff.backend import prepare_host
from bdiff.datasets import BUILTINS
from bdiff.trainer import FitConfig, Trainer

prepare_host()  # as the CLI does: OMP_NUM_THREADS threads, freed memory kept

TINY = dict(steps=60, width=32, depth=2, batch_size=256, checkpoint_every=20)


def random_case(batch, refs, dim, seed=0):
    """Queries and references for kernel tests (odd sizes are the caller's choice)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, dim, generator=g), torch.randn(refs, dim, generator=g)


@pytest.fixture(scope="session")
def mixture_small():
    return BUILTINS["mixture"].load("train", n=1500)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, mixture_small):
    """A briefly trained 2-D model: enough for plumbing tests, not for quality."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    Trainer(mixture_small, FitConfig(**TINY), "mixture").run(str(path))
    return path


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _in_a_temporary_folder(tmp_path, monkeypatch):
    """Every test runs in its own empty folder: default outputs (bdiff.safetensors, samples.npy)
    land there, never in the checkout, and files the README's main job left behind there
    cannot change a test's outcome."""
    monkeypatch.chdir(tmp_path)

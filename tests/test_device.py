"""Device correctness without a GPU: every tensor the engine or the kernels create names its
device, so nothing is silently made on the CPU and then meets data on a GPU. A function mode
watches the factory calls made from the project's own files while a fit, sampling and an
evaluation run on CPU tensors."""
import inspect
import os

import pytest
import torch
from torch.overrides import TorchFunctionMode

from bdiff.datasets import BUILTINS
from bdiff.metrics import evaluate
from bdiff.model import TrainedModel
from bdiff.sampler import SAMPLERS
from bdiff.trainer import FitConfig, Trainer

PROJECT = tuple(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), folder) + os.sep
                for folder in ("bdiff", "kernels"))
FACTORIES = {torch.randn, torch.rand, torch.randint, torch.randperm, torch.zeros, torch.ones, torch.full,
             torch.empty, torch.arange, torch.linspace, torch.eye, torch.normal}


class ImplicitDeviceGuard(TorchFunctionMode):
    """Records each factory call from the project's files that leaves the device to the default."""

    def __init__(self):
        super().__init__()
        self.sites = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and "device" not in kwargs:
            caller = inspect.currentframe().f_back
            path = os.path.abspath(caller.f_code.co_filename)
            if path.startswith(PROJECT):
                self.sites.add(f"{os.path.relpath(path, os.path.dirname(PROJECT[0].rstrip(os.sep)))}:{caller.f_lineno} {func.__name__}")
        return func(*args, **kwargs)


@pytest.mark.parametrize("param", ["log", "linear"])
def test_fit_sample_and_evaluate_name_the_device_of_every_tensor(tmp_path, param):
    data = BUILTINS["mixture"].load("train", n=600)
    heldout = BUILTINS["mixture"].load("heldout", n=200)
    path = tmp_path / "m.safetensors"
    guard = ImplicitDeviceGuard()
    with guard:
        Trainer(data, FitConfig(steps=30, width=32, depth=2, param=param, checkpoint_every=30), "mixture").run(str(path))
        model = TrainedModel.load(str(path))
        for sampler in SAMPLERS if param == "log" else ("bellman", "precond"):
            x, _ = model.sample(300, model.sample_config(seed=0, sampler=sampler, steps=20))
        values = model.standardizer.inverse(x.numpy())
        evaluate(model, heldout, values, train=data)
    assert not guard.sites, "tensors created on the default device:\n" + "\n".join(sorted(guard.sites))

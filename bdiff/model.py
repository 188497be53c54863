"""A trained model loaded from a checkpoint: fields in standardised and in data units."""
import math
from dataclasses import dataclass

import numpy as np
import torch

from bdiff.checkpoint import read_checkpoint, split_state
from bdiff.data import Standardizer, is_image
from bdiff.density import flow_log_density, log_density_std
from bdiff.errors import BdiffError
from bdiff.fields import FieldModel
from bdiff.sampler import UncoveredSupport, default_sample_config, sample


@dataclass
class TrainedModel:
    fields_net: FieldModel  # the EMA weights
    eps: float
    log_c: float
    standardizer: Standardizer
    meta: dict

    @property
    def dim(self):
        """The model's dimensions: the data's columns less its constant ones (Standardizer)."""
        return self.fields_net.dim

    @property
    def data_dim(self):
        return self.standardizer.mean.size

    @classmethod
    def load(cls, path, device="cpu"):
        tensors, meta = read_checkpoint(path)
        cfg = meta["config"]
        try:
            net = FieldModel(meta["dim"], cfg["width"], cfg["depth"], cfg["arch"], cfg.get("param", "linear"),
                             meta.get("levels"), cfg.get("fourier", 0))
            net.load_state_dict(split_state(tensors, "ema"))
            standardizer = Standardizer.from_dict(meta["standardizer"])
            eps, log_c = float(meta["eps"]), float(meta["log_c"])
        except (KeyError, RuntimeError, ValueError, TypeError) as err:
            raise BdiffError(f"{path}: checkpoint is incomplete or inconsistent: {err}")
        if not (math.isfinite(eps) and math.isfinite(log_c)):
            raise BdiffError(f"{path}: checkpoint holds a non-finite ε or log C")
        net.to(device).eval().requires_grad_(False)
        return cls(net, eps, log_c, standardizer, meta)

    @property
    def exact_log(self):
        return self.fields_net.param == "log"

    def fields(self, x_std):
        """(s, g) at standardised points (torch)."""
        return self.fields_net.fields_batched(x_std, eps=self.eps)

    @property
    def levels(self):
        """(ε_min, ε_max) of a level-conditioned model, else None."""
        return self.fields_net.levels

    def log_fields(self, x_std, eps=None):
        """(log s, ∇log s) at standardised points, without underflow for log-domain models;
        at noise level ε for a level-conditioned model (None: the model's own ε)."""
        return self.fields_net.fields_batched(x_std, log=True, eps=self.eps if eps is None else eps)

    def score(self, x_std, eps=None):
        """∇log s alone at standardised points (the annealed sampler's only need)."""
        return self.fields_net.score_batched(x_std, eps=self.eps if eps is None else eps)

    @property
    def support_log_s(self):
        """log s of the data's lowest 0.1 % of rows at ε (the sampler trims below it); None for
        checkpoints from before it was stored."""
        return self.meta.get("support_log_s")

    @property
    def base_mixture(self):
        """The rows' Gaussian mixture (standardised units) that smoothed by ε_max is p_ε_max, where
        the flow density ends and the annealing samplers start; None for images and checkpoints
        from before it was stored (then N(0, (1 + ε_max) I))."""
        return self.meta.get("flow_base")

    @property
    def end_level(self):
        """The level the annealing samplers end at, chosen by fit (sampler.choose_end_level);
        None for checkpoints from before it was stored (then ε_min)."""
        return self.meta.get("end_level")

    @property
    def item_shape(self):
        """The shape of one item: (D,), or the image's axes."""
        return tuple(self.meta.get("item_shape") or [self.data_dim])

    def sample_config(self, **overrides):
        """The measured sampler defaults for this kind of model, overridden where not None."""
        return default_sample_config(self.fields_net.param, self.levels is not None,
                                     image=is_image(self.item_shape), **overrides)

    def sample(self, n, cfg, on_batch=None):
        """n samples in standardised units and the sampler's report."""
        try:
            return sample(self, n, cfg, self._device(), on_batch)
        except UncoveredSupport as err:
            far = self.meta.get("far_scaled_columns")  # fit's warning, where the cause likely is
            if not far:
                raise
            column, _, row = far[0]
            raise UncoveredSupport(f"{err}. fit found column {column}'s scale set by a few far rows (the "
                                   f"farthest: row {row}): remove them and fit again") from None

    def sample_values(self, n, cfg, on_batch=None):
        """n samples in data units (a NumPy array on the host) and the sampler's report."""
        x, report = self.sample(n, cfg, on_batch)
        return self.standardizer.inverse(x.cpu().numpy()), report

    def check_dim(self, values, what):
        if values.shape[1] != self.data_dim:
            count = values.shape[1]
            raise BdiffError(f"{what}: {count} dimension{'' if count == 1 else 's'}, but the model was "
                             f"trained on {self.data_dim}")

    def log_density_std(self, x_std):
        """log p̂ at standardised points (float64); see density.log_density_std."""
        return log_density_std(self.fields_net, x_std.to(self._device()), self.eps, self.log_c).cpu()

    def log_density(self, values):
        """Log of the field density at points in data units (numpy)."""
        return self._in_data_units(self.log_density_std, values)

    def _in_data_units(self, log_density_std_fn, values):
        """A log-density of standardised points (torch → torch) read at points in data units."""
        self.check_dim(values, "the data")
        x = torch.from_numpy(self.standardizer.forward(values))
        return log_density_std_fn(x).numpy() + self.standardizer.log_jacobian(values)

    @property
    def flow_eps(self):
        """The level of the flow density, where fit chose it (it predicted the validation rows
        better than the field density); None: the field density is the model's density."""
        return self.meta.get("flow_eps")

    def flow_log_density(self, values):
        """Log of the probability-flow density from flow_eps (density.flow_log_density) at points
        in data units (numpy)."""
        return self._in_data_units(lambda x: flow_log_density(self.fields_net, x, self.flow_eps,
                                                              base=self.base_mixture), values)

    def fields_in_data_units(self, values):
        """Density and its gradient in data units (for plots and field errors)."""
        x = torch.from_numpy(self.standardizer.forward(values)).to(self._device())
        s, g = self.fields(x)
        scale = math.exp(self.log_c - 0.5 * self.dim * math.log(2 * math.pi * self.eps))
        scale /= float(np.prod(self.standardizer.std))
        density = s.double().cpu().numpy() * scale
        gradient = np.zeros((len(values), self.data_dim))  # none along a constant column
        columns = self.standardizer.model_columns
        columns = slice(None) if columns is None else columns
        gradient[:, columns] = g.double().cpu().numpy() * scale / self.standardizer.std[columns]
        return density, gradient

    def _device(self):
        return next(self.fields_net.parameters()).device

"""The two neural fields: s(x) ≈ p_ε(x) (scaled by the global constant) and g(x) ≈ ∇s(x)."""
import math

import torch
from torch import nn


def mlp(dim_in, dim_out, width, depth):
    layers, size = [], dim_in
    for _ in range(depth):
        layers += [nn.Linear(size, width), nn.SiLU()]
        size = width
    layers.append(nn.Linear(size, dim_out))
    return nn.Sequential(*layers)


PARAMS = ("linear", "log")
LOG_DIM = 8  # param="auto": the log parameterisation above this dimension


def log_view(s, g):
    """(log s, ∇log s = g/s) of linear fields; -inf and 0 where s is not positive."""
    positive = s > 0
    log_s = torch.where(positive, s.clamp_min(1e-38).log(), torch.full_like(s, -math.inf))
    score = torch.where(positive.unsqueeze(1), g / s.clamp_min(1e-38).unsqueeze(1), torch.zeros_like(g))
    return log_s, score


def resolve_param(param, dim):
    if param == "auto":
        return "log" if dim > LOG_DIM else "linear"
    if param not in PARAMS:
        raise ValueError(f"unknown field parameterisation {param!r}")
    return param


class FieldModel(nn.Module):
    """Scalar and gradient fields on standardised inputs.

    arch="shared": one trunk with 1 + D outputs (half the parameters and time);
    arch="separate": one MLP per field, as in the paper's two networks.
    param="linear": the outputs are s and g themselves; param="log": they are log s and
    g/s = ∇log s, so s = exp(·) stays positive and finite where p_ε spans hundreds of nats
    (D ≳ 10); the fields the sampler sees are still s and g.
    """

    def __init__(self, dim, width=256, depth=3, arch="shared", param="linear"):
        super().__init__()
        self.dim, self.arch, self.param = dim, arch, resolve_param(param, dim)
        if arch == "shared":
            self.net = mlp(dim, 1 + dim, width, depth)
        elif arch == "separate":
            self.scalar_net = mlp(dim, 1, width, depth)
            self.gradient_net = mlp(dim, dim, width, depth)
        else:
            raise ValueError(f"unknown arch {arch!r}")

    def raw(self, x):
        """The network outputs: (s, g) for param="linear", (log s, ∇log s) for "log"."""
        if self.arch == "shared":
            out = self.net(x)
            return out[:, 0], out[:, 1:]
        return self.scalar_net(x)[:, 0], self.gradient_net(x)

    def forward(self, x):
        a, b = self.raw(x)
        if self.param == "log":
            s = torch.exp(a)
            return s, s.unsqueeze(1) * b
        return a, b

    @torch.no_grad()
    def fields_batched(self, x, batch_size=65536, log=False):
        """Both fields without autograd, in batches to bound memory; log=True gives
        (log s, ∇log s) instead (log s = -inf where a linear s is not positive)."""
        parts = [(self.log_fields if log else self)(x[i:i + batch_size])
                 for i in range(0, len(x), batch_size)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def log_fields(self, x):
        a, b = self.raw(x)
        return (a, b) if self.param == "log" else log_view(a, b)

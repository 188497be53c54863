"""The two neural fields: s(x) ≈ p_ε(x) (scaled by the global constant) and g(x) ≈ ∇s(x)."""
import torch
from torch import nn


def mlp(dim_in, dim_out, width, depth):
    layers, size = [], dim_in
    for _ in range(depth):
        layers += [nn.Linear(size, width), nn.SiLU()]
        size = width
    layers.append(nn.Linear(size, dim_out))
    return nn.Sequential(*layers)


class FieldModel(nn.Module):
    """Scalar and gradient fields on standardised inputs.

    arch="shared": one trunk with 1 + D outputs (half the parameters and time);
    arch="separate": one MLP per field, as in the paper's two networks.
    """

    def __init__(self, dim, width=256, depth=3, arch="shared"):
        super().__init__()
        self.dim, self.arch = dim, arch
        if arch == "shared":
            self.net = mlp(dim, 1 + dim, width, depth)
        elif arch == "separate":
            self.scalar_net = mlp(dim, 1, width, depth)
            self.gradient_net = mlp(dim, dim, width, depth)
        else:
            raise ValueError(f"unknown arch {arch!r}")

    def forward(self, x):
        if self.arch == "shared":
            out = self.net(x)
            return out[:, 0], out[:, 1:]
        return self.scalar_net(x)[:, 0], self.gradient_net(x)

    @torch.no_grad()
    def fields_batched(self, x, batch_size=65536):
        """Evaluate both fields without autograd, in batches to bound memory."""
        parts = [self(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

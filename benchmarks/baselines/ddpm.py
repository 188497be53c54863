"""A small DDPM (Ho et al. 2020) written plainly, as the image baseline: an ε-prediction MLP
with a sinusoidal time embedding, the standard linear β schedule (1e-4 → 0.02 over T = 1000),
the simple loss ‖ε - ε_θ(x_t, t)‖², and ancestral sampling with σ_t² = β_t.

Works on standardised data (N, D); `python benchmarks/digits.py` runs it beside bdiff.
"""
import math
import time

import torch
from torch import nn


def time_embedding(t, dim=64):
    """Sinusoidal embedding of integer steps t (B,) → (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000) * torch.arange(half) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], 1)


class NoiseNet(nn.Module):
    def __init__(self, dim, width=256, depth=3, embed=64):
        super().__init__()
        self.embed = embed
        layers, size = [], dim + embed
        for _ in range(depth):
            layers += [nn.Linear(size, width), nn.SiLU()]
            size = width
        layers.append(nn.Linear(size, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x, t):
        return self.net(torch.cat([x, time_embedding(t, self.embed)], 1))


class DDPM:
    def __init__(self, dim, width=256, depth=3, steps_t=1000, seed=0):
        torch.manual_seed(seed)
        self.net = NoiseNet(dim, width, depth)
        self.betas = torch.linspace(1e-4, 0.02, steps_t)
        self.alphas = 1 - self.betas
        self.alpha_bars = torch.cumprod(self.alphas, 0)
        self.steps_t = steps_t
        self.generator = torch.Generator().manual_seed(seed)

    def n_parameters(self):
        return sum(p.numel() for p in self.net.parameters())

    def fit(self, data, steps=5000, batch_size=1024, lr=2e-3, on_step=None):
        """Adam with the same cosine schedule length as bdiff's trainer; returns seconds."""
        optimizer = torch.optim.Adam(self.net.parameters(), lr=lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps, eta_min=0.05 * lr)
        start = time.perf_counter()
        for step in range(steps):
            x0 = data[torch.randint(len(data), (batch_size,), generator=self.generator)]
            t = torch.randint(self.steps_t, (batch_size,), generator=self.generator)
            noise = torch.randn(x0.shape, generator=self.generator)
            a = self.alpha_bars[t][:, None]
            loss = (self.net(a.sqrt() * x0 + (1 - a).sqrt() * noise, t) - noise).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            if on_step is not None:
                on_step(step + 1, float(loss))
        return time.perf_counter() - start

    @torch.no_grad()
    def sample(self, n, dim):
        x = torch.randn(n, dim, generator=self.generator)
        for t in reversed(range(self.steps_t)):
            steps = torch.full((n,), t, dtype=torch.long)
            eps_hat = self.net(x, steps)
            beta, alpha, alpha_bar = self.betas[t], self.alphas[t], self.alpha_bars[t]
            x = (x - beta / (1 - alpha_bar).sqrt() * eps_hat) / alpha.sqrt()
            if t > 0:
                x = x + beta.sqrt() * torch.randn(x.shape, generator=self.generator)
        return x

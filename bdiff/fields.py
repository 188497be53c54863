"""The two neural fields: s(x) ≈ p_ε(x) (scaled by the global constant) and g(x) ≈ ∇s(x)."""
import math

import torch
from torch import nn
from torch.nn import functional


class SiLU(nn.SiLU):
    """SiLU in place where no gradient is taken (sampling, 200 network passes a batch): one pass
    over the activations instead of a read and a fresh write, 7 % of `bdiff sample` on a slow
    2-core machine (NOTES.md). With gradients on (training, the flow density's divergence) it is
    the plain SiLU, whose backward needs its input."""

    def forward(self, x):
        return functional.silu(x, inplace=not torch.is_grad_enabled())


def mlp(dim_in, dim_out, width, depth):
    layers, size = [], dim_in
    for _ in range(depth):
        layers += [nn.Linear(size, width), SiLU()]
        size = width
    layers.append(nn.Linear(size, dim_out))
    return nn.Sequential(*layers)


PARAMS = ("linear", "log")
LEVEL_FEATURES = 16  # sinusoidal features of the noise level fed to level-conditioned fields
MAX_FOURIER = 4096  # most random Fourier frequencies of the input (a checkpoint's bound too)


def level_features(eps, levels):
    """Sin/cos features of u = log(ε/ε_min) / log(ε_max/ε_min) ∈ [0, 1], per row."""
    eps_min, eps_max = levels
    u = torch.log(eps / eps_min) / math.log(eps_max / eps_min)
    k = math.pi * torch.arange(1, LEVEL_FEATURES // 2 + 1, dtype=u.dtype, device=u.device)
    return torch.cat([torch.sin(u[:, None] * k), torch.cos(u[:, None] * k)], 1)


def fourier_frequencies(dim, count, reach, seed):
    """`count` random directions with lengths log-uniform from 1/2 to `reach` radians per unit
    of the standardised input: sin/cos features that let an MLP follow detail as fine as
    1/reach, which its smooth activations alone blur (spectral bias; Tancik et al. 2020)."""
    # drawn on the CPU, so the same seed gives the same frequencies on every device; the buffer
    # moves with the model
    generator = torch.Generator().manual_seed(seed)
    direction = torch.randn(dim, count, generator=generator, dtype=torch.float64, device="cpu")
    exponent = torch.rand(count, generator=generator, dtype=torch.float64, device="cpu")
    length = 0.5 * (2 * max(reach, 0.5)) ** exponent
    return (direction / direction.norm(dim=0) * length).float()


def log_view(s, g):
    """(log s, ∇log s = g/s) of linear fields; -inf and 0 where s is not positive."""
    positive = s > 0
    log_s = torch.where(positive, s.clamp_min(1e-38).log(), torch.full_like(s, -math.inf))
    score = torch.where(positive.unsqueeze(1), g / s.clamp_min(1e-38).unsqueeze(1), torch.zeros_like(g))
    return log_s, score


def resolve_param(param):
    """auto: log fields in every dimension. A linear s goes negative between modes (negative
    mass) and underflows above ~8-D; log fields with noise levels measured better on 1-D and 2-D
    data too (NOTES.md), so one family serves all D."""
    if param == "auto":
        return "log"
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

    levels=(ε_min, ε_max): the fields of every p_ε with ε in that range, ε fed as features
    (log fields only). Each is still linear in p_ε; the density is read at one level (the
    model's ε), the others let the annealed sampler travel from a broad p_ε down to ε_min.
    The networks see x / sqrt(1 + ε), unit-scale at every level of standardised data, and the
    score is that of N(0, (1 + ε) I) plus a network term scaled by 1/sqrt(ε (1 + ε)) (Karras
    et al. 2022's preconditioning, docs/design.md §2.2): O(1) targets at every level, and
    the tiny levels where a denoiser must keep x almost as it is stay learnable.
    """

    def __init__(self, dim, width=256, depth=3, arch="shared", param="linear", levels=None,
                 fourier=0, fourier_reach=1.0, seed=0):
        super().__init__()
        self.dim, self.arch, self.param = dim, arch, resolve_param(param)
        self.levels = None if levels is None else (float(levels[0]), float(levels[1]))
        if self.levels is not None and (self.param != "log" or not 0 < self.levels[0] < self.levels[1]):
            raise ValueError(f"levels need log fields and 0 < ε_min < ε_max, got {levels}")
        self.fourier = fourier
        if fourier:
            self.register_buffer("frequencies", fourier_frequencies(dim, fourier, fourier_reach, seed))
        size_in = dim + (LEVEL_FEATURES if self.levels else 0) + 2 * fourier
        if arch == "shared":
            self.net = mlp(size_in, 1 + dim, width, depth)
        elif arch == "separate":
            self.scalar_net = mlp(size_in, 1, width, depth)
            self.gradient_net = mlp(size_in, dim, width, depth)
        else:
            raise ValueError(f"unknown arch {arch!r}")

    def raw(self, x, eps=None, score_only=False):
        """The network outputs: (s, g) for param="linear", (log s, ∇log s) for "log"; for a
        level-conditioned model at ε (a number or one per row; None: ε_min). score_only: log
        fields from two networks skip the scalar one (a is then None): annealing needs the
        score alone, and the scalar network was half its time."""
        if self.levels is not None:
            level = torch.as_tensor(self.levels[0] if eps is None else eps, dtype=x.dtype, device=x.device)
            eps = level.expand(x.shape[0])
            spread = (1 + eps).unsqueeze(1)  # p_ε's variance per dimension for standardised data
            inputs = [x / spread.sqrt(), level_features(eps, self.levels)]
        else:
            inputs = [x]
        if self.fourier:
            # a batch at one level (the samplers') is damped once, not once per row
            blur = None if self.levels is None else (level / (1 + level)).reshape(-1)
            inputs += self._fourier_features(inputs[0], blur)
        inputs = torch.cat(inputs, 1)
        if self.arch == "shared":
            out = self.net(inputs)
            a, b = out[:, 0], out[:, 1:]
        else:
            skip = score_only and self.param == "log"
            a, b = None if skip else self.scalar_net(inputs)[:, 0], self.gradient_net(inputs)
        if self.levels is not None:
            b = b / (spread * eps.unsqueeze(1)).sqrt() - x / spread
        return a, b

    def _fourier_features(self, x, blur=None):
        """sin and cos of w·x; at a noise level, each damped by exp(-|w|² blur / 2): the
        Gaussian blur of variance `blur` (the level's, in the scaled input) turns a sinusoid into
        itself times that factor, so a broad level gets no detail its p_ε cannot have."""
        phase = x @ self.frequencies
        features = [torch.sin(phase), torch.cos(phase)]
        if blur is not None:
            damp = torch.exp(-0.5 * self.frequencies.pow(2).sum(0) * blur.unsqueeze(1))
            features = [f * damp for f in features]
        return features

    def forward(self, x, eps=None):
        a, b = self.raw(x, eps)
        if self.param == "log":
            s = torch.exp(a)
            return s, s.unsqueeze(1) * b
        return a, b

    @torch.no_grad()
    def fields_batched(self, x, batch_size=65536, log=False, eps=None):
        """Both fields without autograd, in batches to bound memory; log=True gives
        (log s, ∇log s) instead (log s = -inf where a linear s is not positive)."""
        parts = [(self.log_fields if log else self)(x[i:i + batch_size], eps)
                 for i in range(0, len(x), batch_size)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def log_fields(self, x, eps=None):
        a, b = self.raw(x, eps)
        return (a, b) if self.param == "log" else log_view(a, b)

    @torch.no_grad()
    def score_batched(self, x, batch_size=65536, eps=None):
        """∇log s alone, without autograd, in batches."""
        if self.param != "log":
            return self.fields_batched(x, batch_size, log=True, eps=eps)[1]
        return torch.cat([self.raw(part, eps, score_only=True)[1] for part in x.split(batch_size)])

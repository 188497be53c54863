"""Bellman Diffusion for distributional RL: fields s(u | state, a) ≈ p(u) and g ≈ ∂p/∂u of the
standardised return u, trained by regression to the linear Bellman targets (SPEC §1.4):

    non-terminal   s*(u) = (1/γ) s'((u - shift)/γ),   g*(u) = (1/γ²) g'((u - shift)/γ)
    terminal       s*(u) = N(u - shift; 0, ε),        g*(u) = -(u - shift)/ε · N(u - shift; 0, ε)

with s', g' the target network's fields at (next state, next action). No projection step.
"""
import math

import torch
from torch import nn

from bdiff.rl.trunk import Trunk

RANGE = 1.25  # fields live on u in [-RANGE, RANGE]; returns are standardised into [-1, 1]


class ReturnFieldNet(nn.Module):
    """Trunk(state) → h; head([h, u]) → (s_a(u), g_a(u)) for every action a."""

    def __init__(self, n_features, n_actions, hidden=128):
        super().__init__()
        self.n_actions = n_actions
        self.trunk = Trunk(n_features, hidden)
        self.head = nn.Sequential(nn.Linear(hidden + 1, hidden), nn.SiLU(), nn.Linear(hidden, hidden),
                                  nn.SiLU(), nn.Linear(hidden, 2 * n_actions))
        # start from zero fields: a random initial density has the wrong mass and shape, and
        # the Bellman iteration removes that error only by a factor γ per target update cycle
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def forward(self, states, u):
        """states (B, F), u (B, K) → s, g of shape (B, K, A)."""
        h = self.trunk(states)
        batch, k = u.shape
        inputs = torch.cat([h[:, None, :].expand(batch, k, h.shape[1]), u[..., None]], -1)
        out = self.head(inputs)
        return out[..., :self.n_actions], out[..., self.n_actions:]


def gaussian(u, eps):
    return torch.exp(-u * u / (2 * eps)) / math.sqrt(2 * math.pi * eps)


def bellman_targets(next_s, next_g, u, shifts, gamma, terminal, eps):
    """Targets at query points u (B, K) from the target fields evaluated at (u - shift)/γ."""
    diff = u - shifts[:, None]
    terminal_s = gaussian(diff, eps)
    s = torch.where(terminal[:, None], terminal_s, next_s / gamma)
    g = torch.where(terminal[:, None], -diff / eps * terminal_s, next_g / gamma**2)
    return s, g


class BellmanAgent:
    def __init__(self, n_features, n_actions, gamma, hidden=128, lr=1e-3, eps=0.05**2,
                 n_queries=24, grid_points=64, mass_weight=1.0, normalise_targets=True):
        self.gamma, self.eps, self.n_queries = gamma, eps, n_queries
        self.grid = torch.linspace(-RANGE, RANGE, grid_points)
        self.cell = float(self.grid[1] - self.grid[0])
        self.mass_grid = torch.linspace(-RANGE, RANGE, 48)[None]
        self.mass_weight = mass_weight
        self.normalise_targets = normalise_targets
        self.net = ReturnFieldNet(n_features, n_actions, hidden)
        self.target = ReturnFieldNet(n_features, n_actions, hidden)
        self.target.load_state_dict(self.net.state_dict())
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=lr)

    def _grid_density(self, net, states):
        s, _ = net(states, self.grid.expand(len(states), -1))
        return s.clamp_min(0)  # (B, G, A)

    @torch.no_grad()
    def mean_returns(self, states, net=None):
        """E[u] per action by quadrature of the (normalised) scalar field on the grid."""
        density = self._grid_density(net or self.net, states)
        mass = density.sum(1).clamp_min(1e-12)
        return (density * self.grid[None, :, None]).sum(1) / mass

    @torch.no_grad()
    def distribution(self, states, actions):
        """(grid, density (B, G)) of the learned return law in standardised units."""
        density = self._grid_density(self.net, states)[torch.arange(len(actions)), :, actions]
        return self.grid, density

    @torch.no_grad()
    def greedy_next(self, next_states):
        return self.mean_returns(next_states, self.target).argmax(1)

    @torch.no_grad()
    def _queries(self, density, shifts, terminal, generator=None):
        """Half spread over the return range, half near the target's mass: shift + γ·ζ with ζ
        drawn from the target density of (s', a') on the grid (terminal: shift + N(0, ε))."""
        batch, half = len(shifts), self.n_queries // 2
        spread = (torch.rand(batch, half, generator=generator) * 2 - 1) * RANGE
        weights = density + 1e-6
        picks = torch.multinomial(weights, self.n_queries - half, replacement=True, generator=generator)
        zeta = self.grid[picks] + (torch.rand(picks.shape, generator=generator) - 0.5) * self.cell
        jitter = torch.randn(batch, self.n_queries - half, generator=generator) * math.sqrt(self.eps)
        near = torch.where(terminal[:, None], shifts[:, None] + jitter, shifts[:, None] + self.gamma * zeta)
        return torch.cat([spread, near], 1)

    def loss(self, batch, next_actions):
        states, actions, shifts, terminal, next_states = batch
        with torch.no_grad():
            density = self._grid_density(self.target, next_states)[torch.arange(len(shifts)), :, next_actions]
            u = self._queries(density, shifts, terminal)
            u_next = (u - shifts[:, None]) / self.gamma
            next_s, next_g = self.target(next_states, u_next)
            index = next_actions[:, None, None].expand(-1, u.shape[1], 1)
            next_s, next_g = next_s.gather(2, index)[..., 0], next_g.gather(2, index)[..., 0]
            # returns never leave [-1, 1]: beyond the trained range the target network only
            # extrapolates, and feeding that back makes mass grow at the edges
            inside = u_next.abs() <= RANGE
            next_s, next_g = next_s * inside, next_g * inside
            if self.normalise_targets:
                # The operator preserves the mass of an error (it is (1/γ)-expansive pointwise),
                # so regression noise would pile up as excess mass. Every return law has mass 1:
                # dividing the target fields by the target density's mass (1-D quadrature) keeps
                # the iteration on densities, where it contracts (by γ in W1).
                mass = (density.sum(1) * self.cell).clamp_min(1e-3)[:, None]
                next_s, next_g = next_s / mass, next_g / mass
            s_target, g_target = bellman_targets(next_s, next_g, u, shifts, self.gamma, terminal, self.eps)
        s, g = self.net(states, torch.cat([u, self.mass_grid.expand(len(u), -1)], 1))
        index = actions[:, None, None].expand(-1, s.shape[1], 1)
        s, g = s.gather(2, index)[..., 0], g.gather(2, index)[..., 0]
        k = u.shape[1]
        # ε·|g - g*|² puts both fields on the same scale (g ~ s/sqrt(ε))
        fit = ((s[:, :k] - s_target) ** 2).mean() + self.eps * ((g[:, :k] - g_target) ** 2).mean()
        # The density Bellman operator preserves the mass of an error instead of shrinking it
        # (it is (1/γ)-expansive pointwise), so fitting noise accumulates as excess mass.
        # ∫ s du = 1 and ∫ g du = 0 hold for every return density and are linear in the fields.
        cell = float(self.mass_grid[0, 1] - self.mass_grid[0, 0])
        mass = s[:, k:].sum(1) * cell
        flux = g[:, k:].sum(1) * cell
        return fit + self.mass_weight * (((mass - 1) ** 2).mean() + self.eps * (flux ** 2).mean())

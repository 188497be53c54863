"""C51 (categorical distributional RL), written plainly: fixed atoms, projection of
r + γ·atoms onto them, cross-entropy to the projected target."""
import torch
from torch import nn

from bdiff.rl.trunk import Trunk


class C51Net(nn.Module):
    def __init__(self, n_features, n_actions, n_atoms=51, hidden=128):
        super().__init__()
        self.n_actions, self.n_atoms = n_actions, n_atoms
        self.trunk = Trunk(n_features, hidden)
        self.head = nn.Linear(hidden, n_actions * n_atoms)

    def forward(self, states):
        """Log-probabilities over atoms, (B, A, N)."""
        logits = self.head(self.trunk(states)).view(-1, self.n_actions, self.n_atoms)
        return torch.log_softmax(logits, dim=-1)


def project(probs, shifts, gamma, terminal, atoms):
    """Project the law of shift + γ·Z (Z on `atoms` with `probs`, (B, N)) onto the atoms.
    Terminal rows put all mass at `shift`. Values outside [atoms[0], atoms[-1]] are clamped."""
    v_min, v_max, n = atoms[0], atoms[-1], len(atoms)
    delta = (v_max - v_min) / (n - 1)
    moved = shifts[:, None] + gamma * atoms[None, :] * (~terminal)[:, None]
    position = (moved.clamp(v_min, v_max) - v_min) / delta
    lower, upper = position.floor().long(), position.ceil().long()
    out = torch.zeros_like(probs)
    # mass splits between the two neighbouring atoms; a value exactly on an atom keeps it all
    out.scatter_add_(1, lower, probs * (upper.float() - position + (lower == upper).float()))
    out.scatter_add_(1, upper, probs * (position - lower.float()))
    return out


def project_naive(probs, shifts, gamma, terminal, atoms):
    """The same projection one element at a time (test reference)."""
    v_min, v_max, n = float(atoms[0]), float(atoms[-1]), len(atoms)
    delta = (v_max - v_min) / (n - 1)
    out = torch.zeros_like(probs)
    for i in range(probs.shape[0]):
        for j in range(n):
            z = float(shifts[i]) + (0.0 if terminal[i] else gamma * float(atoms[j]))
            b = (min(max(z, v_min), v_max) - v_min) / delta
            lo, hi = int(b // 1), int(-(-b // 1))
            if lo == hi:
                out[i, lo] += probs[i, j]
            else:
                out[i, lo] += probs[i, j] * (hi - b)
                out[i, hi] += probs[i, j] * (b - lo)
    return out


class C51Agent:
    def __init__(self, n_features, n_actions, gamma, low, high, n_atoms=51, hidden=128, lr=1e-3):
        self.gamma = gamma
        self.atoms = torch.linspace(low, high, n_atoms)
        self.net = C51Net(n_features, n_actions, n_atoms, hidden)
        self.target = C51Net(n_features, n_actions, n_atoms, hidden)
        self.target.load_state_dict(self.net.state_dict())
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=lr)

    @torch.no_grad()
    def mean_returns(self, states):
        return (self.net(states).exp() * self.atoms).sum(-1)

    @torch.no_grad()
    def distribution(self, states, actions):
        """(atoms, probs (B, N)) of the learned return law in standardised units."""
        probs = self.net(states).exp()[torch.arange(len(actions)), actions]
        return self.atoms, probs

    def loss(self, batch, next_actions):
        states, actions, shifts, terminal, next_states = batch
        with torch.no_grad():
            next_probs = self.target(next_states).exp()[torch.arange(len(next_actions)), next_actions]
            target = project(next_probs, shifts, self.gamma, terminal, self.atoms)
        log_probs = self.net(states)[torch.arange(len(actions)), actions]
        return -(target * log_probs).sum(-1).mean()

    @torch.no_grad()
    def greedy_next(self, next_states):
        return (self.target(next_states).exp() * self.atoms).sum(-1).argmax(1)

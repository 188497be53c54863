"""Environments (gymnasium FrozenLake-v1 4x4 slippery, CartPole-v1), their return ranges, and
the exact return distribution of a fixed FrozenLake policy by dynamic programming."""
from dataclasses import dataclass

import numpy as np

from bdiff.errors import BdiffError

ENVS = ("frozenlake", "cartpole")


@dataclass
class EnvSpec:
    name: str
    gym_id: str
    kwargs: dict
    gamma: float
    return_low: float    # known range of the discounted return, used to standardise it
    return_high: float
    task: str            # "evaluation": fixed policy, W1 to the exact law; "control": greedy learning
    threshold: float     # metric threshold for steps-to-threshold
    metric: str

    @property
    def center(self):
        return 0.5 * (self.return_low + self.return_high)

    @property
    def scale(self):
        return 0.5 * (self.return_high - self.return_low)


SPECS = {
    # W1 < 0.05 (5% of the return range): above both methods' representation floors
    # (Gaussian smoothing with sqrt(ε) = 0.025 in return units costs ≈ 0.02; 51 atoms over
    # [0, 1] are 0.02 apart), well below the W1 of an untrained model (≈ 0.5).
    "frozenlake": EnvSpec("frozenlake", "FrozenLake-v1", {"map_name": "4x4", "is_slippery": True},
                          0.95, 0.0, 1.0, "evaluation", 0.05, "mean_w1"),
    "cartpole": EnvSpec("cartpole", "CartPole-v1", {}, 0.99, 0.0, 100.0, "control", 475.0,
                        "mean_return"),
}


def get_spec(name):
    if name not in SPECS:
        raise BdiffError(f"unknown environment {name!r}; choose {', '.join(ENVS)}")
    return SPECS[name]


def make_env(spec, seed=None):
    try:
        import gymnasium as gym
    except ImportError:
        raise BdiffError("the RL environments need gymnasium: pip install -e '.[rl]'") from None
    env = gym.make(spec.gym_id, **spec.kwargs)
    env.reset(seed=seed)
    env.action_space.seed(seed)
    return env


def features(spec, observations):
    """Network input: one-hot states for FrozenLake, raw observations for CartPole."""
    obs = np.asarray(observations)
    if spec.name == "frozenlake":
        return np.eye(16, dtype=np.float32)[obs.astype(int)]
    return obs.astype(np.float32)


def frozenlake_transitions():
    """P[s][a] = [(prob, next_state, reward, terminated)] of the 4x4 slippery lake."""
    return make_env(SPECS["frozenlake"]).unwrapped.P


def optimal_policy(P, gamma, sweeps=2000):
    """Greedy policy of value iteration: the fixed policy whose return law we evaluate."""
    values = np.zeros(len(P))
    for _ in range(sweeps):
        q = np.array([[sum(p * (r + gamma * values[n] * (not d)) for p, n, r, d in P[s][a])
                       for a in range(len(P[s]))] for s in range(len(P))])
        values = q.max(1)
    return q.argmax(1)


def exact_return_distribution(P, policy, gamma, horizon=2000):
    """Atoms and probabilities of the discounted return from each state under `policy`.

    A FrozenLake return is γ^(k-1) if the goal is first reached at step k, else 0 (a hole, or
    never). Dynamic programming over the number of steps; the mass not absorbed after
    `horizon` steps is returned as the stated error (it is counted at return 0).
    """
    n = len(P)
    to_goal = np.zeros((n, n))     # one-step probabilities of reaching the goal
    move = np.zeros((n, n))        # one-step probabilities among non-terminal states
    for s in range(n):
        for p, nxt, reward, done in P[s][policy[s]]:
            if done and reward > 0:
                to_goal[s, nxt] += p
            elif not done:
                move[s, nxt] += p
    alive = np.eye(n)
    atoms, probs = [], []
    for k in range(1, horizon + 1):
        probs.append(alive @ to_goal.sum(1))
        atoms.append(gamma ** (k - 1))
        alive = alive @ move
    probs = np.stack(probs, 1)  # (state, k)
    leftover = alive.sum(1)
    zero_mass = 1 - probs.sum(1)
    return np.array(atoms), probs, zero_mass, float(leftover.max())


def reachable_states(P, policy, start=0):
    """Non-terminal states visited by `policy` from the start (where W1 is tracked)."""
    seen, frontier = {start}, [start]
    while frontier:
        s = frontier.pop()
        for _, nxt, _, done in P[s][policy[s]]:
            if not done and nxt not in seen:
                seen.add(nxt)
                frontier.append(nxt)
    return sorted(seen)


def discrete_cdf(grid, atoms, probs):
    return (grid[:, None] >= atoms[None, :]).astype(float) @ probs


def w1_to_discrete(grid, density, atoms, probs):
    """W1 = ∫ |F_model - F_exact| between a density on a grid and a discrete law."""
    cell = grid[1] - grid[0]
    model_cdf = np.cumsum(np.clip(density, 0, None)) * cell
    model_cdf /= max(model_cdf[-1], 1e-12)
    return float(np.abs(model_cdf - discrete_cdf(grid, atoms, probs)).sum() * cell)


def w1_between_discrete(grid, atoms_a, probs_a, atoms_b, probs_b):
    cell = grid[1] - grid[0]
    return float(np.abs(discrete_cdf(grid, atoms_a, probs_a) - discrete_cdf(grid, atoms_b, probs_b)).sum()
                 * cell)

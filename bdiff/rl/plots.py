"""Learning curves (mean and spread over seeds) and learned return densities beside the truth."""
import numpy as np
import torch

from bdiff.plots import _pyplot
from bdiff.rl.c51 import C51Agent
from bdiff.rl.envs import features


def plot_curves(path, results):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for agent, color in (("bellman", "tab:blue"), ("c51", "tab:orange")):
        runs = [r for r in results if r["agent"] == agent]
        if not runs:
            continue
        steps = np.array([s for s, _ in runs[0]["curve"]])
        values = np.array([[v for _, v in r["curve"]][:len(steps)] for r in runs])
        mean, low, high = values.mean(0), values.min(0), values.max(0)
        label = "Bellman Diffusion" if agent == "bellman" else "C51"
        ax.plot(steps, mean, color=color, label=f"{label} (mean of {len(runs)})")
        ax.fill_between(steps, low, high, color=color, alpha=0.2)
    metric = results[0]["metric"]
    ax.set_xlabel("environment steps")
    ax.set_ylabel("mean W1 to the exact return law" if metric == "mean_w1" else "average return")
    ax.set_title(results[0]["env"])
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_frozenlake_densities(path, results, states=(0, 4, 8, 14)):
    """Seed-0 learned return laws of both agents beside the exact atoms, a few states."""
    plt = _pyplot()
    truth = results[0]["truth"]
    states = [s for s in states if s in truth.states]
    fig, axes = plt.subplots(1, len(states), figsize=(4 * len(states), 3.4), squeeze=False)
    spec = truth.spec
    for ax, state in zip(axes[0], states):
        atoms, probs = truth.exact(state)
        shown = probs > 1e-3
        ax.vlines(atoms[shown], 0, probs[shown] * 20, color="black", lw=1, label="exact (probability x 20)")
        for r in results:
            if r["seed"] != 0:
                continue
            feats = torch.from_numpy(features(spec, [state]))
            action = torch.as_tensor([truth.policy[state]])
            if isinstance(r["agent_object"], C51Agent):
                support, probs = r["agent_object"].distribution(feats, action)
                z = spec.center + spec.scale * support.numpy()
                ax.plot(z, probs[0].numpy() / (z[1] - z[0]), drawstyle="steps-mid", color="tab:orange",
                        label="C51")
            else:
                grid, density = r["agent_object"].smoothed_density(feats, action)
                z = spec.center + spec.scale * grid.numpy()
                ax.plot(z, density[0].numpy() / spec.scale, color="tab:blue", label="Bellman Diffusion s(z)")
        ax.set_xlim(-0.1, 1.1)
        ax.set_title(f"state {state}")
        ax.set_xlabel("return")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

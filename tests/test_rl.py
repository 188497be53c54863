"""Distributional RL: Bellman targets by hand, the C51 projection against a loop, the exact
FrozenLake return law against Monte Carlo, a short learning run, and the CLI."""
import json

import numpy as np
import pytest
import torch

pytest.importorskip("gymnasium")

from bdiff.rl.bellman import (BellmanAgent, bellman_targets, gaussian, mixture_fields,  # noqa: E402
                              mixture_targets, next_points)
from bdiff.rl.c51 import project, project_naive  # noqa: E402
from bdiff.rl.envs import (SPECS, exact_return_distribution, frozenlake_transitions,  # noqa: E402
                           make_env, optimal_policy, w1_between_discrete)


def test_bellman_targets_by_hand():
    u = torch.tensor([[0.3, -0.2]])
    # target fields constant over the quadrature nodes: the node average is that constant
    next_s = torch.tensor([[2.0, 4.0]])[..., None].expand(1, 2, 5)
    next_g = torch.tensor([[1.0, -3.0]])[..., None].expand(1, 2, 5)
    shifts, gamma, eps = torch.tensor([0.1]), 0.5, 0.04
    s, g = bellman_targets(next_s, next_g, u, shifts, gamma, torch.tensor([False]), eps)
    # p(u) = (1/γ) p'((u - r)/γ) and ∇p(u) = (1/γ²) ∇p'((u - r)/γ): both fields scale linearly
    torch.testing.assert_close(s, torch.tensor([[4.0, 8.0]]))
    torch.testing.assert_close(g, torch.tensor([[4.0, -12.0]]))
    s, g = bellman_targets(next_s, next_g, u, shifts, gamma, torch.tensor([True]), eps)
    diff = u - 0.1
    expected = torch.exp(-diff**2 / (2 * eps)) / np.sqrt(2 * np.pi * eps)
    torch.testing.assert_close(s, expected)
    torch.testing.assert_close(g, -diff / eps * expected)


def test_linearity_mixture_of_successors():
    """The target of a mixture of successors is the mixture of their targets (no projection)."""
    u = torch.linspace(-1, 1, 9)[None]
    a, b = torch.rand(1, 9, 5), torch.rand(1, 9, 5)
    args = (u, torch.tensor([0.2]), 0.9, torch.tensor([False]), 0.01)
    mix, _ = bellman_targets(0.3 * a + 0.7 * b, 0.3 * a + 0.7 * b, *args)
    torch.testing.assert_close(mix, 0.3 * bellman_targets(a, a, *args)[0] + 0.7 * bellman_targets(b, b, *args)[0])


@pytest.mark.parametrize("gamma", [0.9, 0.95, 0.99])
def test_smoothed_target_keeps_the_width(gamma):
    """A successor law δ_m smoothed to N(m, ε) must give the target N(shift + γm, ε), width ε,
    not γ²ε: the node average over v ~ N(0, (1 - γ²)ε) restores the width scaling removes."""
    eps, m = 0.05**2, 0.4
    u = torch.linspace(-0.5, 1.0, 301)[None]
    shifts = torch.tensor([-0.1])
    x = next_points(u, shifts, gamma, eps)
    next_s, next_g = gaussian(x - m, eps), -(x - m) / eps * gaussian(x - m, eps)
    s, g = bellman_targets(next_s, next_g, u, shifts, gamma, torch.tensor([False]), eps)
    centre = u - shifts - gamma * m
    expected = gaussian(centre, eps)
    assert (s - expected).abs().max() < 1e-3 * expected.max()
    assert (g + centre / eps * expected).abs().max() < 1e-3 * (centre / eps * expected).abs().max()


@pytest.mark.parametrize("gamma", [0.9, 0.99])
def test_mixture_targets_match_the_quadrature_targets(gamma):
    """The agent's closed-form targets equal the general targets of docs/design.md §1.4 computed from the
    successor's fields at the quadrature nodes, terminal rows included."""
    eps, centres = 0.05**2, torch.linspace(-1, 1, 64)
    generator = torch.Generator().manual_seed(1)
    weights = torch.softmax(3 * torch.randn(4, 64, generator=generator), 1)
    u = torch.linspace(-1.2, 1.2, 97).repeat(4, 1)
    shifts, terminal = torch.tensor([0.0, 0.05, -0.3, 0.4]), torch.tensor([False, False, True, False])
    x = next_points(u, shifts, gamma, eps)
    next_s, next_g = mixture_fields(weights, centres, x.flatten(1), eps)
    general = bellman_targets(next_s.view(x.shape), next_g.view(x.shape), u, shifts, gamma, terminal, eps)
    closed = mixture_targets(weights, centres, u, shifts, gamma, terminal, eps)
    for a, b in zip(closed, general):
        assert (a - b).abs().max() < 2e-3 * b.abs().max()


def test_learned_law_weights_outcomes_by_their_probability():
    """One state, terminal outcomes u = -0.5 (p = 0.8) and +0.5 (p = 0.2): the fitted density
    must hold mass 0.2 above 0. The regression weighs each outcome by its probability only if
    where it is queried does not depend on the outcome (0.187 measured here)."""
    torch.manual_seed(0)
    agent = BellmanAgent(1, 1, 0.9, hidden=32, lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    ones, zeros = torch.ones(64, 1), torch.zeros(64, dtype=torch.long)
    for _ in range(1000):
        shifts = torch.where(torch.rand(64, generator=generator) < 0.8, -0.5, 0.5)
        loss = agent.loss((ones, zeros, shifts, torch.ones(64, dtype=torch.bool), ones), zeros)
        agent.optimizer.zero_grad()
        loss.backward()
        agent.optimizer.step()
        agent.target.load_state_dict(agent.net.state_dict())
    grid, density = agent.distribution(torch.ones(1, 1), torch.zeros(1, dtype=torch.long))
    assert float(density[0][grid > 0].sum() / density[0].sum()) == pytest.approx(0.2, abs=0.03)


def test_mixture_fields_and_quadrature_mean():
    """g is ∂s/∂u, and the precomputed quadrature mean equals the mean of s on the grid."""
    torch.manual_seed(0)
    agent = BellmanAgent(3, 2, 0.9, hidden=16)
    states = torch.randn(5, 3)
    actions = torch.tensor([0, 1, 1, 0, 1])
    u = torch.linspace(-1.1, 1.1, 37).repeat(5, 1).requires_grad_()
    s, g = agent.net.fields(agent.net(states, actions), u)
    assert torch.allclose(torch.autograd.grad(s.sum(), u)[0], g, atol=1e-4 * float(g.detach().abs().max()))
    grid = agent.grid.expand(5, -1)
    with torch.no_grad():
        for action in (0, 1):
            density, _ = agent.net.fields(agent.net(states, torch.full((5,), action)), grid)
            mean = (density * grid).sum(1) / density.sum(1)
            assert torch.allclose(agent.mean_returns(states)[:, action], mean, atol=1e-5)


def test_gaussian_integrates_to_one():
    u = torch.linspace(-1, 1, 20001, dtype=torch.float64)
    assert float(gaussian(u, 0.01).sum() * (u[1] - u[0])) == pytest.approx(1.0, abs=1e-6)


def test_c51_projection_matches_loop():
    atoms = torch.linspace(-1.0, 1.0, 11)
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(6, 11, generator=g), 1)
    # an exact atom hit (0.2 + 0.8·0.0 with γ = 0.8 lands on atoms), values beyond both ends, terminals
    shifts = torch.tensor([0.2, 0.0, 0.9, -0.9, 0.35, 5.0])
    terminal = torch.tensor([False, False, False, False, True, True])
    fast = project(probs, shifts, 0.8, terminal, atoms)
    torch.testing.assert_close(fast, project_naive(probs, shifts, 0.8, terminal, atoms))
    torch.testing.assert_close(fast.sum(1), torch.ones(6))
    assert fast[5, -1] == pytest.approx(1.0)  # terminal value beyond the support clamps to the end


def test_exact_frozenlake_law_matches_monte_carlo():
    spec = SPECS["frozenlake"]
    P = frozenlake_transitions()
    policy = optimal_policy(P, spec.gamma, sweeps=500)
    atoms, probs, zero_mass, error = exact_return_distribution(P, policy, spec.gamma)
    assert error < 1e-12 and probs[0].sum() + zero_mass[0] == pytest.approx(1.0)
    env = make_env(spec, seed=0).unwrapped  # no time limit: the exact law has none either
    rng = np.random.default_rng(0)
    returns = []
    for _ in range(3000):
        state, _ = env.reset(seed=int(rng.integers(2**31)))
        total, discount = 0.0, 1.0
        for _ in range(2000):
            state, reward, done, _, _ = env.step(int(policy[state]))
            total += discount * reward
            discount *= spec.gamma
            if done:
                break
        returns.append(total)
    returns = np.array(returns)
    grid = np.linspace(-0.1, 1.1, 2401)
    mc_atoms, mc_counts = np.unique(returns, return_counts=True)
    w1 = w1_between_discrete(grid, mc_atoms, mc_counts / len(returns),
                             np.concatenate([atoms, [0.0]]), np.concatenate([probs[0], [zero_mass[0]]]))
    assert w1 < 0.01  # Monte Carlo error of 3000 episodes is about 0.005
    assert returns.mean() == pytest.approx((atoms * probs[0]).sum(), abs=0.01)


@pytest.mark.parametrize("agent", ["bellman", "c51"])
def test_short_policy_evaluation_run_learns(agent):
    from bdiff.rl.runner import RLConfig, train
    torch.set_num_threads(1)
    result = train(RLConfig(env="frozenlake", agent=agent, steps=1500, eval_every=500))
    first, last = result["curve"][0][1], result["curve"][-1][1]
    assert last < 0.12  # an untrained (flat) model is about 0.45 away from the exact law
    assert np.isfinite(first)


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_rl_cli_compare(tmp_path, jobs):
    from typer.testing import CliRunner

    from bdiff.cli.main import app
    out = tmp_path / "rl"
    threads = torch.get_num_threads()
    result = CliRunner().invoke(app, ["rl", "frozenlake", "--compare", "--seeds", "1", "--steps", "700",
                                      "--eval-every", "350", "--jobs", jobs, "--out", str(out),
                                      "--json", str(tmp_path / "rl.json")])
    assert result.exit_code == 0, result.stderr
    assert torch.get_num_threads() == threads  # one thread per run, restored afterwards
    records = json.loads((tmp_path / "rl.json").read_text())
    runs = [r for r in records if not r.get("summary")]
    assert {r["agent"] for r in runs} == {"bellman", "c51"}
    for r in runs:
        assert {"env", "agent", "seed", "steps_to_threshold", "final_metric", "metric"} <= set(r)
    assert records[-1]["summary"] and "ratio" in records[-1]
    assert "bellman seed 0: step 700" in result.stderr  # from worker processes too
    for name in ["frozenlake_curves.csv", "frozenlake_curves.png", "frozenlake_densities.png"]:
        assert (out / name).stat().st_size > 0


def test_rl_cli_bad_input(tmp_path):
    from typer.testing import CliRunner

    from bdiff.cli.main import app
    for args, message in [(["mountaincar"], "unknown environment"), (["frozenlake", "--agent", "dqn"], "unknown agent"),
                          (["frozenlake", "--steps", "0"], "positive"), (["cartpole", "--jobs", "0"], "positive")]:
        result = CliRunner().invoke(app, ["rl", *args, "--out", str(tmp_path)])
        assert result.exit_code == 2 and message in result.stderr


def test_rl_cli_without_gymnasium_says_what_to_install(tmp_path, monkeypatch):
    import sys

    from typer.testing import CliRunner

    from bdiff.cli.main import app
    monkeypatch.setitem(sys.modules, "gymnasium", None)  # import now raises ImportError
    result = CliRunner().invoke(app, ["rl", "frozenlake", "--steps", "10", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "pip install" in result.stderr and "[rl]" in result.stderr


def test_rl_jobs_stop_with_their_parent(tmp_path):
    """A kill of `bdiff rl --jobs 2` must not leave its worker processes training on."""
    import os
    import signal
    import subprocess
    import sys
    import time
    command = [sys.executable, "-c", "from bdiff.cli.main import run; run()", "rl", "frozenlake",
               "--compare", "--steps", "100000", "--eval-every", "100", "--jobs", "2", "--out", str(tmp_path)]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        for line in process.stderr:  # wait until the workers are training
            if "step 100 " in line:
                break
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 128 + signal.SIGTERM
        deadline = time.time() + 10
        while time.time() < deadline:
            sessions = subprocess.run(["ps", "-eo", "sid="], capture_output=True, text=True).stdout.split()
            if str(process.pid) not in sessions:
                break
            time.sleep(0.2)
        assert str(process.pid) not in sessions, "worker processes outlived bdiff rl"
    finally:
        try:  # whatever is left of the run's process group
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_summary_counts_missed_runs_as_the_budget():
    from bdiff.rl.runner import summary
    rows = [{"agent": "bellman", "steps_to_threshold": None, "final_metric": 0.2, "budget": 4000}] * 3
    rows += [{"agent": "c51", "steps_to_threshold": s, "final_metric": 0.02, "budget": 4000}
             for s in (1500, 2000, 2500)]
    out = summary("frozenlake", rows)
    assert out["bellman_median_steps"] == 4001 and out["bellman_reached"] == 0
    assert out["c51_median_steps"] == 2000
    assert out["ratio"] == pytest.approx(2000 / 4001) and out["ratio_is_bound"]

"""Model contract: shapes, gradients, checkpoint round trip, resume, interruption, bad checkpoints."""
import dataclasses
import json
import math
import os
import shutil
import signal

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from bdiff.checkpoint import read_checkpoint
from bdiff.data import TAIL_KEPT_BELOW, Standardizer, tail_index
from bdiff.errors import BdiffError
from bdiff.fields import FieldModel
from bdiff.losses import (TRIM_SHARE, ValidationSet, bandwidth, cluster_balanced_weights, data_clusters,
                          divergence, draw_queries, log_normaliser, log_regression, smoothed_data_queries,
                          smoothed_targets)
from bdiff.model import TrainedModel
from bdiff.sampler import support_floor
from bdiff.trainer import MIN_QUERY_PASSES, FitConfig, Trainer, column_coding

from conftest import TINY


@pytest.mark.parametrize("arch", ["shared", "separate"])
def test_field_model_shapes_and_gradients(arch):
    net = FieldModel(3, width=16, depth=2, arch=arch)
    x = torch.randn(7, 3, requires_grad=True)
    s, g = net(x)
    assert s.shape == (7,) and g.shape == (7, 3)
    (s.sum() + g.sum()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_divergence_exact_and_sliced_on_a_linear_field():
    a = torch.randn(4, 4)
    x = torch.randn(4000, 4, requires_grad=True)
    g = x @ a.T  # ∇·g = trace(a) everywhere
    exact = divergence(g, x)
    torch.testing.assert_close(exact, torch.full((4000,), a.trace().item()), rtol=1e-5, atol=1e-5)
    sliced = divergence(g, x, torch.Generator().manual_seed(0), sliced=True)
    assert sliced.mean().item() == pytest.approx(a.trace().item(), abs=0.25 * a.abs().sum().item() / 4)


def test_bandwidth_rules_shrink_with_n():
    assert bandwidth(10_000, 2) < bandwidth(100, 2)
    assert bandwidth(10_000, 2, "scott") == pytest.approx(bandwidth(10_000, 2))  # equal at D = 2
    assert bandwidth(10_000, 5, "scott") > bandwidth(10_000, 5)


def test_heldout_bandwidth_holds_out_a_bounded_number_of_rows(monkeypatch):
    """A fifth of 200 000 rows held out against the other 160 000 took 147 s of a 3-minute
    preparation; the held-out mean needs no more than HELDOUT_MAX_ROWS rows. Up to 50 000 rows
    (every benchmark) the split is the fifth it was."""
    from bdiff import losses
    asked = []
    real = losses.field_matching

    def spy(x, y, *args, **kwargs):
        asked.append((len(x), len(y)))
        return real(x, y, *args, **kwargs)

    monkeypatch.setattr(losses, "field_matching", spy)
    for rows, held in ((60_001, losses.HELDOUT_MAX_ROWS), (5000, 1000)):
        asked.clear()
        refs = torch.randn(rows, 1, generator=torch.Generator().manual_seed(0))
        eps, _ = losses.heldout_bandwidth(refs, torch.Generator().manual_seed(1))
        assert set(asked) == {(held, rows - held)} and 0.001 < eps < 0.5
    assert losses.HELDOUT_MAX_ROWS == 10_000  # a fifth of the benchmarks' largest tables


def test_targets_and_queries(mixture_small):
    refs = torch.from_numpy(mixture_small)
    gen = torch.Generator().manual_seed(0)
    queries, exclude = draw_queries(refs, 100, 0.05, (0.5, 0.3, 0.2), 2.0, 1.5, gen)
    assert queries.shape == (100, 2) and (exclude[:80] >= 0).all() and (exclude[80:] == -1).all()
    assert torch.equal(queries[:50], refs[exclude[:50]])
    log_c = log_normaliser(refs, 0.05, gen)
    s, g = smoothed_targets(queries, refs, 0.05, log_c, exclude)
    assert (s >= 0).all() and torch.isfinite(g).all()
    assert 0.1 < s[:50].median().item() < 10  # log C puts data-point targets near 1


def _tiny_trainer(data, **overrides):
    return Trainer(data, FitConfig(**dict(TINY, **overrides)), "mixture")


def test_checkpoint_round_trip_gives_identical_fields(tmp_path, mixture_small):
    trainer = _tiny_trainer(mixture_small, steps=15)
    trainer.run(str(tmp_path / "m.safetensors"))
    model = TrainedModel.load(tmp_path / "m.safetensors")
    x = torch.randn(64, 2)
    assert model.eps == trainer.eps
    s1, g1 = trainer.ema.fields_batched(x, eps=trainer.eps)
    s2, g2 = model.fields(x)
    assert torch.equal(s1, s2) and torch.equal(g1, g2)
    _, meta = read_checkpoint(tmp_path / "m.safetensors")
    for key in ["version", "config", "eps", "log_c", "standardizer", "dim", "fingerprint", "step"]:
        assert key in meta
    tensors = load_file(str(tmp_path / "m.safetensors"))
    assert any(k.startswith("optim.") for k in tensors) and "rng" in tensors
    assert any(k.startswith("ema.") for k in tensors)


def test_resume_from_periodic_checkpoint_equals_uninterrupted(tmp_path, mixture_small):
    path = tmp_path / "whole.safetensors"

    def keep_step_20(step, losses, elapsed):
        if step == 21:  # the periodic checkpoint of step 20 is on disk now
            shutil.copy(path, tmp_path / "at20.safetensors")

    whole = _tiny_trainer(mixture_small, steps=40)
    whole.run(str(path), keep_step_20)
    resumed = _tiny_trainer(mixture_small, steps=40)
    resumed.restore(tmp_path / "at20.safetensors")
    assert resumed.step == 20
    resumed.run(str(tmp_path / "at20.safetensors"))
    for a, b in zip(whole.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(whole.ema.parameters(), resumed.ema.parameters()):
        assert torch.equal(a, b)


def test_interrupt_leaves_a_resumable_checkpoint(tmp_path, mixture_small):
    path = str(tmp_path / "int.safetensors")
    whole = _tiny_trainer(mixture_small, steps=30)
    whole.run(None)
    stopped = _tiny_trainer(mixture_small, steps=30)

    def ctrl_c(step, losses, elapsed):
        if step == 12:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        stopped.run(path, ctrl_c)
    resumed = _tiny_trainer(mixture_small, steps=30)
    resumed.restore(path)
    assert resumed.step == 12
    resumed.run(path)
    for a, b in zip(whole.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)


def test_resume_refuses_other_data(tmp_path, mixture_small):
    _tiny_trainer(mixture_small, steps=5).run(str(tmp_path / "m.safetensors"))
    other = _tiny_trainer(mixture_small[:1000], steps=10)
    with pytest.raises(BdiffError, match="different data"):
        other.restore(tmp_path / "m.safetensors")


def test_bad_config_values(mixture_small):
    for bad in [dict(eps=0.0), dict(eps=1e9), dict(eps=float("nan")), dict(lr=-1.0),
                dict(grad_loss="nope"), dict(steps=0), dict(device="tpu"), dict(query_balance=-0.5),
                dict(query_balance=float("nan")), dict(query_balance=2.0), dict(power="yes")]:
        with pytest.raises(BdiffError):
            _tiny_trainer(mixture_small, **bad)


def test_bad_checkpoints(tmp_path, tiny_checkpoint):
    raw = tiny_checkpoint.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 100)
    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    tensors, meta = read_checkpoint(tiny_checkpoint)
    save_file(tensors, str(tmp_path / "future.safetensors"),
              metadata={"bdiff": json.dumps(dict(meta, format_version=99))})
    cases = {"trunc": "corrupt or truncated", "junk": "corrupt or truncated",
             "foreign": "not a bdiff checkpoint", "future": "format 99", "missing": "no checkpoint"}
    for name, message in cases.items():
        with pytest.raises(BdiffError, match=message):
            TrainedModel.load(tmp_path / f"{name}.safetensors")


def test_training_stops_when_the_validation_loss_stalls_and_keeps_the_best_weights():
    """The field loss on the rows kept out decides: no 1 % fall in `patience` checks stops
    training before the cap, and the EMA weights of the best check are the ones kept."""
    values = np.random.default_rng(0).normal(size=(1000, 2)).astype(np.float32)
    trainer = Trainer(values, FitConfig(steps=3000, width=32, depth=2, batch_size=256, eval_every=50,
                                        patience=3))
    assert len(trainer.val_rows) == 100 and len(trainer.refs) == 900
    trainer.run()
    assert trainer.stopped_early and trainer.step < 3000
    assert trainer.validation.losses(trainer.ema)[-1] == pytest.approx(trainer.best_val, rel=1e-6)
    assert trainer.best_val == min(loss for _, loss in trainer.val_history)


def test_a_small_table_trains_to_the_cap_whatever_its_few_validation_rows_say():
    """Under 100 validation rows the loss is too noisy to stop on: diabetes (35 rows) stopped
    at 1000-1100 steps on two seeds of four, held-out log-likelihood 21.5 against 25.6-26.1 at
    3000 (NOTES.md). The rows still choose ε and the density."""
    values = np.random.default_rng(0).normal(size=(300, 2)).astype(np.float32)
    trainer = Trainer(values, FitConfig(steps=400, width=8, depth=1, eval_every=50, patience=2))
    trainer.validation = _ScriptedValidation([10.0] * 8)  # stalled from the first check
    trainer.run()
    assert trainer.step == 400 and not trainer.stopped_early
    assert trainer.flow_eps is not None or trainer.flow_scores  # the density was still chosen
    # the flow density's top level: the rows' Gaussian mixture, stored for the checkpoint
    assert trainer.meta()["flow_base"] is not None
    assert sum(trainer.meta()["flow_base"]["weights"]) == pytest.approx(1.0)


def test_a_stall_seen_at_the_last_step_is_not_an_early_stop():
    """The check at the step cap may find the loss stalled: training ended at the cap, and fit
    must not say it stopped early (it said "stopped at step 6000" on digits)."""
    values = np.random.default_rng(0).normal(size=(1000, 2)).astype(np.float32)
    trainer = Trainer(values, FitConfig(steps=300, width=8, depth=1, eval_every=100, patience=2))
    trainer.validation = _ScriptedValidation([10.0] * 3)  # stalled: the stop signal comes at 300
    trainer.run()
    assert trainer.step == 300 and not trainer.stopped_early


def test_a_large_data_set_draws_on_every_row_before_it_may_stop():
    """Early stopping waits until the queries have drawn on each training row MIN_QUERY_PASSES
    times on average: the validation loss follows the large modes, and on 50 000 rows of two
    random 2-D mixtures it stopped at 1500-1700 steps with the 2 % modes still too wide (far
    share 0.34-0.40 % under SMC; 0.15-0.20 % trained to 3000 steps, NOTES.md)."""
    values = np.random.default_rng(0).normal(size=(1200, 2)).astype(np.float32)
    trainer = Trainer(values, FitConfig(steps=400, width=8, depth=1, batch_size=128, eval_every=10, patience=2))
    # best at the first check, stalled after it: those early weights are the large modes' choice
    trainer.validation = _ScriptedValidation([1.0] + [10.0] * 39)
    trainer.run()
    passes_at = math.ceil(MIN_QUERY_PASSES * len(trainer.refs) / 128)
    assert 40 < passes_at < 400
    assert trainer.stopped_early and trainer.step == 10 * math.ceil(passes_at / 10)
    assert trainer.best_val == 10.0  # the weights kept are from the pass point on


class _ScriptedValidation:
    """Validation losses from a script: a number per check, or a tuple (one per judge)."""
    def __init__(self, losses):
        self.script = iter(losses)

    def losses(self, model, id_weight=1.0):
        value = next(self.script)
        return list(value) if isinstance(value, tuple) else [value]


def test_stopping_judges_progress_against_the_fall_so_far_not_the_loss_floor():
    """A validation loss on a high floor (the score targets' noise at the smallest levels) that
    still falls steadily must not stop training; one whose fall has flattened must. The old
    rule (a 1 % fall of the loss itself) stopped the first after 5 checks."""
    values = np.random.default_rng(0).normal(size=(200, 2)).astype(np.float32)
    trainer = Trainer(values, FitConfig(steps=10, width=8, depth=1, patience=5))
    trainer.step = math.ceil(MIN_QUERY_PASSES * len(trainer.refs) / trainer.cfg.batch_size)  # may stop
    trainer.validation = _ScriptedValidation([200.0] + [100.0 - 0.5 * k for k in range(20)])
    assert not any(trainer.validate() for _ in range(21))
    trainer = Trainer(values, FitConfig(steps=10, width=8, depth=1, patience=5))
    trainer.step = math.ceil(MIN_QUERY_PASSES * len(trainer.refs) / trainer.cfg.batch_size)
    trainer.validation = _ScriptedValidation([200.0, 100.0] + [99.9 - 0.01 * k for k in range(10)])
    assert any(trainer.validate() for _ in range(12))


def test_a_wide_table_stops_only_when_the_plain_and_the_cluster_mean_losses_have_both_stalled():
    """On unbalanced5d's draws 14 and 15 the clusters' mean stalled first (1600 steps on draw 15,
    where the plain mean stalled at 2800) and the shorter fit read worse under SMC (0.0100
    against 0.0078); on draw 13 it was the plain mean (1600 against 2800; 0.0199 against
    0.0114). Stopping needs both; the weights kept are the clusters' mean's best (NOTES.md)."""
    values = np.random.default_rng(0).normal(size=(200, 2)).astype(np.float32)
    falling = [200.0] + [100.0 - 0.5 * k for k in range(20)]
    flat = [200.0, 100.0] + [99.9 - 0.01 * k for k in range(19)]

    def stops(plain, balanced):
        trainer = Trainer(values, FitConfig(steps=10, width=8, depth=1, patience=5))
        trainer.step = math.ceil(MIN_QUERY_PASSES * len(trainer.refs) / trainer.cfg.batch_size)
        trainer.validation = _ScriptedValidation(list(zip(plain, balanced)))
        stopped = any(trainer.validate() for _ in range(len(plain)))
        return stopped, trainer.best_val
    assert not stops(flat, falling)[0] and not stops(falling, flat)[0]
    stopped, best = stops([v + 7 for v in flat], flat)  # both stall from the third check
    assert stopped and best == pytest.approx(min(flat[:7]))  # stop at the seventh, patience 5


def _far_cluster(rows, dim, small_share, seed=0):
    rng = np.random.default_rng(seed)
    small = rng.random(rows) < small_share
    values = rng.normal(size=(rows, dim)) * np.where(small, 0.2, 1.0)[:, None]
    values[small, 0] += 8.0
    return values.astype(np.float32)


def test_validation_of_a_wide_table_weighs_each_cluster_alike():
    """From 3 columns the stopping loss is the mean of each cluster's own validation loss: the
    plain mean follows the large modes, and on a 5-D mixture with 8 % and 2 % modes it stopped
    at 1600 steps while those modes still learned (mode-weight error 0.020 under SMC, 0.012 at
    3000 steps; NOTES.md). 1-D and 2-D tables keep the plain mean (a 2-D law's small modes read
    the same at 1600 and 3000 steps, and the fit-time budget is 2-D's)."""
    values = _far_cluster(3000, 3, 0.05)
    trainer = Trainer(values, FitConfig(steps=10, width=8, depth=1))
    weights = trainer.validation.row_weights
    small = trainer.val_rows[:len(weights), 0] > 2.5  # standardised, the small cluster sits at ~3.8
    assert 0 < small.sum() < 0.15 * len(weights)
    assert weights[small].sum().item() == pytest.approx(weights[~small].sum().item(), rel=1e-6)
    flat = _far_cluster(3000, 2, 0.05)
    assert Trainer(flat, FitConfig(steps=10, width=8, depth=1)).validation.row_weights is None


def test_a_weighted_validation_loss_is_the_mean_of_the_groups_losses(mixture_small):
    rows = torch.from_numpy(mixture_small[:300])
    refs, held = rows[:240], rows[240:]
    group = (held[:, 0] > 0).double()
    weights = torch.where(group > 0, 1 / group.sum(), 1 / (1 - group).sum())
    levels = (1e-3, 2.0)
    validation = ValidationSet(held, refs, 0.05, 0.0, levels, torch.Generator().manual_seed(0), row_weights=weights)
    model = FieldModel(2, 16, 2, "separate", "log", levels)
    per_group = []
    for member in (group > 0, group == 0):
        queries = member.repeat(len(validation.queries) // len(held))
        per_group.append(log_regression(model, validation.queries[queries], validation.level_eps[queries],
                                        validation.log_s_hat[queries], validation.score[queries], 1.0,
                                        validation.scalar_from)[0].item())
    assert validation.losses(model)[-1] == pytest.approx(sum(per_group) / 2, rel=1e-5)
    plain = ValidationSet(held, refs, 0.05, 0.0, levels, torch.Generator().manual_seed(0))
    assert plain.losses(model)[-1] != pytest.approx(validation.losses(model)[-1], rel=1e-3)


def test_the_plain_validation_judge_drops_the_largest_percent_of_log_s_errors(mixture_small):
    """A few held-out rows in a sparse tail can carry log s errors of several nats that grow while
    the samples still improve: on a 10 000-row banana the plain mean rose from 0.67 to 5.03 and
    stopped training at 900 steps with a far share of 0.25 % (0.12 % at 1200 steps; NOTES.md).
    The plain judge leaves out the largest 1 % of the squared log s errors; the clusters'
    judge keeps every row (its small clusters are what it watches)."""
    rows = torch.from_numpy(mixture_small[:300])
    refs, held = rows[:240], rows[240:]
    levels = (1e-3, 2.0)
    validation = ValidationSet(held, refs, 0.05, 0.0, levels, torch.Generator().manual_seed(0))
    model = FieldModel(2, 16, 2, "separate", "log", levels).requires_grad_(False)
    log_s, score = model.raw(validation.queries, validation.level_eps)
    kept = validation.level_eps >= validation.scalar_from
    errors = (log_s - validation.log_s_hat)[kept].double().pow(2).sort().values
    trimmed = errors[:len(errors) - int(TRIM_SHARE * len(errors))].mean()
    score_part = (validation.level_eps * (score - validation.score).pow(2).sum(1)).double().mean()
    assert TRIM_SHARE == 0.01
    assert validation.losses(model)[0] == pytest.approx(float(score_part + trimmed), rel=1e-5)

    class OffInTheTail:  # the model, with log s 30 nats off on fewer than 1 % of the queries
        param, levels = model.param, model.levels

        def raw(self, queries, eps):
            log_s, score = model.raw(queries, eps)
            shift = torch.zeros_like(log_s)
            shift[kept.nonzero()[:int(TRIM_SHARE * kept.sum())]] = 30.0
            return log_s + shift, score

    assert validation.losses(OffInTheTail())[0] == pytest.approx(validation.losses(model)[0], rel=0.05)
    weights = torch.ones(len(held), dtype=torch.float64)
    weighted = ValidationSet(held, refs, 0.05, 0.0, levels, torch.Generator().manual_seed(0), row_weights=weights)
    assert weighted.losses(OffInTheTail())[-1] > weighted.losses(model)[-1] + 1.0  # every row counts


def test_batch_size_follows_the_data_size(mixture_small):
    """Small tables train on small batches (issue 15: fit takes as long as the data needs);
    an explicit --batch-size always wins."""
    def batch(rows, **options):
        return Trainer(mixture_small[:rows], FitConfig(steps=1, width=16, depth=1, **options)).cfg.batch_size
    assert batch(300) == 128
    assert batch(1200) == 512  # 2-D; wider data 1024 (test_levels.py)
    assert batch(300, batch_size=512) == 512


def _two_clusters(rows=2000, small_share=0.05, seed=0):
    """A broad cluster and a small sharp one far from it, standardised-scale."""
    rng = np.random.default_rng(seed)
    small = int(rows * small_share)
    return torch.as_tensor(np.concatenate([rng.normal(0, 1, (rows - small, 2)),
                                           rng.normal(6, 0.2, (small, 2))]))


def test_balanced_query_weights_give_each_cluster_the_same_share():
    """A 5 % cluster gets half the level queries at power 1, sqrt(0.05 / 0.95) of the big one's
    at 1/2 (the queries follow share^(1 - power)); a single cluster keeps uniform rows."""
    rows = _two_clusters()
    in_small = torch.arange(len(rows)) >= 1900
    for power, expected in ((1.0, 0.5), (0.5, 0.05**0.5 / (0.05**0.5 + 0.95**0.5))):
        weights = cluster_balanced_weights(rows, power, data_clusters(rows, 0))
        assert float(weights[in_small].sum() / weights.sum()) == pytest.approx(expected, abs=0.01)
    one = torch.as_tensor(np.random.default_rng(1).normal(0, 1, (2000, 2)))
    weights = cluster_balanced_weights(one, 1.0, data_clusters(one, 0))
    assert float(weights.max() / weights.min()) == pytest.approx(1.0)
    for few in (1, 2, 3):  # too few rows for more than one cluster
        weights = cluster_balanced_weights(one[:few], 1.0, data_clusters(one[:few], 0))
        assert torch.equal(weights, torch.ones(few, dtype=torch.float64))


def test_level_queries_draw_their_rows_by_the_source_weights():
    rows = _two_clusters()
    weights = torch.zeros(len(rows), dtype=torch.float64)
    weights[1900:] = 1.0  # only the small cluster's rows
    queries, source = smoothed_data_queries(rows, 500, 0.01, torch.Generator().manual_seed(0), weights)
    assert bool((source >= 1900).all())
    assert float((queries - rows[source]).std()) == pytest.approx(0.1, rel=0.1)


def test_query_balance_weights_the_level_queries_and_each_step_keeps_its_rows_weights(mixture_small):
    """query_balance 0 (the default) draws query rows uniformly; above 0 by cluster, and a step's
    reference subset carries its own rows' weights."""
    uniform = Trainer(mixture_small, FitConfig(steps=1, width=16, depth=1))
    assert uniform.source_weights is None and uniform.refs_for_step()[1] is None
    trainer = Trainer(mixture_small, FitConfig(steps=1, width=16, depth=1, max_refs=100, query_balance=1.0))
    assert trainer.source_weights is not None and len(trainer.source_weights) == len(trainer.refs)
    trainer.source_weights = 1.0 + trainer.refs[:, 0].double().abs()  # a weight each row can be told by
    refs, weights = trainer.refs_for_step()
    assert len(refs) == 100 and torch.equal(weights, 1.0 + refs[:, 0].double().abs())


def test_the_checkpoint_holds_the_datas_lowest_density_for_trimming(tiny_checkpoint, mixture_small):
    """The sampler trims particles below the density of the data's own lowest 0.1 %: fit
    stores that log s, read at the model's ε on every row it was given (validation rows too)."""
    model = TrainedModel.load(tiny_checkpoint)
    rows = torch.from_numpy(model.standardizer.forward(mixture_small))
    log_s = model.log_fields(rows)[0]
    assert model.support_log_s == pytest.approx(support_floor(log_s), abs=1e-5)
    assert 0 < float((log_s < model.support_log_s).float().mean()) <= 0.001


def test_a_checkpoint_from_before_trimming_samples_untrimmed(tmp_path, tiny_checkpoint):
    tensors, meta = read_checkpoint(tiny_checkpoint)
    del meta["support_log_s"]
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata={"bdiff": json.dumps(meta)})
    model = TrainedModel.load(tmp_path / "old.safetensors")
    _, report = model.sample(200, model.sample_config(steps=5))
    assert model.support_log_s is None and report["trimmed_share"] is None


def test_the_trainers_adam_is_torchs_adam_to_the_bit():
    """bdiff.adam.Adam replaces torch.optim.Adam only to skip its 2.2 s compiler import: the same
    updates bit for bit, through a changing learning rate, a parameter without a gradient and a
    state saved and loaded halfway."""
    from bdiff.adam import Adam
    torch.manual_seed(0)
    ours_net = FieldModel(3, width=16, depth=2, arch="separate", param="log", levels=(1e-3, 1.0))
    theirs_net = FieldModel(3, width=16, depth=2, arch="separate", param="log", levels=(1e-3, 1.0))
    theirs_net.load_state_dict(ours_net.state_dict())
    ours, theirs = Adam(ours_net.parameters(), lr=2e-3), torch.optim.Adam(theirs_net.parameters(), lr=2e-3)
    x = torch.randn(64, 3)
    for step in range(40):
        lr = 2e-3 * (0.5 + 0.5 * math.cos(step / 7))
        ours.lr = lr
        for group in theirs.param_groups:
            group["lr"] = lr
        for net, optimizer in ((ours_net, ours), (theirs_net, theirs)):
            optimizer.zero_grad()
            scalar_only = step % 5 == 4  # the score network gets no gradient on these steps
            a, b = net.raw(x, torch.full((64,), 0.1))
            (a.pow(2).mean() if scalar_only else a.pow(2).mean() + b.pow(2).mean()).backward()
            optimizer.step()
        if step == 20:
            saved = {index: {k: v.clone() for k, v in state.items()} for index, state in ours.state_dict().items()}
            ours = Adam(ours_net.parameters(), lr=lr)
            ours.load_state_dict(saved)
        assert all(torch.equal(p, q) for p, q in zip(ours_net.parameters(), theirs_net.parameters())), step


def test_a_fit_does_not_import_the_compiler():
    """Every torch.optim optimiser imports torch._dynamo on first use: 2.2 s of a fit's 60 s on a
    slow 2-core machine."""
    import subprocess
    import sys
    code = ("import sys, numpy as np\n"
            "from bdiff.trainer import FitConfig, Trainer\n"
            "rows = np.random.default_rng(0).normal(size=(300, 2)).astype('float32')\n"
            "Trainer(rows, FitConfig(steps=3, width=8, batch_size=32)).run(None)\n"
            "print('torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_query_balance_and_the_clusters_judge_share_one_clustering(monkeypatch):
    """A 3-D table with --query-balance weighs its level queries and its validation rows by the
    same clusters of the training rows: one BIC mixture fit, not two."""
    import bdiff.losses
    fits = []
    original = bdiff.losses.bic_gaussian_mixture
    monkeypatch.setattr(bdiff.losses, "bic_gaussian_mixture", lambda *a, **k: fits.append(1) or original(*a, **k))
    rows = np.random.default_rng(0).normal(0, 1, (1500, 3))
    trainer = Trainer(rows, FitConfig(steps=1, width=16, depth=1, query_balance=1.0))
    assert trainer.source_weights is not None and trainer.validation.row_weights is not None
    assert len(fits) == 1


def test_level_queries_are_rows_noised_rows_and_wide_ones(monkeypatch):
    """Per level ε: a quarter of the queries are the rows themselves, the rest rows plus
    N(0, εI), the last wide_share of them WIDE_NOISE times wider. One row at the origin makes
    each query its own offset from its row."""
    import bdiff.losses
    from bdiff.losses import LEVEL_GROUPS, WIDE_NOISE, field_loss
    seen = []

    def record(queries, refs, eps, excludes, backend):
        seen.append((queries.clone(), eps.clone()))
        return torch.zeros(len(queries)), torch.zeros_like(queries)

    monkeypatch.setattr(bdiff.losses, "field_matching", record)
    model = FieldModel(2, width=8, depth=1, param="log", levels=(1e-3, 1.0))
    size = 4000
    cfg = FitConfig(batch_size=LEVEL_GROUPS * size, wide_share=0.25)
    field_loss(model, torch.zeros(1, 2), 0.01, 0.0, cfg, torch.Generator().manual_seed(0))
    queries, eps = seen[0]
    for group in range(LEVEL_GROUPS):
        q, level = queries[group * size:(group + 1) * size], float(eps[group * size])
        assert torch.all(q[:size // 4] == 0)
        assert float(q[size // 4:size * 3 // 4].std()) == pytest.approx(level ** 0.5, rel=0.05)
        assert float(q[size * 3 // 4:].std()) == pytest.approx(WIDE_NOISE * level ** 0.5, rel=0.05)


def _skewed_table(rows, seed=0):
    """Income-like columns: a log-normal one and one that follows it with a skewed spread."""
    rng = np.random.default_rng(seed)
    income = rng.lognormal(7, 0.9, rows)
    return np.column_stack([income, 0.4 * income * rng.lognormal(0, 0.25, rows)])


def test_skewed_columns_are_coded_where_a_kernel_density_predicts_them_better():
    """A log-normal table is coded (its powers near 0); two well-apart modes of unequal size
    (skewed, so their fitted power is away from 1) are not, because the power warps the modes and
    the kernel density predicts held-out rows worse with it (faithful's case); "on" codes them
    anyway, "off" never; a column of codes is left as it is."""
    skewed = _skewed_table(2000)
    coding = column_coding(skewed, "auto", seed=0)
    assert coding is not None and np.all(coding.power < 0.6)
    assert column_coding(skewed, "off", seed=0) is None
    rng = np.random.default_rng(1)
    two_modes = np.concatenate([rng.normal(-2.0, 0.3, (700, 2)), rng.normal(1.5, 0.6, (1300, 2))])
    on = column_coding(two_modes, "on", seed=0)
    assert on is not None and np.all(np.abs(on.power - 1) > 0.1)
    assert column_coding(two_modes, "auto", seed=0) is None
    with_codes = np.column_stack([skewed, rng.integers(0, 3, 2000)])
    assert column_coding(with_codes, "on", seed=0).power[2] == 1


def test_powers_are_judged_on_rows_they_were_not_fitted_on():
    """Gaussian tables need no coding. Powers fitted on every row and judged on those same rows
    gain about 0.5/n nats per column in-sample; summed over many columns of few rows that
    passed the judge: 100 rows of a 50-D Gaussian had 23 columns coded (gain 0.22 +- 0.09 nats),
    50 rows of a 200-D one 123 (2.04 +- 0.20). Each fold's rows are judged under powers fitted
    without them; skewed columns of as few rows still are coded."""
    rng = np.random.default_rng(0)
    for rows, columns in ((40, 20), (100, 50), (50, 200)):
        assert column_coding(rng.normal(size=(rows, columns)), "auto", seed=0) is None
        assert column_coding(rng.lognormal(0, 0.8, (rows, columns)), "auto", seed=0) is not None


def test_tail_powers_are_fitted_under_power_on_only():
    """Daily-return-like columns (Student-t, 3 degrees of freedom: no skew, heavy tails) get tail
    powers under "on"; auto judges Yeo-Johnson powers alone, so a mixture with a broad mode, whose
    rows also fit tail powers, keeps its tails under auto (a law's far share rose with them)."""
    rng = np.random.default_rng(2)
    returns = rng.standard_t(3, (2000, 2))
    coding = column_coding(returns, "on", seed=0)
    assert coding is not None and np.all(coding.tail < 0.5) and np.all(coding.power == 1)
    assert column_coding(returns, "auto", seed=0) is None
    modes = np.concatenate([rng.normal(0, 0.4, (1800, 2)), rng.normal(1.5, 1.5, (200, 2))])
    assert np.all(column_coding(modes, "on", seed=0).tail < 1)
    auto = column_coding(modes, "auto", seed=0)
    assert auto is None or np.all(auto.tail == 1)


def test_resume_refuses_a_run_whose_columns_were_coded_otherwise(tmp_path):
    """The coding is fitted again from the data when a run resumes; a checkpoint whose stored
    coding differs (written by a bdiff before tail powers, which coded "on" without them) would
    go on training its weights on rows coded another way, so resume refuses it."""
    returns = np.random.default_rng(3).standard_t(3, (600, 2)).astype(np.float32)
    path = tmp_path / "on.safetensors"
    Trainer(returns, FitConfig(**{**TINY, "steps": 20, "power": "on"})).run(str(path))
    tensors, meta = read_checkpoint(path)
    assert meta["standardizer"]["coding"]["tail"][0] < 1
    del meta["standardizer"]["coding"]["tail"]
    older = tmp_path / "older.safetensors"
    save_file(load_file(str(path)), str(older), metadata={"bdiff": json.dumps(meta)})
    with pytest.raises(BdiffError, match="coded"):
        Trainer(returns, FitConfig(**{**TINY, "steps": 40, "power": "on"})).restore(str(older))
    again = Trainer(returns, FitConfig(**{**TINY, "steps": 40, "power": "on"}))
    again.restore(str(path))
    assert again.step == 20


def test_a_coded_fit_samples_in_data_units_and_resumes_only_with_its_coding(tmp_path):
    """The checkpoint carries the coding: samples come back decoded, the density is in data units
    (its Jacobian counted), and --resume refuses a run whose columns were coded otherwise."""
    skewed = _skewed_table(600).astype(np.float32)
    path = str(tmp_path / "coded.safetensors")
    trainer = Trainer(skewed, FitConfig(**{**TINY, "steps": 40}))
    assert trainer.cfg.power == "on" and trainer.standardizer.coding is not None
    trainer.run(path)
    model = TrainedModel.load(path)
    values, _ = model.sample_values(500, model.sample_config(seed=0))
    coded = model.standardizer.forward(values)
    assert np.isfinite(values).all() and np.allclose(model.standardizer.inverse(coded), values, rtol=1e-4)
    assert np.median(values[:, 0]) > 0.3 * np.median(skewed[:, 0])  # in data units, not coded ones
    log_p = model.log_density(skewed[:50])
    expected = (model.log_density_std(torch.from_numpy(model.standardizer.forward(skewed[:50]))).numpy()
                + model.standardizer.log_jacobian(skewed[:50]))
    assert np.allclose(log_p, expected)
    plain = Trainer(skewed, FitConfig(**{**TINY, "steps": 60, "power": "off"}))
    with pytest.raises(BdiffError, match="--power on"):
        plain.restore(path)
    again = Trainer(skewed, FitConfig(**{**TINY, "steps": 60}))
    again.restore(path)
    assert again.step == 40


def test_constant_columns_are_left_out_of_the_model(tmp_path):
    """A constant column has no density: modelled, it was a δ the fields had to learn at every
    level, the reported log-likelihood counted its N(0, ε_min) blur (a 1-D bimodal table with
    three constant columns read 8.9 nats a row where the column alone reads -1.45) and training
    never stopped early (73 s against 5 s). The model now sees the other columns: fit, density
    and samples are those of the table without them, and samples put the constants back."""
    rng = np.random.default_rng(4)
    varying = np.where(rng.random((300, 1)) < 0.3, rng.normal(-2, 0.3, (300, 1)), rng.normal(1, 0.7, (300, 1)))
    table = np.column_stack([np.full(300, 7.0), varying, np.zeros(300)]).astype(np.float32)
    paths = {name: str(tmp_path / f"{name}.safetensors") for name in ("table", "column")}
    Trainer(table, FitConfig(**TINY)).run(paths["table"])
    Trainer(varying.astype(np.float32), FitConfig(**TINY)).run(paths["column"])
    with_constants, alone = TrainedModel.load(paths["table"]), TrainedModel.load(paths["column"])
    assert with_constants.dim == 1 and with_constants.item_shape == (3,)
    probe = np.column_stack([np.full(50, 7.0), np.linspace(-3, 3, 50), np.zeros(50)]).astype(np.float32)
    np.testing.assert_allclose(with_constants.log_density(probe), alone.log_density(probe[:, 1:2]), rtol=1e-5)
    cfg = with_constants.sample_config(steps=5, seed=0)
    samples, _ = with_constants.sample_values(200, cfg)
    assert samples.shape == (200, 3) and np.all(samples[:, 0] == 7.0) and np.all(samples[:, 2] == 0.0)
    np.testing.assert_allclose(samples[:, 1], alone.sample_values(200, cfg)[0][:, 0], rtol=1e-5, atol=1e-5)
    with pytest.raises(BdiffError, match="trained on 3"):
        with_constants.check_dim(probe[:, :2], "the data")


def test_resume_refuses_a_run_that_modelled_its_constant_columns(tmp_path, monkeypatch):
    """A run from before constant columns were left out has a network over every column; resume
    refuses it by name rather than failing on tensor shapes."""
    values = np.column_stack([np.random.default_rng(5).normal(size=300), np.full(300, 2.0)]).astype(np.float32)
    path = str(tmp_path / "old.safetensors")
    fit = Standardizer.fit.__func__
    with monkeypatch.context() as patch:  # the earlier Standardizer: every column in model units
        patch.setattr(Standardizer, "fit", classmethod(
            lambda cls, *a, **k: dataclasses.replace(fit(cls, *a, **k), model_columns=None)))
        Trainer(values, FitConfig(**{**TINY, "steps": 20})).run(path)
    assert TrainedModel.load(path).dim == 2
    with pytest.raises(BdiffError, match="constant columns"):
        Trainer(values, FitConfig(**{**TINY, "steps": 40})).restore(path)


def test_auto_fits_tail_powers_where_a_tail_sets_a_column_s_scale():
    """A Cauchy column's sd is tens of interquartile sds, set by a tail rather than a few rows
    apart: plainly scaled, its held-out log-likelihood was -5.90 on 5000 rows (a BIC mixture
    -4.36, the law's own -2.53); with tail powers on the column scaled by its middle -2.56. auto
    fits them there, and only there: t3 returns, a normal column and a typo's column keep
    theirs at 1. The judge clips the extreme 1 % of its row gains at each end where it weighs
    tails."""
    rng = np.random.default_rng(8)
    typo = rng.normal(size=2000)
    typo[5] = 1e6
    table = np.column_stack([rng.standard_cauchy(2000), rng.normal(size=2000), typo])
    coding = column_coding(table, "auto", seed=0)
    assert coding is not None and coding.tail[0] < 0.5 and np.all(coding.tail[1:] == 1)
    # standardised by its middle, not its sd: the tail power does the work, no skewing power
    assert coding.power[0] == 1 and coding.scale[0] == pytest.approx(np.subtract(
        *np.percentile(table[:, 0], [75, 25])) / 1.349)
    assert column_coding(rng.standard_t(3, (2000, 2)), "auto", seed=0) is None
    # two Cauchy columns: one far row's gain (10^5 nats) had hidden the others' in the judge's noise
    both = column_coding(np.random.default_rng(0).standard_cauchy((2000, 2)), "auto", seed=0)
    assert both is not None and np.any(both.tail < 0.5)


def test_auto_fits_tail_powers_where_a_column_has_no_variance():
    """Student-t with 1.5 degrees of freedom has no variance, yet its sd on 5000 rows read only 4
    interquartile sds (benchmarks/hostile.py's draw), under the spread rule's 10: left plain, its
    held-out log-likelihood was -2.431 (the BIC mixture -2.234; with tail powers -2.182). A
    tail index under 2 (Hill's, on the farthest rows) marks such a column, and the judge codes it."""
    heavy = np.random.default_rng(11).standard_t(1.5, (5000, 1))
    assert tail_index(heavy[:, 0]) < 2 < tail_index(np.random.default_rng(1).standard_t(3, 5000))
    coding = column_coding(heavy, "auto", seed=0)
    assert coding is not None and coding.tail[0] < TAIL_KEPT_BELOW


def test_the_coding_judge_weighs_the_coding_it_returns(monkeypatch):
    """The judge's folds refit the powers of the columns the coding codes, and no others: fitted
    from scratch, a fold gave radar's first band (left plain on all rows by its cluster gap) a
    tail power, and the judge passed a coding it had not weighed (held out -18.936 -> -19.039)."""
    from bdiff import data, trainer
    rng = np.random.default_rng(4)
    table = np.column_stack([rng.lognormal(0, 1, 3000), rng.normal(size=3000), rng.standard_t(1.5, 3000)])
    fits, real_fit = [], data.PowerCoding.fit.__func__

    def spy(cls, values, skip=(), tails=()):
        coding = real_fit(cls, values, skip, tails)
        fits.append((set(skip), set(tails), coding))
        return coding

    monkeypatch.setattr(trainer.PowerCoding, "fit", classmethod(spy))
    coding = column_coding(table, "auto", seed=0)
    assert coding is not None and coding.power[0] != 1 and coding.power[1] == 1 and coding.tail[1] == 1
    assert coding.tail[2] < 1
    (_, all_tails, _), folds = fits[0], fits[1:]
    assert all_tails == {2} and len(folds) == trainer.POWER_JUDGE_FOLDS
    for skip, tails, fold_coding in folds:
        assert 1 in skip and tails == {2}
        assert fold_coding.power[1] == 1 and fold_coding.tail[1] == 1


def test_resume_refuses_a_run_whose_columns_were_scaled_otherwise(tmp_path):
    """A run from before rows set apart were left out of a column's scale trained on rows in
    other units; resume refuses it rather than training its weights on rows scaled anew."""
    values = np.random.default_rng(6).normal(size=(400, 2))
    values[17, 1] = 1e6
    values = values.astype(np.float32)
    path = tmp_path / "new.safetensors"
    Trainer(values, FitConfig(**{**TINY, "steps": 20})).run(str(path))
    tensors, meta = read_checkpoint(path)
    meta["standardizer"]["std"][1] = float(values[:, 1].std())  # as the earlier bdiff scaled it
    older = tmp_path / "older.safetensors"
    save_file(load_file(str(path)), str(older), metadata={"bdiff": json.dumps(meta)})
    with pytest.raises(BdiffError, match="scaled"):
        Trainer(values, FitConfig(**{**TINY, "steps": 40})).restore(str(older))
    again = Trainer(values, FitConfig(**{**TINY, "steps": 40}))
    again.restore(str(path))
    assert again.step == 20

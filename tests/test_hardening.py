"""Careless and hostile commands (issue 12): no data lost, checkpoints verified, every bad
input one clear line. Each test names the defect it covers."""
import json
import os
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from bdiff.checkpoint import read_checkpoint
from bdiff.data import Standardizer, atomic_path, rows_set_apart
from bdiff.errors import BdiffError
from bdiff.model import TrainedModel
from bdiff.sampler import UncoveredSupport
from bdiff.trainer import FitConfig, Trainer

from conftest import TINY
from test_cli import FAST_FIT, assert_clean_failure, invoke


@pytest.fixture
def data_file(tmp_path, mixture_small):
    path = tmp_path / "data.npy"
    np.save(path, mixture_small[:600])
    return path


# 1. outputs never replace the input, a directory or a non-regular file

def test_force_never_replaces_the_training_data(tmp_path, mixture_small):
    data = tmp_path / "data.safetensors"
    save_file({"x": torch.from_numpy(mixture_small[:300])}, str(data))
    before = data.read_bytes()
    assert_clean_failure(invoke("fit", data, "-o", data, "--force", *FAST_FIT), "is the input data")
    assert data.read_bytes() == before
    link = tmp_path / "link.safetensors"
    link.symlink_to(data)
    assert_clean_failure(invoke("fit", data, "-o", link, "--force", *FAST_FIT), "is the input data")
    assert data.read_bytes() == before


def test_force_never_replaces_a_directory_or_a_special_file(tmp_path, data_file):
    folder = tmp_path / "m.safetensors"
    folder.mkdir()
    assert_clean_failure(invoke("fit", data_file, "-o", folder, "--force", *FAST_FIT), "directory")
    assert folder.is_dir()
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    assert_clean_failure(invoke("fit", data_file, "-o", fifo, "--force", *FAST_FIT), "not a regular file")
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_sample_and_evaluate_keep_existing_outputs_without_force(tmp_path, tiny_checkpoint):
    existing = tmp_path / "data.csv"
    existing.write_text("1,2\n3,4\n")
    assert_clean_failure(invoke("sample", "-c", tiny_checkpoint, "-o", existing, "--n", 10), "--force")
    assert existing.read_text() == "1,2\n3,4\n"
    result = invoke("sample", "-c", tiny_checkpoint, "-o", existing, "--n", 10, "--steps", 2, "--force")
    assert result.exit_code == 0, result.stderr
    metrics = tmp_path / "metrics.json"
    metrics.write_text("{}")
    assert_clean_failure(invoke("evaluate", "-c", tiny_checkpoint, "--data", "mixture", "--json", metrics),
                         "--force")
    assert metrics.read_text() == "{}"


# 2. checkpoints are verified before use

def _rewrite(path, target, tensors=None, meta=None, raw_meta=None):
    """A copy of a checkpoint with edited tensors or metadata, written as an attacker would
    (the checksum of the original tensors kept)."""
    original_tensors, original_meta = read_checkpoint(path)
    tensors = original_tensors if tensors is None else tensors
    text = raw_meta if raw_meta is not None else json.dumps(meta if meta is not None else original_meta)
    save_file(tensors, str(target), metadata={"bdiff": text})
    return target


def test_flipped_weight_bytes_fail_the_checksum(tmp_path, tiny_checkpoint):
    raw = bytearray(tiny_checkpoint.read_bytes())
    header = 8 + int.from_bytes(raw[:8], "little")
    for i in range(header + 100, header + 150):  # 50 bytes inside the first tensors
        raw[i] ^= 0xFF
    flipped = tmp_path / "flipped.safetensors"
    flipped.write_bytes(bytes(raw))
    assert_clean_failure(invoke("sample", "-c", flipped, "--n", 10), "checksum")
    assert not (tmp_path / "samples.npy").exists()


def _edit(meta, path, value):
    meta = json.loads(json.dumps(meta))
    node = meta
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return meta


@pytest.mark.parametrize("path, value, message", [
    (("eps",), 0, "eps"), (("eps",), -1.0, "eps"), (("eps",), "x", "eps"),
    (("standardizer", "std"), [-1.0, 1.0], "std"), (("standardizer", "std"), [1.0], "std"),
    (("standardizer", "mean"), [0.0, "a"], "mean"),
    (("item_shape",), [3, 5], "item_shape"), (("item_shape",), "2", "item_shape"),
    (("levels",), [1.0, 0.5], "levels"), (("levels",), [1.0], "levels"),
    (("dim",), 0, "dim"), (("config", "width"), 40000, "width"), (("config", "depth"), 100_000_000, "depth"),
    (("config", "depth"), -1, "depth"), (("config", "arch"), "tower", "arch"),
    (("config", "fourier"), -3, "ourier"), (("config", "fourier"), 10**9, "ourier"),
    (("config", "fourier"), 7, "ourier"), (("config", "fourier"), 0, "ourier"),
    (("flow_eps",), -1.0, "flow_eps"), (("flow_eps",), "x", "flow_eps"), (("flow_eps",), 1e9, "flow_eps"),
    (("support_log_s",), "x", "support_log_s"), (("support_log_s",), [1.0], "support_log_s"),
    (("flow_base",), {"weights": [1.0], "means": [[0.0, 0.0]], "covariances": [[[1.0, 0.0], [0.0, -1.0]]]},
     "flow_base"),
    (("flow_base",), {"weights": [0.5], "means": [[0.0, 0.0]], "covariances": [np.eye(2).tolist()]}, "flow_base"),
    (("flow_base",), {"weights": [1.0], "means": [[0.0]], "covariances": [[[1.0]]]}, "flow_base"),
    (("flow_base",), [1.0], "flow_base"),
    (("standardizer", "coding"), {"center": [0.0, 0.0], "scale": [1.0, 1.0], "power": [2.5, 1.0]}, "coding"),
    (("standardizer", "coding"), {"center": [0.0, 0.0], "scale": [1.0, 1.0], "power": [1.0, 1.0],
                                  "tail": [1.0, 1.5]}, "coding"),
    (("standardizer", "coding"), {"center": [0.0, 0.0], "scale": [1.0, 1.0], "power": [1.0, 1.0],
                                  "tail": [0.5]}, "coding"),
])
def test_bad_metadata_is_refused_before_anything_is_allocated(tmp_path, tiny_checkpoint, path, value, message):
    _, meta = read_checkpoint(tiny_checkpoint)
    edited = _rewrite(tiny_checkpoint, tmp_path / "edited.safetensors", meta=_edit(meta, path, value))
    start = time.perf_counter()
    result = invoke("sample", "-c", edited, "--n", 10)
    assert_clean_failure(result, message)
    assert "internal error" not in result.stderr
    assert time.perf_counter() - start < 20


def test_metadata_that_is_not_an_object_is_refused(tmp_path, tiny_checkpoint):
    edited = _rewrite(tiny_checkpoint, tmp_path / "list.safetensors", raw_meta="[1, 2]")
    assert_clean_failure(invoke("sample", "-c", edited, "--n", 10), "metadata")


# 3. evaluate never opens a path found in a checkpoint

def test_evaluate_never_opens_the_stored_source_path(tmp_path, data_file):
    ckpt = tmp_path / "m.safetensors"
    assert invoke("fit", data_file, "-o", ckpt, *FAST_FIT).exit_code == 0
    # from the same folder: the stored source exists, but it is the training data
    assert_clean_failure(invoke("evaluate", "-c", ckpt, "--n", 50), "--data")
    # the training rows given as held-out data are recognised by their fingerprint
    assert_clean_failure(invoke("evaluate", "-c", ckpt, "--data", data_file, "--n", 50), "training data")


# 4. (the output folder is checked before training: test_cli.test_fit_missing_file_and_unwritable_output)

# 5. markup in user text is printed as text

@pytest.mark.parametrize("name", ["[/x]", "[bold red]loud[/bold red]"])
def test_markup_in_file_names_is_printed_literally(tmp_path, mixture_small, name):
    data = tmp_path / f"{name}.npy"  # "[/x]" makes a folder "[" holding "x].npy"
    data.parent.mkdir(exist_ok=True)
    np.save(data, mixture_small[:300])
    ckpt = tmp_path / f"{name}.safetensors"
    result = invoke("fit", data, "-o", ckpt, *FAST_FIT)
    assert result.exit_code == 0, result.stderr
    assert name in " ".join((result.output + result.stderr).split())
    samples = tmp_path / f"{name}.csv"
    result = invoke("sample", "-c", ckpt, "-o", samples, "--n", 20, "--steps", 2)
    assert result.exit_code == 0, result.stderr
    assert f"{name}.csv" in result.output.replace("\n", "")
    assert_clean_failure(invoke("sample", "-c", tmp_path / f"{name}x.safetensors"), name)


# 6. memory

def test_impossible_sizes_are_one_clear_line(tmp_path, tiny_checkpoint, data_file):
    assert_clean_failure(invoke("sample", "-c", tiny_checkpoint, "--n", 10**15), "memory")
    assert_clean_failure(invoke("fit", data_file, "-o", tmp_path / "m.safetensors", "--batch-size", 10**12),
                         "memory")
    # a batch larger than --n is simply one batch
    result = invoke("sample", "-c", tiny_checkpoint, "--n", 20, "--steps", 2, "--batch-size", 10**15)
    assert result.exit_code == 0, result.stderr


def test_allocator_failures_become_one_clear_line(tmp_path, tiny_checkpoint, monkeypatch):
    import bdiff.model

    def fail(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
    monkeypatch.setattr(bdiff.model.TrainedModel, "sample", fail)
    result = invoke("sample", "-c", tiny_checkpoint, "--n", 10)
    assert_clean_failure(result, "out of memory")
    assert "internal error" not in result.stderr


# 7. smaller defects

@pytest.mark.parametrize("option, message", [
    (["--seed", str(2**70)], "--seed"), (["--seed", "-1"], "--seed"),
    (["--width", "0"], "--width"), (["--depth", "0"], "--depth"), (["--depth", "-1"], "--depth"),
])
def test_fit_refuses_out_of_range_sizes_and_seeds(tmp_path, data_file, option, message):
    assert_clean_failure(invoke("fit", data_file, "-o", tmp_path / "m.safetensors", *FAST_FIT, *option), message)


def test_sample_refuses_out_of_range_seeds(tiny_checkpoint):
    assert_clean_failure(invoke("sample", "-c", tiny_checkpoint, "--seed", str(2**70)), "--seed")


def test_constant_data_is_refused_and_a_constant_column_stays_constant(tmp_path, rng):
    same = tmp_path / "same.npy"
    np.save(same, np.ones((100, 2)))
    assert_clean_failure(invoke("fit", same, "-o", tmp_path / "m.safetensors", *FAST_FIT), "identical")
    column = tmp_path / "column.npy"
    np.save(column, np.column_stack([rng.normal(size=400), np.full(400, 7.0)]))
    ckpt = tmp_path / "c.safetensors"
    result = invoke("fit", column, "-o", ckpt, *FAST_FIT)
    assert result.exit_code == 0, result.stderr
    assert "constant" in result.stderr
    out = tmp_path / "s.npy"
    assert invoke("sample", "-c", ckpt, "-o", out, "--n", 50, "--steps", 3).exit_code == 0
    assert np.all(np.load(out)[:, 1] == 7.0)


def test_a_gross_outlier_is_named_and_fit_still_finishes(tmp_path):
    """One mistyped row (1e6 among values of a few units) sets its column's scale: the other
    rows are squeezed into a sliver of it. fit names the row and its column, and only those."""
    rng = np.random.default_rng(7)
    values = np.where(rng.random(2000) < 0.3, rng.normal(-2, 0.3, 2000), rng.normal(1, 0.7, 2000))
    values[1234] = 1e6
    data = tmp_path / "typo.npy"
    np.save(data, np.column_stack([rng.normal(size=2000), values]))
    ckpt = tmp_path / "m.safetensors"
    result = invoke("fit", data, "-o", ckpt, *FAST_FIT)
    assert result.exit_code == 0, result.stderr
    assert "column 1" in result.stderr and "row 1234" in result.stderr and "1e+06" in result.stderr
    assert "scaled without" in result.stderr and "column 0" not in result.stderr


def test_fit_scales_a_column_without_the_rows_set_apart_and_samples_its_bulk(tmp_path):
    """1-D, the same typo. Scaled with it, the other rows sat in a sliver of the column's range:
    the end-level search's trials fell below the data's support floor and ended fit after
    training, and `bdiff sample` refused (5368 of 10 000 particles below the floor). The column is
    now scaled by the rows without it, and the samples follow the other rows."""
    rng = np.random.default_rng(7)
    values = np.where(rng.random(2000) < 0.3, rng.normal(-2, 0.3, 2000), rng.normal(1, 0.7, 2000))
    values[1234] = 1e6
    trainer = Trainer(values[:, None].astype(np.float32), FitConfig(**TINY))
    bulk = np.delete(values, 1234)
    assert trainer.standardizer.std[0] == pytest.approx(bulk.std(), rel=1e-4)
    path = tmp_path / "m.safetensors"
    trainer.run(str(path))
    model = TrainedModel.load(path)
    samples, _ = model.sample_values(2000, model.sample_config(seed=0))
    near = samples[np.abs(samples[:, 0]) < 100, 0]
    assert len(near) >= 1990
    assert np.mean(near < -0.5) == pytest.approx(np.mean(bulk < -0.5), abs=0.06)  # the 30 % mode


def test_a_heavy_tail_is_not_taken_for_rows_set_apart():
    """A Cauchy column's spread is set by its tail too, but no few rows stand apart from the
    rest: scaled by its middle alone, the tail's held-out rows would sit hundreds of units out
    (log-likelihood -5.9 -> -306 on 5000 rows), so it keeps its plain scale."""
    for seed in range(5):
        values = np.random.default_rng(seed).standard_cauchy((5000, 1))
        assert rows_set_apart(values[:, 0]).size == 0
    typo = np.random.default_rng(0).normal(size=500)
    typo[[3, 40]] = [1e6, -3e5]
    assert sorted(rows_set_apart(typo)) == [3, 40]


def test_sampling_that_leaves_the_support_names_the_far_row_fit_found(tmp_path, monkeypatch):
    """Where fit warned of a column's scale and sampling then leaves the data's support, the
    error points at the row fit named."""
    path = tmp_path / "m.safetensors"
    Trainer(np.random.default_rng(0).normal(size=(300, 1)).astype(np.float32), FitConfig(**TINY)).run(str(path))
    model = TrainedModel.load(path)
    model.meta["far_scaled_columns"] = [[0, 31.0, 77]]

    def uncovered(*args):
        raise UncoveredSupport("5000 of 10000 particles ended below the density of the data's lowest 0.1 %")
    monkeypatch.setattr("bdiff.model.sample", uncovered)
    with pytest.raises(BdiffError, match="row 77"):
        model.sample(1000, model.sample_config(seed=0))


def test_standardizer_keeps_constant_columns_constant():
    values = np.column_stack([np.arange(10.0), np.full(10, 3.0)])
    standardizer = Standardizer.fit(values)
    coded = standardizer.forward(values)
    assert coded.shape == (10, 1) and np.isfinite(coded).all()  # the model never sees the constant
    assert np.all(standardizer.inverse(np.random.default_rng(0).normal(size=(5, 1)))[:, 1] == 3.0)


def test_resume_refuses_options_that_differ_from_the_stored_run(tmp_path, data_file):
    ckpt = tmp_path / "m.safetensors"
    assert invoke("fit", data_file, "-o", ckpt, *FAST_FIT).exit_code == 0
    for option in (["--width", "64"], ["--eps", "0.5"], ["--lr", "0.01"]):
        assert_clean_failure(invoke("fit", data_file, "-o", ckpt, "--resume", "--steps", "30", *option),
                             option[0])
    # the stored values themselves are fine
    result = invoke("fit", data_file, "-o", ckpt, "--resume", "--steps", "30", "--width", "32")
    assert result.exit_code == 0, result.stderr


def test_key_is_refused_where_a_file_has_no_names(tmp_path, data_file):
    assert_clean_failure(invoke("fit", data_file, "--key", "x", "-o", tmp_path / "m.safetensors", *FAST_FIT),
                         "--key")


def test_evaluate_refuses_sampler_options_with_given_samples(tmp_path, tiny_checkpoint):
    samples = tmp_path / "s.npy"
    np.save(samples, np.zeros((50, 2)))
    assert_clean_failure(invoke("evaluate", "-c", tiny_checkpoint, "--data", "mixture", "--samples", samples,
                                "--sampler", "smc"), "--samples")
    assert_clean_failure(invoke("evaluate", "-c", tiny_checkpoint, "--data", "mixture", "--samples", samples,
                                "--no-trim"), "--trim")


def test_rl_refuses_agent_with_compare(tmp_path):
    assert_clean_failure(invoke("rl", "frozenlake", "--compare", "--agent", "c51", "--out", tmp_path / "r"),
                         "--compare")


def test_stale_temporary_files_of_dead_writers_are_removed(tmp_path):
    target = tmp_path / "x.json"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f"x.json.tmp-{dead}"
    stale.write_text("half")
    with atomic_path(target) as tmp:
        with open(tmp, "w") as handle:
            handle.write("{}")
    assert target.read_text() == "{}" and not stale.exists()


def test_a_full_disk_during_a_save_is_one_clear_line(tmp_path, data_file, monkeypatch):
    import bdiff.checkpoint
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")
    monkeypatch.setattr(bdiff.checkpoint, "save_file", full)
    result = invoke("fit", data_file, "-o", tmp_path / "m.safetensors", *FAST_FIT)
    assert_clean_failure(result, "cannot write")
    assert not list(tmp_path.glob("m.safetensors*"))


def test_same_seed_same_bytes(tmp_path, mixture_small):
    paths = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    for path in paths:
        Trainer(mixture_small[:300], FitConfig(**dict(TINY, steps=12)), "mixture").run(str(path))
    assert paths[0].read_bytes() == paths[1].read_bytes()


def test_sample_help_says_what_reproduces_a_file():
    """The file depends on the batch size too (SMC resamples within a batch): the help says so."""
    import typer.main

    from bdiff.cli.main import app
    command = typer.main.get_command(app).commands["sample"]
    seed_help = next(param.help for param in command.params if param.name == "seed")
    assert "same file" in seed_help and "--batch-size" in seed_help


def test_checkpoint_modes_follow_the_umask_and_resume_keeps_them(tmp_path, data_file):
    ckpt = tmp_path / "m.safetensors"
    old = os.umask(0o022)
    try:
        assert invoke("fit", data_file, "-o", ckpt, *FAST_FIT).exit_code == 0
        assert stat.S_IMODE(os.stat(ckpt).st_mode) == 0o644
        os.chmod(ckpt, 0o640)
        assert invoke("fit", data_file, "-o", ckpt, "--resume", "--steps", "25").exit_code == 0
        assert stat.S_IMODE(os.stat(ckpt).st_mode) == 0o640
    finally:
        os.umask(old)


def test_sigterm_during_fit_saves_a_resumable_checkpoint(tmp_path, data_file):
    ckpt = tmp_path / "m.safetensors"
    env = dict(os.environ, BDIFF_PROGRESS_SECONDS="0")
    process = subprocess.Popen([sys.executable, "-m", "bdiff.cli.main", "fit", str(data_file), "-o", str(ckpt),
                                "--steps", "100000", "--width", "32", "--depth", "2", "--batch-size", "64"],
                               stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    for line in process.stderr:
        if "fit: step" in line:
            break
    process.send_signal(signal.SIGTERM)
    _, rest = process.communicate(timeout=60)
    assert process.returncode == 143, rest
    assert "checkpoint saved" in rest
    _, meta = read_checkpoint(ckpt)
    assert meta["step"] > 0


def test_a_second_writer_to_the_same_checkpoint_is_refused(tmp_path, data_file):
    from bdiff.data import output_lock
    ckpt = tmp_path / "m.safetensors"
    with output_lock(ckpt):
        assert_clean_failure(invoke("fit", data_file, "-o", ckpt, *FAST_FIT), "another bdiff")
    assert invoke("fit", data_file, "-o", ckpt, *FAST_FIT).exit_code == 0


def test_loading_a_large_file_needs_little_more_than_its_float32_copy(tmp_path):
    """Issue 12: a 400 MB .npy needed more than 3 GB. Loading now memory-maps the file and
    converts a chunk at a time: the peak grows by about twice the file, not eight times."""
    path = tmp_path / "big.npy"
    np.save(path, np.random.default_rng(0).normal(size=(10_000_000, 2)).astype(np.float32))  # 80 MB
    script = ("import resource; from bdiff.data import load_data, Standardizer; "
              "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
              f"values = load_data({str(path)!r}).values; Standardizer.fit(values).forward(values); "
              "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)")
    grown = int(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout)
    assert grown < 2.6 * path.stat().st_size, grown / path.stat().st_size


def test_fit_writes_only_safetensors_and_announces_long_preparation(tmp_path, data_file, monkeypatch):
    for name in ("data.npy", "data.csv", "model.pt"):
        assert_clean_failure(invoke("fit", data_file, "-o", tmp_path / name, "--force", *FAST_FIT), ".safetensors")
    assert_clean_failure(invoke("fit", data_file, "-o", tmp_path / "m.safetensors", "--checkpoint-every", 0),
                         "--checkpoint-every")
    import bdiff.trainer
    monkeypatch.setattr(bdiff.trainer, "PREPARE_NOTICE_ROWS", 100)
    result = invoke("fit", data_file, "-o", tmp_path / "m.safetensors", *FAST_FIT)
    assert result.exit_code == 0 and "choosing ε and log C first" in result.stderr


def test_a_save_reaches_the_disk_before_it_replaces_the_old_file(tmp_path, monkeypatch):
    """No fsync before the rename: a crash could leave an empty file under the old name."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append("fsync") or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append("replace") or real_replace(a, b))
    with atomic_path(tmp_path / "out.npy") as tmp:
        np.save(open(tmp, "wb"), np.ones(3))
    assert events == ["fsync", "replace"]


def test_the_trainer_leaves_the_callers_config_as_given(mixture_small):
    """Trainer.__init__ used to rewrite the caller's FitConfig in place (batch, param, arch)."""
    cfg = FitConfig(**dict(TINY, batch_size=None))
    Trainer(mixture_small[:300], cfg, "mixture")
    assert cfg == FitConfig(**dict(TINY, batch_size=None))

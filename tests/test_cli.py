"""Every command through Typer's CliRunner, good and bad input."""
import json
import os
import re
import warnings

import numpy as np
import pytest
from typer.testing import CliRunner

from bdiff.cli.main import app
from bdiff.model import TrainedModel

runner = CliRunner()
FAST_FIT = ["--steps", "20", "--width", "32", "--depth", "2", "--batch-size", "128"]


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output + result.stderr
    return result


def strict_json(path):
    """Parse JSON the way a strict parser does: NaN and Infinity are errors."""
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")
    return json.loads(path.read_text(), parse_constant=refuse)


def assert_clean_failure(result, message):
    assert result.exit_code == 2, result.output + result.stderr
    assert message in result.stderr, result.stderr
    assert result.stderr.strip().count("\n") <= 2  # one message, maybe wrapped


@pytest.fixture
def data_file(tmp_path, mixture_small):
    path = tmp_path / "data.npy"
    np.save(path, mixture_small[:800])
    return path


@pytest.mark.parametrize("command", ["fit", "sample", "evaluate", "benchmark"])
def test_help_has_examples(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0 and "Examples" in result.output


def test_top_level_help_lists_commands():
    result = invoke("--help")
    assert all(name in result.output for name in ["fit", "sample", "evaluate", "benchmark"])


def test_fit_sample_evaluate(tmp_path, data_file, mixture_small):
    heldout = tmp_path / "heldout.npy"
    np.save(heldout, mixture_small[800:1200])
    ckpt = tmp_path / "m.safetensors"
    result = invoke("fit", data_file, "-o", ckpt, *FAST_FIT)
    assert result.exit_code == 0, result.stderr
    assert ckpt.exists() and "64 Fourier features" in result.stderr  # 32 per column of 2-D data
    out = tmp_path / "s.npy"
    result = invoke("sample", "-c", ckpt, "--n", 300, "-o", out, "--steps", 5)
    assert result.exit_code == 0, result.stderr
    assert np.load(out).shape == (300, 2) and "ended where s ≈ 0" in result.output
    invoke("sample", "-c", ckpt, "--n", 300, "-o", tmp_path / "again.npy", "--steps", 5)
    assert (tmp_path / "again.npy").read_bytes() == out.read_bytes()  # same seed, same file
    invoke("sample", "-c", ckpt, "--n", 50, "-o", tmp_path / "s.csv", "--steps", 2, "--sampler", "precond")
    assert np.loadtxt(tmp_path / "s.csv", delimiter=",").shape == (50, 2)
    report = tmp_path / "metrics.json"
    result = invoke("evaluate", "-c", ckpt, "--data", heldout, "--train", data_file, "--samples", out,
                    "--json", report, "--plot", tmp_path / "plots")
    assert result.exit_code == 0, result.stderr
    metrics = strict_json(report)
    for key in ["c2st", "c2st_ideal", "mmd", "mmd_ideal", "mmd_median", "mmd_median_ideal", "mmd_smoothed_ideal",
                "sliced_wasserstein", "energy_distance", "normaliser", "normaliser_se", "far_share",
                "outside_range_share", "loglik_unnormalised"]:
        assert np.isfinite(metrics[key]), key
    assert metrics["n_samples"] == 300  # every sample is used
    assert "loglik" in metrics and metrics["density_nonpositive_share"] == 0.0
    for name in ["data", "scalar_field", "gradient_field", "samples", "overview"]:
        assert (tmp_path / "plots" / f"{name}.png").stat().st_size > 1000


def test_evaluate_builtin_reports_mode_weights_and_field_error(tiny_checkpoint, tmp_path):
    report = tmp_path / "m.json"
    result = invoke("evaluate", "-c", tiny_checkpoint, "--data", "mixture", "--n", 400, "--steps", 3,
                    "--json", report)
    assert result.exit_code == 0, result.stderr
    metrics = strict_json(report)
    for key in ["mode_weight_error", "mode_weight_error_ideal", "field_error_s", "loglik_true", "trimmed_share"]:
        assert key in metrics
    result = invoke("evaluate", "-c", tiny_checkpoint, "--data", "mixture", "--n", 400, "--steps", 3,
                    "--no-trim", "--json", report, "--force")
    assert result.exit_code == 0, result.stderr
    assert "trimmed_share" not in strict_json(report)


def test_fit_protects_existing_output_and_resumes(tmp_path, data_file):
    ckpt = tmp_path / "m.safetensors"
    invoke("fit", data_file, "-o", ckpt, *FAST_FIT)
    before = ckpt.read_bytes()
    assert_clean_failure(invoke("fit", data_file, "-o", ckpt, *FAST_FIT), "--resume")
    assert ckpt.read_bytes() == before
    assert_clean_failure(invoke("fit", data_file, "-o", ckpt, *FAST_FIT, "--resume"), "already has 20 steps")
    result = invoke("fit", data_file, "-o", ckpt, "--resume", "--steps", "30")
    assert result.exit_code == 0, result.stderr
    assert "30 steps" in " ".join(result.output.split())
    assert_clean_failure(invoke("fit", data_file, "-o", tmp_path / "none.safetensors", "--resume"),
                         "no checkpoint")


@pytest.mark.parametrize("content, message", [
    (np.array([[1.0, np.nan], [2.0, 3.0]]), "NaN or inf"),
    (np.zeros((0, 2)), "empty"),
    (np.zeros((1, 2)), "at least 2 rows"),
    (np.zeros((2, 1, 1, 1, 1)), "expected shape"),
    (np.array(["a", "b"]), "expected numbers"),
    (np.array([None, {}], dtype=object), "pickled"),
])
def test_fit_bad_data(tmp_path, content, message):
    path = tmp_path / "bad.npy"
    np.save(path, content, allow_pickle=True)
    assert_clean_failure(invoke("fit", path, "-o", tmp_path / "m.safetensors", *FAST_FIT), message)
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize("text", ["", "a,b\n"])
def test_fit_an_empty_csv_is_one_clear_line(tmp_path, text):
    """numpy's "input contained no data" warning leaked onto the screen above bdiff's error."""
    path = tmp_path / "empty.csv"
    path.write_text(text)
    with warnings.catch_warnings(record=True) as shown:  # pytest would otherwise keep them off screen
        warnings.simplefilter("always")
        result = invoke("fit", path, "-o", tmp_path / "m.safetensors", *FAST_FIT)
    assert_clean_failure(result, "empty")
    assert not [str(w.message) for w in shown]


@pytest.mark.parametrize("rows", [2, 3, 5])
def test_fit_and_sample_a_table_of_a_few_rows(tmp_path, rows):
    """Two rows are a distribution: fit and sample work without options. Three rows crashed the
    process (SIGFPE: the column judge's five folds left some empty), and two or five stopped at
    "--eps-max must exceed twice ε", an option the user never gave."""
    path, model = tmp_path / "few.npy", tmp_path / "m.safetensors"
    np.save(path, np.random.default_rng(rows).normal(size=(rows, 2)))
    result = invoke("fit", path, "-o", model, *FAST_FIT)
    assert result.exit_code == 0, result.output + result.stderr
    result = invoke("sample", "-c", model, "--n", 50, "-o", tmp_path / "s.npy")
    assert result.exit_code == 0, result.output + result.stderr
    assert np.isfinite(np.load(tmp_path / "s.npy")).all()


@pytest.mark.parametrize("option, message", [
    (["--eps", "0"], "sensible range"), (["--eps", "1e12"], "sensible range"),
    (["--eps", "-1"], "sensible range"), (["--lr", "-0.1"], "--lr"),
    (["--grad-loss", "magic"], "unknown gradient loss"), (["--steps", "0"], "--steps"),
    (["--device", "cuda"], "cuda"), (["--backend", "gpu"], "unknown backend"),
    (["--eps-rule", "magic"], "unknown ε rule"), (["--param", "cubic"], "unknown --param"),
    (["--eps-max", "-1"], "--eps-max"), (["--param", "linear", "--eps-max", "5"], "need log fields"),
    (["--param", "log", "--eps-max", "1e-4"], "must exceed twice"), (["--arch", "tower"], "unknown arch"),
    (["--level-sampling", "cubic"], "unknown --level-sampling"),
    (["--level-sampling", "log-normal", "--eps-max", "0"], "needs noise levels"),
    (["--fourier", "-2"], "--fourier"), (["--fourier", "100000"], "--fourier"),
    (["--query-balance", "1.5"], "--query-balance"), (["--query-balance", "nan"], "--query-balance"),
    (["--power", "log"], "unknown --power"),
])
def test_fit_bad_options(tmp_path, data_file, option, message):
    assert_clean_failure(invoke("fit", data_file, "-o", tmp_path / "m.safetensors", *FAST_FIT, *option),
                         message)


def test_fit_with_query_balance_trains_and_records_it(tmp_path, data_file):
    from bdiff.checkpoint import read_checkpoint
    out = tmp_path / "m.safetensors"
    result = invoke("fit", data_file, "-o", out, *FAST_FIT, "--query-balance", "1")
    assert result.exit_code == 0, result.stderr
    assert read_checkpoint(out)[1]["config"]["query_balance"] == 1.0
    result = invoke("sample", "-c", out, "--n", 50, "-o", tmp_path / "s.npy", "--steps", 5)
    assert result.exit_code == 0, result.stderr


def test_fit_codes_skewed_columns_and_says_so(tmp_path):
    """A table with a skewed column and a heavy-tailed one: fit says which columns it coded and
    how, the checkpoint keeps the coding, and the samples come back in data units."""
    from bdiff.checkpoint import read_checkpoint
    rng = np.random.default_rng(0)
    table = np.column_stack([rng.lognormal(7, 0.9, 600), rng.normal(size=600),
                             rng.standard_t(3, 600)]).astype(np.float32)
    data = tmp_path / "skewed.npy"
    np.save(data, table)
    out = tmp_path / "m.safetensors"
    result = invoke("fit", data, "-o", out, *FAST_FIT)
    assert result.exit_code == 0, result.stderr
    assert "columns coded: 0 (power 0.00)" in result.stderr and "(tail" not in result.stderr
    coding = read_checkpoint(out)[1]["standardizer"]["coding"]
    assert read_checkpoint(out)[1]["config"]["power"] == "on" and coding["power"][1] == coding["tail"][2] == 1
    result = invoke("sample", "-c", out, "--n", 200, "-o", tmp_path / "s.npy", "--steps", 5)
    assert result.exit_code == 0, result.stderr
    assert np.median(np.load(tmp_path / "s.npy")[:, 0]) > 100  # incomes, not their codes
    result = invoke("fit", data, "-o", tmp_path / "plain.safetensors", *FAST_FIT, "--power", "off")
    assert result.exit_code == 0 and "columns coded" not in result.stderr
    result = invoke("fit", data, "-o", tmp_path / "tails.safetensors", *FAST_FIT, "--power", "on")
    assert result.exit_code == 0 and ", 2 (tail " in result.stderr


def test_fit_missing_file_and_unwritable_output(tmp_path, data_file, monkeypatch):
    assert_clean_failure(invoke("fit", tmp_path / "nope.npy"), "no such file")
    assert_clean_failure(invoke("fit", "nonsense"), "built-in")
    assert_clean_failure(invoke("fit", data_file, "-o", tmp_path / "missing" / "m.safetensors", *FAST_FIT),
                         "does not exist")
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(locked) else real_access(p, mode))
    assert_clean_failure(invoke("fit", data_file, "-o", locked / "m.safetensors", *FAST_FIT), "not writable")


def test_sample_bad_input_leaves_existing_output_alone(tmp_path, tiny_checkpoint):
    out = tmp_path / "samples.npy"
    np.save(out, np.arange(3.0))
    before = out.read_bytes()
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(tiny_checkpoint.read_bytes()[:500])
    cases = [
        (["--n", "0"], "positive"), (["--n", "-5"], "positive"),
        (["-c", corrupt], "corrupt or truncated"), (["-c", tmp_path / "none.safetensors"], "no checkpoint"),
        (["--sampler", "magic"], "unknown sampler"), (["--init", "grid"], "unknown --init"),
        (["--steps", "-1"], "--steps"), (["--device", "cuda"], "cuda"),
        (["--sampler", "smc", "--init", "importance"], "does not apply"),
        (["--steps", "0"], "at least one level"), (["--sampler", "anneal", "--steps", "0"], "at least one level"),
    ]
    for args, message in cases:
        args = args if "-c" in args else ["-c", tiny_checkpoint, *args]
        assert_clean_failure(invoke("sample", *args, "-o", out, "--force"), message)
        assert out.read_bytes() == before
    assert_clean_failure(invoke("sample", "-c", tiny_checkpoint, "-o", tmp_path / "no" / "s.npy"),
                         "does not exist")
    assert_clean_failure(invoke("sample", "-c", tiny_checkpoint, "-o", tmp_path / "s.txt"), ".npy or .csv")


def test_evaluate_bad_input(tmp_path, tiny_checkpoint):
    three_d = tmp_path / "three.npy"
    np.save(three_d, np.random.default_rng(0).normal(size=(50, 3)))
    assert_clean_failure(invoke("evaluate", "-c", tiny_checkpoint, "--data", three_d), "3 dimensions")
    assert_clean_failure(invoke("evaluate", "-c", tiny_checkpoint, "--data", "intervals"),
                         "intervals: 1 dimension, but the model was trained on 2")
    assert_clean_failure(invoke("evaluate", "-c", tiny_checkpoint, "--data", tmp_path / "x.npy"), "no such file")
    assert_clean_failure(invoke("evaluate", "-c", tiny_checkpoint, "--data", "mixture", "--samples", three_d),
                         "3 dimensions")
    assert_clean_failure(invoke("evaluate", "-c", tiny_checkpoint, "--data", "mixture", "--json",
                                tmp_path / "no" / "m.json"), "does not exist")


def test_benchmark_writes_json_and_csv(tmp_path):
    result = invoke("benchmark", "--ops", "field_fwd,sde_oracle", "--sizes", "200", "--dims", "2",
                    "--backends", "naive,torch", "--repeats", "1", "--no-compile-check",
                    "--json", tmp_path / "b.json", "--csv", tmp_path / "b.csv")
    assert result.exit_code == 0, result.stderr
    records = json.loads((tmp_path / "b.json").read_text())
    assert {(r["op"], r["backend"]) for r in records} == {
        ("field_fwd", "naive"), ("field_fwd", "torch"), ("sde_oracle", "naive"), ("sde_oracle", "torch")}
    for r in records:
        for key in ["op", "backend", "B", "M", "D", "median_s", "pairs_per_s", "peak_mem_mb", "ratio_vs_naive"]:
            assert key in r
        assert r["median_s"] > 0 and r["pairs_per_s"] > 0
    assert (tmp_path / "b.csv").read_text().startswith("op,backend,B,M,D")


@pytest.mark.parametrize("args, message", [
    (["--ops", "matmul"], "unknown op"), (["--sizes", "ten"], "comma-separated"),
    (["--sizes", "0"], "positive"), (["--backends", "cuda"], "unknown backend"),
    (["--device", "cuda"], "cuda"), (["--json", "/nonexistent/b.json"], "does not exist"),
])
def test_benchmark_bad_options(args, message):
    assert_clean_failure(invoke("benchmark", "--no-compile-check", "--sizes", "64", "--dims", "1",
                                "--repeats", "1", *args), message)


def test_digits_fit_and_evaluate_report_image_metrics(tmp_path):
    model = tmp_path / "digits.safetensors"
    result = invoke("fit", "digits", "-o", model, *FAST_FIT)
    assert result.exit_code == 0, result.output + result.stderr
    assert "heldout" in result.stderr and "noise" in result.stderr and "noise levels 0.0001..137.8" in result.stderr
    assert "could not be estimated to 5 % (64-D)" in result.stderr and "Fourier" not in result.stderr
    images = tmp_path / "images.npy"
    result = invoke("sample", "-c", model, "--n", "50", "-o", images, "--steps", "20")
    assert result.exit_code == 0, result.output + result.stderr
    assert np.load(images).shape == (50, 8, 8)  # image shape restored
    assert "anneal over 20 levels" in result.output  # the default for a model with noise levels
    assert_clean_failure(invoke("sample", "-c", model, "-o", images, "--init", "importance", "--force"),
                         "does not apply")
    metrics = tmp_path / "m.json"
    result = invoke("evaluate", "-c", model, "--n", "300", "--steps", "20", "--json", metrics,
                    "--plot", tmp_path / "plots")
    assert result.exit_code == 0, result.output + result.stderr
    report = strict_json(metrics)
    for key in ("digits_fd", "class_entropy", "mean_confidence", "nn_ratio", "pixel_outside_share",
                "blank_pixel_sd", "blank_pixel_sd_ideal", "pixel_w1", "pixel_w1_ideal"):
        assert np.isfinite(report[key]), key
    # importance sampling cannot pin the field's normaliser down in 64-D, and it says why; the
    # flow density needs none, so the likelihood comes from it
    assert report["loglik_field"] is None and report["normaliser_reliable"] is False
    assert report["density"] == "flow" and np.isfinite(report["loglik"])
    assert (tmp_path / "plots" / "samples.png").exists()


def test_fit_reports_progress_lines_when_piped(tmp_path, data_file, monkeypatch):
    """CliRunner's stderr is not a terminal, like a pipe or a log file: the rich bar is off, so
    plain lines must carry the progress."""
    import bdiff.cli.main as cli
    monkeypatch.setattr(cli, "PLAIN_PROGRESS_SECONDS", 0.0)
    result = invoke("fit", data_file, "-o", tmp_path / "m.safetensors", *FAST_FIT)
    assert result.exit_code == 0, result.stderr
    assert "fit: step 10/20" in result.stderr and "fit: step 20/20" in result.stderr


def test_fit_option_defaults_are_the_config_defaults():
    """One source of defaults: every `bdiff fit` option that names a FitConfig field defaults to it."""
    import typer.main

    from bdiff.trainer import FitConfig
    command = typer.main.get_command(app).commands["fit"]
    defaults = FitConfig()
    checked = 0
    for param in command.params:
        if hasattr(defaults, param.name) and param.name != "device":
            assert param.default == getattr(defaults, param.name), param.name
            checked += 1
    assert checked >= 10


def test_sample_option_defaults_are_the_config_defaults():
    """`bdiff sample` options default to SampleConfig's values, or to None: the model's measured
    defaults (default_sample_config) fill those in."""
    import typer.main

    from bdiff.sampler import SampleConfig
    command = typer.main.get_command(app).commands["sample"]
    defaults = SampleConfig()
    checked = [param.name for param in command.params if hasattr(defaults, param.name)]
    for param in command.params:
        if param.name in checked:
            assert param.default is None or param.default == getattr(defaults, param.name), param.name
    assert {"sampler", "init", "steps", "denoise", "seed", "batch_size", "backend"} <= set(checked)


def test_help_states_the_sampler_trust_thresholds_the_sampler_uses():
    """`sample --help` and `evaluate --help` name SMC's trust thresholds in words (the CLI does
    not import the sampler, so that --help does not load torch): they must be the sampler's."""
    import typer.main

    from bdiff.sampler import PARETO_K_TRUSTED, SMC_MIN_ESS
    commands = typer.main.get_command(app).commands
    sampler_help = next(p.help for p in commands["sample"].params if p.name == "sampler")
    for text in (sampler_help, commands["evaluate"].help):
        text = " ".join(text.split())
        assert f"k̂ > {PARETO_K_TRUSTED}" in text
        assert f"under {round(100 * SMC_MIN_ESS)} %" in text


def test_gpu_benchmark_script_runs_as_a_cpu_smoke_test(tmp_path):
    """benchmarks/gpu.py is for a CUDA machine; on the CPU it must still check every variant it can
    run against float64, say why the others are skipped, and write its JSON and PNG."""
    import subprocess
    import sys
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "gpu.py")
    done = subprocess.run([sys.executable, script, "--device", "cpu", "--sizes", "96", "--dims", "2,16",
                           "--repeats", "1", "--no-end-to-end", "--json", str(tmp_path / "gpu.json"),
                           "--png", str(tmp_path / "gpu.png")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    report = strict_json(tmp_path / "gpu.json")
    checked = {(r["variant"], r["D"]): r for r in report["correctness"]}
    for name in ("naive", "chunked", "torch"):
        for dim in (2, 16):
            assert checked[name, dim]["lse_abs_err"] < 1e-4 and checked[name, dim]["mean_rel_err"] < 1e-4
    timed = {r["variant"]: r for r in report["timings"] if r["D"] == 2}
    assert timed["torch"]["median_s"] > 0 and "CUDA" in timed["sdpa"]["skipped"]
    assert (tmp_path / "gpu.png").stat().st_size > 0


def test_benchmark_compile_check_reports_sass_per_pair(tmp_path):
    """The CPU-side speed proxy through the CLI: every Triton configuration with registers,
    spills, and SASS instructions and shuffles per pair (compiles are cached by Triton)."""
    pytest.importorskip("triton")
    result = invoke("benchmark", "--ops", "sde_step", "--sizes", "64", "--dims", "1", "--backends", "torch",
                    "--repeats", "1", "--json", tmp_path / "b.json")
    assert result.exit_code == 0, result.stderr
    assert "Triton kernels compiled ahead of time" in result.output
    compiled = [r for r in json.loads((tmp_path / "b.json").read_text()) if r["op"] == "compile"]
    rows = [r for r in compiled if r["kernel"] == "field_rows_kernel"]
    assert len(rows) == 16 and all(r["shuffles_per_pair"] == 0 and not r["spills"] for r in rows)


def test_sample_with_smc_reports_its_effective_sample_size(tmp_path, tiny_checkpoint):
    out = tmp_path / "s.npy"
    result = invoke("sample", "-c", tiny_checkpoint, "--n", 120, "-o", out, "--steps", 6, "--sampler", "smc",
                    "--batch-size", 50)
    assert result.exit_code == 0, result.stderr
    assert np.isfinite(np.load(out)).all() and np.load(out).shape == (120, 2)
    share = re.search(r"smc over 6 levels, effective sample size (\d+)%, Pareto-smoothed \(k̂ (-?[0-9.]+)\) "
                      r"before resampling at ε' = ([0-9.e+-]+)", result.output)
    assert share and 0 < int(share.group(1)) <= 100, result.output
    assert -1 < float(share.group(2)) < 2
    model = TrainedModel.load(tiny_checkpoint)
    assert 0.99 * min(4 * model.eps, model.levels[1]) <= float(share.group(3)) <= 1.01 * model.levels[1]


def test_sample_and_evaluate_say_when_smcs_weights_are_not_trusted(tmp_path, tiny_checkpoint, monkeypatch):
    """Pareto k̂ above 0.7: the smoothed weights still rest on a few particles (Vehtari et al.),
    so the particles keep annealing's draws, and the user is told."""
    from bdiff import sampler as sampler_module
    monkeypatch.setattr(sampler_module, "_pareto_smoothed", lambda log_w: (log_w.double(), 0.93))
    result = invoke("sample", "-c", tiny_checkpoint, "--n", 60, "-o", tmp_path / "s.npy", "--steps", 6,
                    "--sampler", "smc")
    assert result.exit_code == 0, result.stderr
    assert "k̂ 0.93" in result.output
    assert "warning: SMC's importance weights were not trusted for 100% of the particles" in result.stderr
    result = invoke("evaluate", "-c", tiny_checkpoint, "--data", "mixture", "--n", 60, "--steps", 6,
                    "--sampler", "smc", "--json", tmp_path / "m.json")
    assert result.exit_code == 0, result.stderr
    assert "warning: SMC's importance weights were not trusted" in result.stderr
    metrics = strict_json(tmp_path / "m.json")
    assert metrics["pareto_k"] == 0.93 and 0 < metrics["final_ess"] <= 1 and metrics["corrected_share"] == 0


def test_sample_reports_its_trimmed_share_and_no_trim_keeps_every_particle(tmp_path, tiny_checkpoint):
    """Trimmed particles are drawn again, so both give n samples; only --trim says how many."""
    said = {}
    for flag in ("--trim", "--no-trim"):
        out = tmp_path / f"{flag}.npy"
        result = invoke("sample", "-c", tiny_checkpoint, "--n", 300, "-o", out, "--steps", 8, flag)
        assert result.exit_code == 0, result.stderr
        assert np.load(out).shape == (300, 2) and np.isfinite(np.load(out)).all()
        said[flag] = result.output
    assert re.search(r"\d+\.\d+ % drawn again below the density of the data's lowest 0\.1 %", said["--trim"])
    assert "drawn again" not in said["--no-trim"]


@pytest.mark.parametrize("setting, expected", [("1", 1), (None, os.cpu_count())])
def test_commands_use_every_core_unless_omp_num_threads_says_otherwise(tiny_checkpoint, monkeypatch,
                                                                       setting, expected):
    """A user running several jobs at once sets OMP_NUM_THREADS; a command that took every core
    anyway would oversubscribe them."""
    import torch
    threads = torch.get_num_threads()
    if setting is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", setting)
    try:
        torch.set_num_threads(3)
        result = invoke("sample", "-c", tiny_checkpoint, "--n", 50, "--steps", 3, "-o", "s.npy")
        assert result.exit_code == 0, result.stderr
        assert torch.get_num_threads() == expected
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("args", [["sample", "-o", "{existing}"], ["sample", "--n", "0"],
                                  ["fit", "{missing}", "-o", "{fresh}"], ["fit", "{data}", "-o", "{existing}"]])
def test_bad_paths_and_counts_are_refused_before_torch_is_imported(tmp_path, data_file, args):
    """An existing --output, a missing data file or --n 0 is refused before torch is imported
    (2-3 s of every command on a 2-core machine): the answer comes at once."""
    import subprocess
    import sys
    existing = tmp_path / "exists.npy"
    np.save(existing, np.zeros((2, 2)))
    paths = dict(existing=existing, missing=tmp_path / "missing.npy", fresh=tmp_path / "m.safetensors",
                 data=data_file)
    args = [arg.format(**paths) for arg in args]
    if args[0] == "fit" and args[-1] == str(existing):
        args[-1] = str(tmp_path / "exists.safetensors")
        (tmp_path / "exists.safetensors").write_bytes(b"")
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom bdiff.cli.main import app\n"
            f"result = CliRunner().invoke(app, {args!r})\nprint(result.exit_code, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["2", "False"], done.stdout + done.stderr


def test_sample_says_where_the_anneal_ended_when_fit_raised_it():
    from cli.main import _sampler_text
    report = {"sampler": "smc", "steps": 200, "levels": [1e-4, 4.0], "end_level": 1e-4}
    assert "ending" not in _sampler_text(report)
    assert "ending at 0.0192, not ε_min" in _sampler_text({**report, "end_level": 0.0192})

"""Triton kernels under TRITON_INTERPRET=1 (set in conftest.py) against float64 references,
and the ahead-of-time sm_80/sm_90 compile check: no register spills."""
import pytest
import torch

pytest.importorskip("triton")

from conftest import random_case  # noqa: E402

from bdiff.kernels import field_matching_reference, sde_step_reference  # noqa: E402
from bdiff.kernels.triton_field import field_matching_triton  # noqa: E402
from bdiff.kernels.triton_sde import oracle_sde_step_triton, sde_step_triton  # noqa: E402




@pytest.mark.parametrize("dim", [1, 2, 3, 17, 64])
@pytest.mark.parametrize("excluded", [False, True])
def test_field_matching_forward(dim, excluded):
    x, y = random_case(45, 71, dim)  # neither a multiple of the 32-wide blocks
    exclude = torch.randint(-1, 71, (45,), generator=torch.Generator().manual_seed(2)) if excluded else None
    lse, mean = field_matching_triton(x, y, 0.5 * dim, exclude)
    ref_lse, ref_mean = field_matching_reference(x, y, 0.5 * dim, exclude)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dim", [2, 17])
@pytest.mark.parametrize("excluded", [False, True])
def test_one_eps_per_row_in_one_launch(dim, excluded):
    """Rows of several noise levels in one launch give what a launch per level gives, with the
    log-sum-exp's gradient."""
    x, y = random_case(45, 71, dim, seed=6)
    levels = torch.tensor([0.05, 0.4, 2.0]) * dim
    row_eps = levels[torch.arange(45) % 3]
    exclude = torch.randint(-1, 71, (45,), generator=torch.Generator().manual_seed(2)) if excluded else None
    x = x.requires_grad_()
    lse, mean = field_matching_triton(x, y, row_eps, exclude)
    (grad,) = torch.autograd.grad(lse.sum(), x)
    x64 = x.detach().double().requires_grad_()
    ref_lse, ref_mean = field_matching_reference(x64, y, row_eps, exclude)
    (ref_grad,) = torch.autograd.grad(ref_lse.sum(), x64)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-3, atol=1e-3 * ref_grad.abs().max().item())


@pytest.mark.parametrize("eps", [1e-4, 1e4])
def test_tiny_and_huge_bandwidth(eps):
    x, y = random_case(37, 53, 3, seed=4)
    lse, mean = field_matching_triton(x, y, eps)
    ref_lse, ref_mean = field_matching_reference(x, y, eps)
    assert torch.isfinite(lse).all() and torch.isfinite(mean).all()
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-4, atol=1e-3)
    nonzero = ref_mean.abs() > 1e-6
    assert (mean.abs()[nonzero] > 0).all()  # no all-zero rows where float64 is non-zero


def test_self_exclusion_with_all_other_points_far():
    y = torch.tensor([[0.0, 0.0], [30.0, 0.0], [0.0, 40.0]])
    lse, mean = field_matching_triton(y, y, 0.01, torch.arange(3))
    ref_lse, ref_mean = field_matching_reference(y, y, 0.01, torch.arange(3))
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-2)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize("dim", [2, 17])
def test_lse_gradient_matches_float64_and_the_mean_is_not_differentiable(dim):
    """Gradients flow through the log-sum-exp only (its exact gradient is the weighted mean);
    the mean says so by not requiring grad, rather than returning a silent zero."""
    x, y = random_case(39, 50, dim)
    exclude = torch.arange(39)
    x32 = x.clone().requires_grad_()
    lse, mean = field_matching_triton(x32, y, 0.8 * dim, exclude)
    assert not mean.requires_grad
    lse.sum().backward()
    x64 = x.double().requires_grad_()
    field_matching_reference(x64, y.double(), 0.8 * dim, exclude)[0].sum().backward()
    torch.testing.assert_close(x32.grad.double(), x64.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dim", [1, 2, 3, 8])
@pytest.mark.parametrize("splits", [2, 3, 50])
def test_references_split_over_the_grid_merge_exactly(dim, splits):
    """Small D: the references shared among programs and merged by log-sum-exp give the same
    result as one program; more shares than tiles of references is allowed."""
    x, y = random_case(150, 77, dim, seed=8)  # 150 rows: two row blocks, the second part-filled
    exclude = torch.randint(-1, 77, (150,), generator=torch.Generator().manual_seed(3))
    lse, mean = field_matching_triton(x, y, 0.3 * dim, exclude, splits=splits)
    ref_lse, ref_mean = field_matching_reference(x, y, 0.3 * dim, exclude)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-4, atol=1e-4)


def _noise(n, dim, seed, step, offset=0):
    """The kernel's own noise, read back through a step with s = 1, g = 0, h = 1."""
    return sde_step_triton(torch.zeros(n, dim), torch.ones(n), torch.zeros(n, dim), 1.0, seed, step, offset)


def test_sde_noise_is_standard_reproducible_and_split_invariant():
    noise = _noise(6000, 3, seed=1, step=0)
    assert abs(noise.mean().item()) < 0.03 and abs(noise.std().item() - 1) < 0.03
    assert abs(torch.corrcoef(noise.T)[0, 1].item()) < 0.05
    assert torch.equal(noise, _noise(6000, 3, 1, 0))
    assert not torch.equal(noise, _noise(6000, 3, 1, 1))
    halves = torch.cat([_noise(2500, 3, 1, 0, 0), _noise(3500, 3, 1, 0, 2500)])
    assert torch.equal(noise, halves)  # independent of how particles are batched


@pytest.mark.parametrize("delta", [None, 0.05])
def test_sde_step_matches_reference(delta):
    x, g = random_case(301, 301, 3)
    s = torch.linspace(-1.0, 2.0, 301)
    noise = _noise(301, 3, seed=7, step=3)
    out = sde_step_triton(x, s, g, 0.01, 7, 3, 0, delta)
    torch.testing.assert_close(out.double(), sde_step_reference(x, s, g, noise, 0.01, delta),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dim", [1, 3])
def test_fused_oracle_step_matches_reference(dim):
    x, refs = random_case(67, 45, dim)
    log_c, h = 0.3, 0.02
    out = oracle_sde_step_triton(x, refs, 0.5, log_c, 0.0, h, 9, 1, 0, 0.1)
    lse, mean = field_matching_reference(x, refs, 0.5)
    s = torch.exp(lse - log_c)
    expected = sde_step_reference(x, s, s[:, None] * mean, _noise(67, dim, 9, 1), h, 0.1)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)


def test_dispatch_uses_triton_when_asked():
    from bdiff.backend import field_matching, resolve
    assert resolve("triton", "cpu") == "triton"
    x, y = random_case(20, 30, 2)
    lse, _ = field_matching(x, y, 0.5, None, "triton")
    torch.testing.assert_close(lse.double(), field_matching_reference(x, y, 0.5)[0], rtol=1e-5, atol=1e-5)


def test_every_launch_configuration_compiles_for_sm80_and_sm90_without_spills():
    from bdiff.compile_check import compile_all, launch_configurations
    records = compile_all()
    assert len(records) == 2 * len(launch_configurations())
    assert {r["sm"] for r in records} == {80, 90}
    spilled = [(r["kernel"], r["sm"], r["config"]) for r in records if r["spills"]]
    assert not spilled, spilled
    assert all(0 < r["registers"] <= 255 for r in records)
    # the small-D layout keeps every reduction inside a thread; D = 2 within 20 SASS
    # instructions a pair as launched (the 32 x 32 tile layout it replaced needed 66 and 20
    # shuffles, compiled without the launch's alignment hints)
    for record in records:
        if record["kernel"] in ("field_rows_kernel", "oracle_sde_step_kernel"):
            assert record["shuffles_per_pair"] == 0, record
        if record["kernel"] == "field_rows_kernel" and record["config"]["BLOCK_D"] == 2:
            assert record["instructions_per_pair"] <= 20, record
    # the per-step seed and the batch offset must not trigger recompiles mid-run
    for record in records:
        if record["kernel"] == "sde_step_kernel":
            assert {"seed", "first_elem"} <= set(record["not_specialised"])
        if record["kernel"] == "oracle_sde_step_kernel":
            assert {"seed", "first_row"} <= set(record["not_specialised"])


def test_fit_sample_and_evaluate_run_on_the_triton_backend(tmp_path, monkeypatch, mixture_small):
    """The whole user path on the Triton kernels (interpreted here, CUDA on a GPU): fit, sample
    and evaluate through the CLI with BDIFF_BACKEND=triton, every field reduction and SDE step
    launched through Triton, and the trained weights where the torch backend's are."""
    import numpy as np

    import bdiff.kernels.triton_field as triton_field
    import bdiff.kernels.triton_sde as triton_sde
    from bdiff.checkpoint import read_checkpoint
    from test_cli import FAST_FIT, invoke, strict_json
    launches = {"field": 0, "sde": 0}

    def counted(kind, kernel):
        def launch(*args, **kwargs):
            launches[kind] += 1
            return kernel(*args, **kwargs)
        return launch

    monkeypatch.setattr(triton_field, "field_matching_triton", counted("field", triton_field.field_matching_triton))
    monkeypatch.setattr(triton_sde, "sde_step_triton", counted("sde", triton_sde.sde_step_triton))
    monkeypatch.setattr(triton_sde, "oracle_sde_step_triton", counted("sde", triton_sde.oracle_sde_step_triton))
    # the interpreter runs a tile in milliseconds: the normaliser's importance sample shrinks
    import bdiff.density
    import bdiff.metrics
    full_normaliser = bdiff.density.normaliser
    for module in (bdiff.density, bdiff.metrics):
        monkeypatch.setattr(module, "normaliser", lambda *args, **kw: full_normaliser(*args, **{**kw, "n": 512}))
    np.save(tmp_path / "train.npy", mixture_small[:300])
    np.save(tmp_path / "heldout.npy", mixture_small[1000:1080])
    stored = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("BDIFF_BACKEND", backend)
        model = tmp_path / f"{backend}.safetensors"
        fit = invoke("fit", tmp_path / "train.npy", "-o", model, *FAST_FIT)
        assert fit.exit_code == 0, fit.stderr
        stored[backend] = read_checkpoint(str(model))
    assert launches["field"] > 20  # the ε search, log C, validation targets and every step's targets
    (torch_weights, torch_meta), (triton_weights, triton_meta) = stored["torch"], stored["triton"]
    assert triton_meta["eps"] == torch_meta["eps"]
    assert triton_meta["log_c"] == pytest.approx(torch_meta["log_c"], rel=1e-5)
    for name, weight in torch_weights.items():  # 20 steps on targets equal to fp32 rounding
        if name.startswith("model."):
            torch.testing.assert_close(triton_weights[name], weight, rtol=1e-3, atol=1e-3)
    fitted = tmp_path / "triton.safetensors"
    for sampler in ("anneal", "bellman"):
        result = invoke("sample", "-c", fitted, "--n", 150, "--steps", 8, "--sampler", sampler,
                        "--init", "gaussian", "-o", tmp_path / f"{sampler}.npy")
        assert result.exit_code == 0, result.stderr
        assert np.isfinite(np.load(tmp_path / f"{sampler}.npy")).all()
    assert launches["sde"] > 0
    result = invoke("evaluate", "-c", fitted, "--data", tmp_path / "heldout.npy", "--train",
                    tmp_path / "train.npy", "--n", 150, "--steps", 8, "--json", tmp_path / "m.json")
    assert result.exit_code == 0, result.stderr
    metrics = strict_json(tmp_path / "m.json")
    assert metrics["n_samples"] == 150 and metrics["mmd"] is not None

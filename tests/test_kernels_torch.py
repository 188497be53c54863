"""The torch field-matching paths and the SDE step against their float64 reference twins."""
import pytest
import torch
from conftest import random_case

from bdiff.kernels import (field_matching_chunked, field_matching_naive, field_matching_reference,
                           field_matching_torch, sde_step_reference, sde_step_torch)
from bdiff.kernels.torch_path import sde_noise

FAST_PATHS = [field_matching_torch, field_matching_chunked, field_matching_naive]




@pytest.mark.parametrize("impl", FAST_PATHS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("dim", [1, 2, 3, 17, 64])
@pytest.mark.parametrize("excluded", [False, True])
def test_field_matching_matches_float64(impl, dim, excluded):
    x, y = random_case(133, 257, dim)
    eps = 0.5 * dim  # keeps the softmax neither one-hot nor flat at every D
    exclude = torch.randint(-1, 257, (133,), generator=torch.Generator().manual_seed(1)) if excluded else None
    lse, mean = impl(x, y, eps, exclude)
    ref_lse, ref_mean = field_matching_reference(x, y, eps, exclude)
    assert lse.shape == (133,) and mean.shape == (133, dim)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-3, atol=1e-3 * ref_mean.abs().max().item())


@pytest.mark.parametrize("impl", FAST_PATHS + [field_matching_reference], ids=lambda f: f.__name__)
@pytest.mark.parametrize("excluded", [False, True])
def test_no_queries_give_empty_fields(impl, excluded):
    """An empty fold of a tiny table asks about no rows: the answer is empty. The CPU flash
    attention op raised SIGFPE on zero rows and killed the process (`bdiff fit` on 3 rows)."""
    _, y = random_case(1, 7, 3)
    exclude = torch.zeros(0, dtype=torch.long) if excluded else None
    lse, mean = impl(torch.zeros(0, 3), y, 0.5, exclude)
    assert lse.shape == (0,) and mean.shape == (0, 3)


@pytest.mark.parametrize("impl", FAST_PATHS + [field_matching_reference], ids=lambda f: f.__name__)
@pytest.mark.parametrize("dim", [1, 3, 17])
@pytest.mark.parametrize("excluded", [False, True])
def test_one_eps_per_row_equals_one_call_per_eps(impl, dim, excluded):
    """Rows of several noise levels in one call give what a call per level gives."""
    x, y = random_case(133, 257, dim, seed=5)
    levels = torch.tensor([0.05, 0.4, 2.0, 9.0]) * dim
    row_eps = levels[torch.arange(133) % 4]
    exclude = torch.randint(-1, 257, (133,), generator=torch.Generator().manual_seed(1)) if excluded else None
    lse, mean = impl(x, y, row_eps, exclude)
    for level in levels:
        rows = row_eps == level
        ref_lse, ref_mean = field_matching_reference(x[rows], y, float(level),
                                                     None if exclude is None else exclude[rows])
        torch.testing.assert_close(lse[rows].double(), ref_lse, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(mean[rows].double(), ref_mean, rtol=1e-3,
                                   atol=1e-3 * ref_mean.abs().max().item())


@pytest.mark.parametrize("impl", FAST_PATHS, ids=lambda f: f.__name__)
def test_self_exclusion_drops_exactly_the_own_point(impl):
    y = torch.tensor([[0.0], [10.0], [20.0]])
    lse, mean = impl(y, y, 1.0, torch.arange(3))
    # with itself excluded, point 0 sees only points 10 and 20 away
    ref_lse, _ = field_matching_reference(y, y, 1.0, torch.arange(3))
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-4)
    assert mean[0, 0] == pytest.approx(10.0, rel=1e-4)  # pulled towards its neighbour at 10


@pytest.mark.parametrize("eps", [1e-3, 1e3])
def test_extreme_bandwidths_stay_finite(eps):
    x, y = random_case(61, 97, 3, seed=3)
    lse, mean = field_matching_torch(x, y, eps)
    ref_lse, ref_mean = field_matching_reference(x, y, eps)
    assert torch.isfinite(lse).all() and torch.isfinite(mean).all()
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-3, atol=2e-2)


def test_chunked_path_gradcheck_float64():
    x, y = random_case(23, 31, 3)
    x = x.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda q: field_matching_chunked(q, y.double(), 0.7, torch.arange(23)), (x,))


@pytest.mark.parametrize("dim", [2, 17])
def test_fused_path_gradient_matches_reference(dim):
    x, y = random_case(45, 71, dim)
    weights = torch.randn(45, dim)

    def objective(impl, q):
        lse, mean = impl(q, y.to(q.dtype), 1.3, torch.arange(45))
        return lse.sum() + (mean * weights.to(q.dtype)).sum()

    x32 = x.clone().requires_grad_()
    objective(field_matching_torch, x32).backward()
    x64 = x.double().requires_grad_()
    objective(field_matching_reference, x64).backward()
    torch.testing.assert_close(x32.grad.double(), x64.grad, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("delta", [None, 0.05])
def test_sde_step_matches_reference(delta):
    x, g = random_case(37, 37, 3)
    s = torch.linspace(-0.5, 2.0, 37)  # negative s must be clamped to 0
    out = sde_step_torch(x, s, g, 0.01, seed=5, step=2, offset=0, delta=delta)
    noise = sde_noise(x.shape, 5, 2, 0, x.device)
    ref = sde_step_reference(x, s, g, noise, 0.01, delta)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


def test_sde_noise_reproducible_and_standard():
    a = sde_noise((4000, 3), 1, 7, 0, "cpu")
    assert torch.equal(a, sde_noise((4000, 3), 1, 7, 0, "cpu"))
    assert not torch.equal(a, sde_noise((4000, 3), 1, 8, 0, "cpu"))
    assert abs(a.mean().item()) < 0.03 and abs(a.std().item() - 1) < 0.03


def test_with_own_kernel_equals_the_targets_without_exclusion():
    """The level models' score target: the leave-one-out reduction plus each query's own row
    gives the reduction over every row, at one ε per query."""
    from bdiff.losses import with_own_kernel
    g = torch.Generator().manual_seed(3)
    refs, queries = torch.randn(37, 3, generator=g).double(), torch.randn(23, 3, generator=g).double()
    eps = torch.rand(23, generator=g).double() * 0.5 + 1e-3
    exclude = torch.randint(-1, 37, (23,), generator=g)
    queries[:5] = refs[exclude[:5].clamp_min(0)]  # queries on their own row
    lse, score = field_matching_reference(queries, refs, eps, exclude)
    _, expected = field_matching_reference(queries, refs, eps)
    assert torch.allclose(with_own_kernel(queries, refs, eps, exclude, lse, score), expected, atol=1e-9)


def test_sde_noise_streams_do_not_collide_across_steps_and_offsets():
    """A seed built as (seed · a + step) · b + offset gave step k at offset b the stream of
    step k + 1 at offset 0: two batches of one run would share their noise."""
    assert not torch.equal(sde_noise((8, 2), 0, 1, 0, "cpu"), sde_noise((8, 2), 0, 0, 1_000_033, "cpu"))

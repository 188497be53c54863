"""Triton Euler-Maruyama steps of the Bellman SDE with in-kernel Philox noise.

Noise for element (particle i, coordinate d) at a step comes from tl.randn(step_seed,
i·D + d): a counter-based stream, so results do not depend on block size or on how the
particles are split into batches.
"""
import math

import torch
import triton
import triton.language as tl

from .triton_field import SMALL_D, _online_softmax, small_d_warps


@triton.jit
def _advance(x, s, g, noise, h, sqrt_h, delta, PRECOND: tl.constexpr):
    p = tl.maximum(s, 0.0)
    if PRECOND:
        # a = 1/(p + δ): drift a∇p + ½p∇a = g (p + 2δ) / (2 (p + δ)²), diffusion sqrt(p/(p + δ))
        drift = g * (p + 2.0 * delta) / (2.0 * (p + delta) * (p + delta))
        diffusion = tl.sqrt(p / (p + delta))
    else:
        drift = g
        diffusion = tl.sqrt(p)
    return x + h * drift + sqrt_h * diffusion * noise


# seeds and offsets change every step and batch: specialising on them (value 1, multiples
# of 16) would recompile the kernel mid-run
@triton.jit(do_not_specialize=["seed", "first_elem"])
def sde_step_kernel(x_ptr, s_ptr, g_ptr, out_ptr, n_elem, D, h, sqrt_h, delta, seed,
                    first_elem, PRECOND: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n_elem
    x = tl.load(x_ptr + idx, mask=mask, other=0.0)
    g = tl.load(g_ptr + idx, mask=mask, other=0.0)
    s = tl.load(s_ptr + idx // D, mask=mask, other=0.0)
    noise = tl.randn(seed, first_elem + idx)
    tl.store(out_ptr + idx, _advance(x, s, g, noise, h, sqrt_h, delta, PRECOND), mask=mask)


@triton.jit(do_not_specialize=["seed", "first_row"])
def oracle_sde_step_kernel(x_ptr, y_ptr, out_ptr, B, M, D, inv_eps, log_norm, s_floor,
                           h, sqrt_h, delta, seed, first_row, stride_x, stride_y,
                           PRECOND: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_D: tl.constexpr):
    """The exact smoothed fields against the references Y and one SDE step, in one launch."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    ds = tl.arange(0, BLOCK_D)
    # small D: no squared norms or exclusions (their pointers are placeholders)
    running_max, total, acc = _online_softmax(x_ptr, y_ptr, x_ptr, y_ptr, x_ptr, rows, ds, B, M, D,
                                              inv_eps, stride_x, stride_y, False, False, BLOCK_B,
                                              BLOCK_M, BLOCK_D, 16, BLOCK_D, "ieee")
    safe_total = tl.maximum(total, 1e-30)
    s = tl.exp(running_max + tl.log(safe_total) - log_norm)
    s = tl.where((total > 0) & (s > s_floor), s, 0.0)
    mask = (rows[:, None] < B) & (ds[None, :] < D)
    x = tl.load(x_ptr + rows[:, None] * stride_x + ds[None, :], mask=mask, other=0.0)
    g = s[:, None] * (acc / safe_total[:, None] - x) * inv_eps
    noise = tl.randn(seed, (first_row + rows[:, None]) * D + ds[None, :])
    out = _advance(x, s[:, None], g, noise, h, sqrt_h, delta, PRECOND)
    tl.store(out_ptr + rows[:, None] * D + ds[None, :], out, mask=mask)


SDE_BLOCK = 1024
ORACLE_BLOCKS = dict(BLOCK_B=32, BLOCK_M=32)


def step_seed(seed, step):
    """One 31-bit Philox seed per (run seed, step)."""
    return (seed * 1_000_003 + step * 7_919 + 1) % (2**31 - 1)


def sde_step_triton(x, s, g, h, seed, step, offset=0, delta=None):
    x, s, g = x.contiguous().float(), s.contiguous().float(), g.contiguous().float()
    out = torch.empty_like(x)
    n_elem = x.numel()
    sde_step_kernel[(triton.cdiv(n_elem, SDE_BLOCK),)](
        x, s, g, out, n_elem, x.shape[1], h, h**0.5, 0.0 if delta is None else delta,
        step_seed(seed, step), offset * x.shape[1], PRECOND=delta is not None, BLOCK=SDE_BLOCK)
    return out


def oracle_sde_step_triton(x, refs, eps, log_c, s_floor, h, seed, step, offset=0, delta=None):
    """Fused oracle step for D ≤ SMALL_D; the caller falls back to two launches above that."""
    x, refs = x.contiguous().float(), refs.contiguous().float()
    batch, dim = x.shape
    assert dim <= SMALL_D, "the fused oracle step covers small D only"
    out = torch.empty_like(x)
    block_d = triton.next_power_of_2(dim)
    log_norm = log_c + math.log(refs.shape[0])
    oracle_sde_step_kernel[(triton.cdiv(batch, ORACLE_BLOCKS["BLOCK_B"]),)](
        x, refs, out, batch, refs.shape[0], dim, 1.0 / eps, log_norm, s_floor, h, h**0.5,
        0.0 if delta is None else delta, step_seed(seed, step), offset, x.stride(0),
        refs.stride(0), PRECOND=delta is not None, BLOCK_D=block_d,
        num_warps=small_d_warps(block_d), **ORACLE_BLOCKS)
    return out

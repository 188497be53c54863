"""Triton Euler-Maruyama steps of the Bellman SDE with in-kernel Philox noise.

Noise for element (particle i, coordinate d) at a step comes from tl.randn(step_seed,
i·D + d): a counter-based stream, so results do not depend on block size or on how the
particles are split into batches.
"""
import math

import torch
import triton
import triton.language as tl

from .triton_field import LOG2_E, ROWS_BLOCKS, ROWS_WARPS, SMALL_D, padded_transpose, rows_online_softmax


HALF_LOG2_E = tl.constexpr(0.5 * LOG2_E)


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
def oracle_sde_step_kernel(x_ptr, yt_ptr, out_ptr, B, M_PAD, D, inv_eps, log2_norm, s_floor,
                           h, sqrt_h, delta, seed, first_row, stride_x, PRECOND: tl.constexpr,
                           BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """The exact smoothed fields against the references (yt: Y transposed and padded, as for
    field_rows_kernel) and one SDE step, in one launch: one particle per thread."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    ds = tl.arange(0, BLOCK_D)
    neg_scale = tl.full((BLOCK_B,), -HALF_LOG2_E * inv_eps, dtype=tl.float32)  # log2(e)/(2ε)
    running_max, total, acc = rows_online_softmax(x_ptr, yt_ptr, x_ptr, rows, neg_scale, B, M_PAD, D,
                                                  stride_x, 0, M_PAD, False, BLOCK_B, BLOCK_M, BLOCK_D)
    safe_total = tl.maximum(total, 1e-30)
    s = tl.exp2(running_max + tl.log2(safe_total) - log2_norm)
    s = tl.where((total > 0) & (s > s_floor), s, 0.0)
    mask = (ds[:, None] < D) & (rows[None, :] < B)
    x = tl.load(x_ptr + rows[None, :] * stride_x + ds[:, None], mask=mask, other=0.0)
    g = s[None, :] * (acc / safe_total[None, :] - x) * inv_eps
    noise = tl.randn(seed, (first_row + rows[None, :]) * D + ds[:, None])
    out = _advance(x, s[None, :], g, noise, h, sqrt_h, delta, PRECOND)
    tl.store(out_ptr + rows[None, :] * D + ds[:, None], out, mask=mask)


SDE_BLOCK = 512  # 1024 spilled 4 bytes on sm_80 once aligned launches vectorise the loads


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
    yt = padded_transpose(refs, ROWS_BLOCKS["BLOCK_M"])
    log2_norm = (log_c + math.log(refs.shape[0])) * LOG2_E
    oracle_sde_step_kernel[(triton.cdiv(batch, ROWS_BLOCKS["BLOCK_B"]),)](
        x, yt, out, batch, yt.shape[1], dim, 1.0 / eps, log2_norm, s_floor, h,
        h**0.5, 0.0 if delta is None else delta, step_seed(seed, step), offset, x.stride(0),
        PRECOND=delta is not None, BLOCK_D=triton.next_power_of_2(dim), num_warps=ROWS_WARPS,
        **ROWS_BLOCKS)
    return out

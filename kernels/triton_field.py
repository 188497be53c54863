"""Fused Triton field matching: log-sum-exp of -‖x - y‖²/(2ε) and the softmax-weighted mean of
y per query, one pass over Y with a running max (flash-attention style), ε per query row.

Two layouts, chosen by measurement of the compiled SASS (NOTES.md):
- D ≤ SMALL_D, one query row per thread. Each thread walks the references BLOCK_M at a time in
  its own registers, so no reduction crosses lanes (no shuffles), with exp2 and the scale
  log2(e)/(2ε) folded into one FMA per pair. Y is passed transposed and padded with far points,
  so the loads are unmasked and vectorised. The references can be split over a second grid
  axis, each program a contiguous share, merged by log-sum-exp: small batches fill the GPU.
- D > SMALL_D, 32 x 32 tiles with tl.dot on x·y - ½‖y‖² - ½‖x‖² at an explicit input precision
  (the GPU default would be TF32); value dimensions beyond BLOCK_DV split over a second axis.

Memory is O((B + M)·D); no atomics, so results are deterministic. Gradients flow through the
log-sum-exp only (d lse/dx is the weighted mean, exact); the engine computes its training
targets without gradients, so no backward kernel is kept.
"""
import functools
import math

import torch
import triton
import triton.language as tl

from .torch_path import attach_lse_gradient, eps_column, reference_counts

SMALL_D = 8
# A finite "minus infinity" keeps exp(m_old - m_new) well defined when a whole tile is masked.
NEG_BIG = tl.constexpr(-1.0e30)
FAR = 1.0e15  # coordinate of padding references: 2^(-scale·1e30) is exactly 0 for any ε in use
ROWS_BLOCKS, ROWS_WARPS = dict(BLOCK_B=128, BLOCK_M=16), 4  # one query row per thread
LOG2_E = 1.4426950408889634


@triton.jit
def rows_online_softmax(x_ptr, yt_ptr, excl_ptr, rows, neg_scale, B, M_PAD, D, stride_x, first, last,
                        HAS_EXCLUDE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_D: tl.constexpr):
    """The one online-softmax loop of the small-D kernels, over references [first, last):
    per row the running max of l = -scale·‖x - y‖² (log2 units), Σ 2^(l - max) and
    Σ 2^(l - max) y as a (BLOCK_D, BLOCK_B) block. yt: Y transposed, (D, M_PAD)."""
    row_ok = rows < B
    ds = tl.arange(0, BLOCK_D)
    if HAS_EXCLUDE:
        excluded = tl.load(excl_ptr + rows, mask=row_ok, other=-1)
    running_max = tl.full((BLOCK_B,), NEG_BIG, dtype=tl.float32)
    total = tl.zeros((BLOCK_B,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_D, BLOCK_B), dtype=tl.float32)
    for start in range(first, last, BLOCK_M):
        cols = start + tl.arange(0, BLOCK_M)
        dist = tl.zeros((BLOCK_M, BLOCK_B), dtype=tl.float32)
        for d in tl.static_range(BLOCK_D):
            # `rows * 0 + d` keeps the mask a tensor (the interpreter rejects a scalar bool)
            x_d = tl.load(x_ptr + rows * stride_x + d, mask=row_ok & (rows * 0 + d < D), other=0.0)
            y_d = tl.load(yt_ptr + d * M_PAD + cols)
            diff = y_d[:, None] - x_d[None, :]
            dist += diff * diff
        if HAS_EXCLUDE:
            dist = tl.where(cols[:, None] == excluded[None, :], float("inf"), dist)
        new_max = tl.maximum(running_max, neg_scale * tl.min(dist, axis=0))
        rescale = tl.exp2(running_max - new_max)
        p = tl.exp2(dist * neg_scale[None, :] - new_max[None, :])
        total = total * rescale + tl.sum(p, axis=0)
        acc = acc * rescale[None, :]
        for d in tl.static_range(BLOCK_D):
            y_d = tl.load(yt_ptr + d * M_PAD + cols)
            acc += tl.where(ds[:, None] == d, tl.sum(p * y_d[:, None], axis=0)[None, :], 0.0)
        running_max = new_max
    return running_max, total, acc


@triton.jit
def field_rows_kernel(x_ptr, yt_ptr, excl_ptr, scale_ptr, max_ptr, total_ptr, acc_ptr, B, M_PAD, D,
                      stride_x, split_len, HAS_EXCLUDE: tl.constexpr, BLOCK_B: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Small D: one program per (block of rows, share of the references); writes its partial
    max, total and weighted sum of y for the merge."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    split = tl.program_id(1)
    first = split * split_len
    last = tl.minimum(first + split_len, M_PAD)
    row_ok = rows < B
    neg_scale = -tl.load(scale_ptr + rows, mask=row_ok, other=1.0)
    running_max, total, acc = rows_online_softmax(x_ptr, yt_ptr, excl_ptr, rows, neg_scale, B, M_PAD, D,
                                                  stride_x, first, last, HAS_EXCLUDE, BLOCK_B, BLOCK_M,
                                                  BLOCK_D)
    ds = tl.arange(0, BLOCK_D)
    tl.store(max_ptr + split * B + rows, running_max, mask=row_ok)
    tl.store(total_ptr + split * B + rows, total, mask=row_ok)
    tl.store(acc_ptr + split * D * B + ds[:, None] * B + rows[None, :], acc,
             mask=(ds[:, None] < D) & row_ok[None, :])


@triton.jit
def _logits_tile(x_ptr, y_ptr, xsq_ptr, ysq_ptr, excl_ptr, rows, cols, B, M, D, inv_eps,
                 stride_x, stride_y, HAS_EXCLUDE: tl.constexpr, BLOCK_K: tl.constexpr,
                 PRECISION: tl.constexpr):
    """Logits -‖x_i - y_j‖²/(2ε) for a (BLOCK_B, BLOCK_M) tile, masked entries at NEG_BIG;
    inv_eps is a (BLOCK_B, 1) column of per-row 1/ε."""
    row_ok = rows < B
    col_ok = cols < M
    dot = tl.zeros((rows.shape[0], cols.shape[0]), dtype=tl.float32)
    for k in range(0, D, BLOCK_K):
        ks = k + tl.arange(0, BLOCK_K)
        xk = tl.load(x_ptr + rows[:, None] * stride_x + ks[None, :],
                     mask=row_ok[:, None] & (ks[None, :] < D), other=0.0)
        yk = tl.load(y_ptr + cols[:, None] * stride_y + ks[None, :],
                     mask=col_ok[:, None] & (ks[None, :] < D), other=0.0)
        dot += tl.dot(xk, tl.trans(yk), input_precision=PRECISION)
    xsq = tl.load(xsq_ptr + rows, mask=row_ok, other=0.0)
    ysq = tl.load(ysq_ptr + cols, mask=col_ok, other=0.0)
    logits = tl.minimum(dot - 0.5 * ysq[None, :] - 0.5 * xsq[:, None], 0.0) * inv_eps
    keep = col_ok[None, :]
    if HAS_EXCLUDE:
        excluded = tl.load(excl_ptr + rows, mask=row_ok, other=-1)
        keep = keep & (cols[None, :] != excluded[:, None])
    return tl.where(keep, logits, NEG_BIG)


@triton.jit
def field_tiles_kernel(x_ptr, y_ptr, xsq_ptr, ysq_ptr, excl_ptr, inv_eps_ptr, lse_ptr, wy_ptr,
                       B, M, D, stride_x, stride_y, HAS_EXCLUDE: tl.constexpr,
                       BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                       BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr):
    """D > SMALL_D, per query: lse_i = log Σ_j exp(l_ij) and wy_i = Σ_j softmax(l_i)_j y_j (a
    slice of D), with each row's own ε (inv_eps_ptr: 1/ε per row)."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    vs = tl.program_id(1) * BLOCK_DV + tl.arange(0, BLOCK_DV)
    row_ok = rows < B
    inv_eps = tl.load(inv_eps_ptr + rows, mask=row_ok, other=1.0)[:, None]
    running_max = tl.full((BLOCK_B,), NEG_BIG, dtype=tl.float32)
    total = tl.zeros((BLOCK_B,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_B, BLOCK_DV), dtype=tl.float32)
    for start in range(0, M, BLOCK_M):
        cols = start + tl.arange(0, BLOCK_M)
        logits = _logits_tile(x_ptr, y_ptr, xsq_ptr, ysq_ptr, excl_ptr, rows, cols, B, M, D,
                              inv_eps, stride_x, stride_y, HAS_EXCLUDE, BLOCK_K, PRECISION)
        new_max = tl.maximum(running_max, tl.max(logits, axis=1))
        rescale = tl.exp(running_max - new_max)
        p = tl.where(logits > 0.5 * NEG_BIG, tl.exp(logits - new_max[:, None]), 0.0)
        total = total * rescale + tl.sum(p, axis=1)
        y = tl.load(y_ptr + cols[:, None] * stride_y + vs[None, :],
                    mask=(cols[:, None] < M) & (vs[None, :] < D), other=0.0)
        acc = acc * rescale[:, None] + tl.dot(p, y, input_precision=PRECISION)
        running_max = new_max
    safe_total = tl.maximum(total, 1e-30)
    tl.store(wy_ptr + rows[:, None] * D + vs[None, :], acc / safe_total[:, None],
             mask=row_ok[:, None] & (vs[None, :] < D))
    if tl.program_id(1) == 0:
        lse = tl.where(total > 0, running_max + tl.log(safe_total), float("-inf"))
        tl.store(lse_ptr + rows, lse, mask=row_ok)


TILES_BLOCKS, TILES_WARPS = dict(BLOCK_B=32, BLOCK_M=32, BLOCK_K=16, BLOCK_DV=32), 8
PRECISION = "ieee"  # exact fp32 products; "tf32x3" trades a little accuracy for tensor cores


def padded_transpose(y, block):
    """Y as (BLOCK_D, M_PAD): M_PAD a multiple of `block`, its extra references far from every
    query, and zero coordinates up to the power of two BLOCK_D (where x reads as zero too)."""
    m_pad = triton.cdiv(y.shape[0], block) * block
    yt = torch.zeros(triton.next_power_of_2(y.shape[1]), m_pad, device=y.device, dtype=torch.float32)
    yt[:y.shape[1]] = FAR
    yt[:y.shape[1], :y.shape[0]] = y.T
    return yt


@functools.lru_cache(maxsize=None)
def _multiprocessors(device):
    return torch.cuda.get_device_properties(device).multi_processor_count


def default_splits(row_blocks, tiles, device):
    """Shares of the references per block of rows: enough programs for four per multiprocessor
    on a GPU (the interpreter runs one share), never an empty share."""
    if device.type != "cuda":
        return 1
    return max(1, min(tiles, triton.cdiv(4 * _multiprocessors(device), row_blocks)))


def _exclusions(exclude, placeholder):
    """The excluded reference per query row as int32 (one 32-bit compare a pair), or a
    placeholder pointer the kernel never reads."""
    return exclude.to(torch.int32).contiguous() if exclude is not None else placeholder


def _per_row(value, batch, like):
    """A float or a (B, 1) column as a contiguous (B,) float32 tensor on `like`'s device."""
    return torch.as_tensor(value, device=like.device, dtype=torch.float32).reshape(-1, 1).expand(batch, 1)[:, 0].contiguous()


def _rows_fields(xc, yc, eps, exclude, splits):
    batch, dim = xc.shape
    block_b, block_m = ROWS_BLOCKS["BLOCK_B"], ROWS_BLOCKS["BLOCK_M"]
    yt = padded_transpose(yc, block_m)
    tiles = yt.shape[1] // block_m
    row_blocks = triton.cdiv(batch, block_b)
    splits = min(tiles, splits or default_splits(row_blocks, tiles, xc.device))
    split_len = triton.cdiv(tiles, splits) * block_m
    splits = triton.cdiv(yt.shape[1], split_len)  # rounding the share up can leave fewer of them
    scale = _per_row(LOG2_E / (2 * eps_column(eps, xc)), batch, xc)
    excl = _exclusions(exclude, scale)
    part_max = torch.empty(splits, batch, device=xc.device, dtype=torch.float32)
    part_total = torch.empty_like(part_max)
    part_acc = torch.empty(splits, dim, batch, device=xc.device, dtype=torch.float32)
    field_rows_kernel[(row_blocks, splits)](
        xc, yt, excl, scale, part_max, part_total, part_acc, batch, yt.shape[1], dim, xc.stride(0),
        split_len, HAS_EXCLUDE=exclude is not None, BLOCK_B=block_b, BLOCK_M=block_m,
        BLOCK_D=triton.next_power_of_2(dim), num_warps=ROWS_WARPS)
    # merge the shares: log2-domain maxima to a common one, then sums
    top = part_max.max(0).values
    weight = torch.exp2(part_max - top)
    total = (weight * part_total).sum(0)
    weighted_y = ((weight[:, None] * part_acc).sum(0) / total.clamp_min(1e-30)).T
    lse = torch.where(total > 0, (top + torch.log2(total.clamp_min(1e-30))) / LOG2_E,
                      torch.full_like(total, -math.inf))
    return lse, weighted_y


def _tiles_fields(xc, yc, eps, exclude):
    batch, dim = xc.shape
    inv_eps = _per_row(1.0 / eps_column(eps, xc), batch, xc)
    excl = _exclusions(exclude, inv_eps)
    lse = torch.empty(batch, device=xc.device, dtype=torch.float32)
    weighted_y = torch.empty(batch, dim, device=xc.device, dtype=torch.float32)
    grid = (triton.cdiv(batch, TILES_BLOCKS["BLOCK_B"]), triton.cdiv(dim, TILES_BLOCKS["BLOCK_DV"]))
    field_tiles_kernel[grid](xc, yc, (xc * xc).sum(1), (yc * yc).sum(1), excl, inv_eps, lse, weighted_y,
                             batch, yc.shape[0], dim, xc.stride(0), yc.stride(0),
                             HAS_EXCLUDE=exclude is not None, PRECISION=PRECISION, num_warps=TILES_WARPS,
                             **TILES_BLOCKS)
    return lse, weighted_y


def field_matching_triton(x, y, eps, exclude=None, splits=None):
    """Same contract as kernels.torch_path.field_matching_torch (ε a float or one per row), but
    differentiable through the log-sum-exp only. CUDA tensors (or the interpreter under
    TRITON_INTERPRET=1). `splits`: shares of the references per block of rows (small D;
    default: enough to fill the GPU)."""
    with torch.no_grad():
        center = y.mean(0)
        xc = (x - center).contiguous().float()
        yc = (y - center).contiguous().float()
        if x.shape[1] <= SMALL_D:
            lse, weighted_y = _rows_fields(xc, yc, eps, exclude, splits)
        else:
            lse, weighted_y = _tiles_fields(xc, yc, eps, exclude)
        mean = ((weighted_y - xc) / eps_column(eps, xc)).to(x.dtype)
    if x.requires_grad:
        lse = attach_lse_gradient(lse, mean, x)
    return lse - reference_counts(exclude, x.shape[0], y.shape[0], x.device).log(), mean


__all__ = ["field_matching_triton", "field_rows_kernel", "field_tiles_kernel", "rows_online_softmax",
           "padded_transpose", "ROWS_BLOCKS", "ROWS_WARPS", "TILES_BLOCKS", "TILES_WARPS", "SMALL_D",
           "LOG2_E"]

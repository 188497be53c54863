"""Fused Triton field matching: log-sum-exp of -‖x - y‖²/(2ε) and the softmax-weighted mean of
y per query, one pass over tiles of Y with a running max (flash-attention style).

Memory is O((B + M)·D); no atomics, so results are deterministic. Two distance paths:
small D (≤ SMALL_D) broadcasts x - y in registers; larger D uses tl.dot on the expansion
x·y - ½‖y‖² - ½‖x‖² with an explicit input precision (the GPU default would be TF32).
Value dimensions beyond BLOCK_DV are split over a second grid axis, each program
recomputing the logits for its slice of the weighted sum.
"""
import torch
import triton
import triton.language as tl

from .torch_path import reference_counts

SMALL_D = 8
# A finite "minus infinity" keeps exp(m_old - m_new) well defined when a whole tile is masked.
NEG_BIG = tl.constexpr(-1.0e30)


@triton.jit
def _logits_tile(x_ptr, y_ptr, xsq_ptr, ysq_ptr, excl_ptr, rows, cols, B, M, D, inv_eps,
                 stride_x, stride_y, HAS_EXCLUDE: tl.constexpr, USE_DOT: tl.constexpr,
                 BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """Logits -‖x_i - y_j‖²/(2ε) for a (BLOCK_B, BLOCK_M) tile, masked entries at NEG_BIG.
    inv_eps: a scalar, or a (BLOCK_B, 1) column of per-row 1/ε."""
    row_ok = rows < B
    col_ok = cols < M
    if USE_DOT:
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
    else:
        logits = -0.5 * inv_eps * _small_products(x_ptr, y_ptr, rows, cols, B, M, D, stride_x,
                                                  stride_y, BLOCK_D, True)
    keep = col_ok[None, :]
    if HAS_EXCLUDE:
        excluded = tl.load(excl_ptr + rows, mask=row_ok, other=-1)
        keep = keep & (cols[None, :] != excluded[:, None])
    return tl.where(keep, logits, NEG_BIG)


@triton.jit
def _weighted_values(p, y_ptr, cols, vs, M, D, stride_y, USE_DOT: tl.constexpr,
                     PRECISION: tl.constexpr):
    """Σ_j p_ij y_j[vs] for one tile: (BLOCK_B, BLOCK_DV)."""
    if USE_DOT:
        y = tl.load(y_ptr + cols[:, None] * stride_y + vs[None, :],
                    mask=(cols[:, None] < M) & (vs[None, :] < D), other=0.0)
        return tl.dot(p, y, input_precision=PRECISION)
    # small D: one column at a time keeps register use low (no 3-D temporaries)
    out = tl.zeros((p.shape[0], vs.shape[0]), dtype=tl.float32)
    for d in tl.static_range(vs.shape[0]):
        y_d = tl.load(y_ptr + cols * stride_y + d, mask=(cols < M) & (cols * 0 + d < D),
                      other=0.0)
        out += tl.where(vs[None, :] == d, tl.sum(p * y_d[None, :], axis=1)[:, None], 0.0)
    return out


@triton.jit
def _small_products(a_ptr, y_ptr, rows, cols, B, M, D, stride_a, stride_y,
                    BLOCK_D: tl.constexpr, SQUARED_DISTANCE: tl.constexpr):
    """Σ_d (a_id - y_jd)² or Σ_d a_id·y_jd for a tile, one column at a time (small D)."""
    out = tl.zeros((rows.shape[0], cols.shape[0]), dtype=tl.float32)
    for d in tl.static_range(BLOCK_D):
        # `cols * 0 + d` keeps the mask a tensor (the interpreter rejects a scalar bool)
        a_d = tl.load(a_ptr + rows * stride_a + d, mask=(rows < B) & (rows * 0 + d < D), other=0.0)
        y_d = tl.load(y_ptr + cols * stride_y + d, mask=(cols < M) & (cols * 0 + d < D), other=0.0)
        if SQUARED_DISTANCE:
            diff = a_d[:, None] - y_d[None, :]
            out += diff * diff
        else:
            out += a_d[:, None] * y_d[None, :]
    return out


@triton.jit
def _online_softmax(x_ptr, y_ptr, xsq_ptr, ysq_ptr, excl_ptr, rows, vs, B, M, D, inv_eps, stride_x,
                    stride_y, HAS_EXCLUDE: tl.constexpr, USE_DOT: tl.constexpr, BLOCK_B: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
                    BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr):
    """The one pass over tiles of Y with a running max: per row, the max logit, Σ exp(l - max)
    and Σ exp(l - max) y[vs]. The field kernels and the fused SDE step share it."""
    running_max = tl.full((BLOCK_B,), NEG_BIG, dtype=tl.float32)
    total = tl.zeros((BLOCK_B,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_B, BLOCK_DV), dtype=tl.float32)
    for start in range(0, M, BLOCK_M):
        cols = start + tl.arange(0, BLOCK_M)
        logits = _logits_tile(x_ptr, y_ptr, xsq_ptr, ysq_ptr, excl_ptr, rows, cols, B, M, D,
                              inv_eps, stride_x, stride_y, HAS_EXCLUDE, USE_DOT, BLOCK_D,
                              BLOCK_K, PRECISION)
        new_max = tl.maximum(running_max, tl.max(logits, axis=1))
        rescale = tl.exp(running_max - new_max)
        p = tl.exp(logits - new_max[:, None])
        p = tl.where(logits > 0.5 * NEG_BIG, p, 0.0)
        total = total * rescale + tl.sum(p, axis=1)
        acc = acc * rescale[:, None] + _weighted_values(p, y_ptr, cols, vs, M, D, stride_y,
                                                        USE_DOT, PRECISION)
        running_max = new_max
    return running_max, total, acc


@triton.jit
def field_forward_kernel(x_ptr, y_ptr, xsq_ptr, ysq_ptr, excl_ptr, inv_eps_ptr, lse_ptr, wy_ptr,
                         B, M, D, stride_x, stride_y,
                         HAS_EXCLUDE: tl.constexpr, USE_DOT: tl.constexpr,
                         BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_K: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr):
    """Per query: lse_i = log Σ_j exp(l_ij) and wy_i = Σ_j softmax(l_i)_j y_j (slice of D),
    with each row's own ε (inv_eps_ptr: 1/ε per row)."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    vs = tl.program_id(1) * BLOCK_DV + tl.arange(0, BLOCK_DV)
    inv_eps = tl.load(inv_eps_ptr + rows, mask=rows < B, other=1.0)[:, None]
    running_max, total, acc = _online_softmax(x_ptr, y_ptr, xsq_ptr, ysq_ptr, excl_ptr, rows, vs, B, M,
                                              D, inv_eps, stride_x, stride_y, HAS_EXCLUDE, USE_DOT,
                                              BLOCK_B, BLOCK_M, BLOCK_D, BLOCK_K, BLOCK_DV, PRECISION)
    row_ok = rows < B
    safe_total = tl.maximum(total, 1e-30)
    tl.store(wy_ptr + rows[:, None] * D + vs[None, :], acc / safe_total[:, None],
             mask=row_ok[:, None] & (vs[None, :] < D))
    if tl.program_id(1) == 0:
        lse = tl.where(total > 0, running_max + tl.log(safe_total), float("-inf"))
        tl.store(lse_ptr + rows, lse, mask=row_ok)


@triton.jit
def field_backward_kernel(x_ptr, y_ptr, xsq_ptr, ysq_ptr, excl_ptr, inv_eps_ptr, lse_ptr, gm_ptr,
                          out_ptr, B, M, D, stride_x, stride_y,
                          HAS_EXCLUDE: tl.constexpr, USE_DOT: tl.constexpr,
                          BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                          BLOCK_K: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr):
    """Per query: Σ_j w_ij (y_j·G_i) y_j, with w from the saved lse (no rescaling needed).
    G (gm_ptr) is the upstream gradient of the weighted mean, laid out like x."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    vs = tl.program_id(1) * BLOCK_DV + tl.arange(0, BLOCK_DV)
    row_ok = rows < B
    inv_eps = tl.load(inv_eps_ptr + rows, mask=row_ok, other=1.0)[:, None]
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    acc = tl.zeros((BLOCK_B, BLOCK_DV), dtype=tl.float32)
    for start in range(0, M, BLOCK_M):
        cols = start + tl.arange(0, BLOCK_M)
        logits = _logits_tile(x_ptr, y_ptr, xsq_ptr, ysq_ptr, excl_ptr, rows, cols, B, M, D,
                              inv_eps, stride_x, stride_y, HAS_EXCLUDE, USE_DOT, BLOCK_D,
                              BLOCK_K, PRECISION)
        w = tl.where(logits > 0.5 * NEG_BIG, tl.exp(logits - lse[:, None]), 0.0)
        # y_j·G_i is the same kind of tile product as the logits' x_i·y_j
        if USE_DOT:
            proj = tl.zeros((BLOCK_B, BLOCK_M), dtype=tl.float32)
            for k in range(0, D, BLOCK_K):
                ks = k + tl.arange(0, BLOCK_K)
                gk = tl.load(gm_ptr + rows[:, None] * D + ks[None, :],
                             mask=row_ok[:, None] & (ks[None, :] < D), other=0.0)
                yk = tl.load(y_ptr + cols[:, None] * stride_y + ks[None, :],
                             mask=(cols[:, None] < M) & (ks[None, :] < D), other=0.0)
                proj += tl.dot(gk, tl.trans(yk), input_precision=PRECISION)
        else:
            proj = _small_products(gm_ptr, y_ptr, rows, cols, B, M, D, D, stride_y, BLOCK_D, False)
        acc += _weighted_values(w * proj, y_ptr, cols, vs, M, D, stride_y, USE_DOT, PRECISION)
    tl.store(out_ptr + rows[:, None] * D + vs[None, :], acc,
             mask=row_ok[:, None] & (vs[None, :] < D))


def small_d_warps(block_d):
    """Warps for the small-D path: 4 spill-free up to D = 4; D = 8 needs 8 to avoid spills."""
    return 8 if block_d >= 8 else 4


def launch_config(dim):
    """Block sizes and warps for a feature dimension: the configurations the compile check covers.
    32x32 tiles are the largest that compile without register spills for both sm_80 and
    sm_90, forward and backward (see bdiff.compile_check)."""
    if dim <= SMALL_D:
        block_d = max(1, triton.next_power_of_2(dim))
        return dict(USE_DOT=False, BLOCK_B=32, BLOCK_M=32, BLOCK_D=block_d, BLOCK_K=16,
                    BLOCK_DV=block_d, num_warps=small_d_warps(block_d))
    return dict(USE_DOT=True, BLOCK_B=32, BLOCK_M=32, BLOCK_D=16, BLOCK_K=16, BLOCK_DV=32,
                num_warps=8)


PRECISION = "ieee"  # exact fp32 products; "tf32x3" trades a little accuracy for tensor cores


def _prepare(x, y, exclude):
    center = y.mean(0)
    xc = (x - center).contiguous().float()
    yc = (y - center).contiguous().float()
    excl = exclude.to(torch.int64).contiguous() if exclude is not None else xc  # dummy pointer
    return xc, yc, (xc * xc).sum(1), (yc * yc).sum(1), excl


def _launch(kernel, x, y, xsq, ysq, excl, has_exclude, inv_eps, extra):
    batch, dim = x.shape
    cfg = launch_config(dim)
    warps = cfg.pop("num_warps")
    grid = (triton.cdiv(batch, cfg["BLOCK_B"]), triton.cdiv(dim, cfg["BLOCK_DV"]))
    kernel[grid](x, y, xsq, ysq, excl, inv_eps, *extra, batch, y.shape[0], dim, x.stride(0),
                 y.stride(0), HAS_EXCLUDE=has_exclude, PRECISION=PRECISION, num_warps=warps, **cfg)


class _FieldMatching(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, eps, exclude):
        xc, yc, xsq, ysq, excl = _prepare(x, y, exclude)
        batch, dim = xc.shape
        eps_col = torch.as_tensor(eps, device=x.device, dtype=torch.float32).expand(batch).reshape(batch, 1)
        inv_eps = (1.0 / eps_col[:, 0]).contiguous()
        lse = torch.empty(batch, device=x.device, dtype=torch.float32)
        weighted_y = torch.empty(batch, dim, device=x.device, dtype=torch.float32)
        _launch(field_forward_kernel, xc, yc, xsq, ysq, excl, exclude is not None, inv_eps,
                (lse, weighted_y))
        mean = (weighted_y - xc) / eps_col
        ctx.save_for_backward(xc, yc, xsq, ysq, excl, inv_eps, eps_col, lse, weighted_y, mean)
        ctx.has_exclude = exclude is not None
        return lse, mean

    @staticmethod
    def backward(ctx, grad_lse, grad_mean):
        xc, yc, xsq, ysq, excl, inv_eps, eps, lse, weighted_y, mean = ctx.saved_tensors
        grad_x = torch.zeros_like(xc)
        if grad_lse is not None:
            grad_x += grad_lse.unsqueeze(1) * mean
        if grad_mean is not None:
            g = grad_mean.contiguous().float()
            second = torch.empty_like(xc)
            _launch(field_backward_kernel, xc, yc, xsq, ysq, excl, ctx.has_exclude, inv_eps,
                    (lse, g, second))
            # d mean/dx = (Cov_w(y)/ε - I)/ε, with Cov_w(y)·G = Σ w (y·G) y - ȳ (ȳ·G)
            cov_g = second - weighted_y * (weighted_y * g).sum(1, keepdim=True)
            grad_x += (cov_g / eps - g) / eps
        return grad_x, None, None, None


def field_matching_triton(x, y, eps, exclude=None):
    """Same contract as kernels.torch_path.field_matching_torch (ε a float or one per row);
    CUDA tensors (or the interpreter under TRITON_INTERPRET=1)."""
    lse, mean = _FieldMatching.apply(x, y, eps, exclude)
    return lse - reference_counts(exclude, x.shape[0], y.shape[0], x.device).log(), mean.to(x.dtype)


__all__ = ["field_matching_triton", "field_forward_kernel", "field_backward_kernel",
           "launch_config", "SMALL_D"]

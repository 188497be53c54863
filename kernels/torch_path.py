"""Fast PyTorch field matching for any device, plus the naive baseline it is measured against.

The Gaussian reduction is softmax attention: with queries x/ε, keys and values y and an
additive column bias -‖y‖²/(2ε) (or, for one ε per row, queries [x/ε, -1/(2ε)] against keys
[y, ‖y‖²]), the logits are x·y/ε - ‖y‖²/(2ε), which differ from
-‖x - y‖²/(2ε) only by the per-row constant ‖x‖²/(2ε). PyTorch's fused CPU attention
then does the whole reduction in O(B + M) memory (see NOTES.md for the measured speed-up).
"""
import math
import zlib

import numpy as np
import torch

# Exclusion masks are materialised one query chunk at a time, within this many bytes.
MASK_BUDGET_BYTES = 32 * 2**20
# The chunked fallback holds at most this many logits at once.
LOGIT_BUDGET = 8 * 2**20


def _flash_cpu_op():
    """PyTorch's fused CPU attention that also returns the log-sum-exp (private API)."""
    try:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    except (AttributeError, RuntimeError):
        return None


_FLASH_CPU = _flash_cpu_op()


def has_fused_cpu_attention():
    return _FLASH_CPU is not None


class _LseWithGrad(torch.autograd.Function):
    """Attaches d lse/dx = weighted mean of (y - x)/ε, which the fused ops do not provide."""

    @staticmethod
    def forward(ctx, lse, mean, x):
        ctx.save_for_backward(mean)
        return lse

    @staticmethod
    def backward(ctx, grad_lse):
        (mean,) = ctx.saved_tensors
        return None, None, grad_lse.unsqueeze(1) * mean


def attach_lse_gradient(lse, mean, x):
    """lse, differentiable with respect to x through its exact gradient, the weighted mean."""
    return _LseWithGrad.apply(lse, mean.detach(), x)


def _exclusion_mask(exclude, rows, num_refs, dtype):
    """Additive mask for a chunk of query rows: -inf at each row's excluded reference."""
    mask = torch.zeros(rows.stop - rows.start, num_refs, dtype=dtype, device=exclude.device)
    local = exclude[rows]
    hit = torch.nonzero(local >= 0).squeeze(1)
    mask[hit, local[hit]] = -math.inf
    return mask


def eps_column(eps, like):
    """ε as a float or, given per query row as a (B,) tensor, a (B, 1) column on `like`'s device:
    both broadcast over the references. One launch then serves rows of many noise levels."""
    return eps.to(like.device, like.dtype)[:, None] if torch.is_tensor(eps) else eps


def _eps_rows(eps, index):
    """The ε of some query rows: a float stays a float."""
    return eps[index] if torch.is_tensor(eps) else eps


def reference_counts(exclude, batch, num_refs, device):
    """References each query averages over: M, or M - 1 where one is excluded."""
    count = torch.full((batch,), float(num_refs), device=device)
    if exclude is not None:
        count -= (exclude >= 0).float()
    return count


def field_matching_torch(x, y, eps, exclude=None):
    """log ŝ(x) - log(#refs) (B,) and the softmax-weighted mean of (y - x)/ε (B, D).

    ε: a float, or a (B,) tensor of one ε per query row. Differentiable with respect to x.
    Uses the fused CPU attention op when PyTorch has it and x is on the CPU, else the chunked
    matmul path.
    """
    if _FLASH_CPU is None or x.device.type != "cpu" or x.shape[0] == 0:  # the CPU op: SIGFPE on 0 rows
        return field_matching_chunked(x, y, eps, exclude)
    eps = eps_column(eps, x)
    center = y.mean(0).detach()  # shrinks |x·y|/ε, the fp32 error of the dropped-constant trick
    xc, yc = x - center, (y - center).detach()
    if exclude is None or x.requires_grad:
        lse, weighted_y = _attention(xc, yc, eps, exclude)
    else:
        lse, weighted_y = _attention_excluding(xc, yc, eps, exclude)
    mean = (weighted_y - xc) / eps
    lse = (lse - (xc * xc).sum(1, keepdim=True).detach() / (2 * eps))[:, 0]
    if x.requires_grad:
        lse = attach_lse_gradient(lse, mean, x)
    return lse - reference_counts(exclude, x.shape[0], y.shape[0], x.device).log(), mean


def _attention(xc, yc, eps, exclude=None):
    """Fused attention with logits x·y/ε - ‖y‖²/(2ε): (log-sum-exp (B, 1), weighted mean of y).
    A float ε enters as a (1, M) bias -‖y‖²/(2ε). A per-row ε (a (B, 1) column) would make that
    bias B x M, so it rides in the queries instead: [x/ε, -1/(2ε)] against keys [y, ‖y‖²]
    (values = keys; the first D output columns are the weighted mean of y). The extra column
    costs 5-13 % at D = 64 with a float ε, hence the two forms. Exclusions use an explicit
    mask, built one chunk of query rows at a time."""
    batch, dim = xc.shape
    y_sq = (yc * yc).sum(1, keepdim=True)
    if torch.is_tensor(eps):
        query = torch.cat([xc / eps, -0.5 / eps], 1)[None, None]
        key, bias = torch.cat([yc, y_sq], 1)[None, None], None
    else:
        query, key, bias = (xc / eps)[None, None], yc[None, None], -y_sq.T / (2 * eps)
    if exclude is None:
        chunks = [range(0, batch)]
    else:
        step = max(1, MASK_BUDGET_BYTES // (4 * yc.shape[0]))
        chunks = [range(i, min(i + step, batch)) for i in range(0, batch, step)]
    outputs, lses = [], []
    for rows in chunks:
        mask = bias
        if exclude is not None:
            excluded = _exclusion_mask(exclude, rows, yc.shape[0], xc.dtype)
            mask = excluded if bias is None else bias + excluded
        out, lse = _FLASH_CPU(query[:, :, rows.start:rows.stop], key, key, 0.0, False,
                              attn_mask=None if mask is None else mask[None, None], scale=1.0)
        outputs.append(out[0, 0, :, :dim])
        lses.append(lse[0, 0, :, None])
    if len(outputs) == 1:
        return lses[0], outputs[0]
    return torch.cat(lses), torch.cat(outputs)


# Removing the excluded pair after the fact is exact in fp32 while its weight is at most this;
# rows where it dominates are recomputed with an explicit mask.
MAX_REMOVED_WEIGHT = 0.5


@torch.no_grad()
def _attention_excluding(xc, yc, eps, exclude):
    """Exclusion without a B x M mask: reduce over all references, then take the excluded
    pair's term out of the sum. Falls back to the masked path where that term dominates."""
    lse, weighted_y = _attention(xc, yc, eps)
    rows = torch.nonzero(exclude >= 0).squeeze(1)
    own = yc[exclude[rows]]
    own_logit = ((xc[rows] * own).sum(1, keepdim=True) - (own * own).sum(1, keepdim=True) / 2) / _eps_rows(eps, rows)
    weight = torch.exp(own_logit - lse[rows])
    lse, weighted_y = lse.clone(), weighted_y.clone()
    lse[rows] = lse[rows] + torch.log1p(-weight.clamp_max(MAX_REMOVED_WEIGHT))
    weighted_y[rows] = (weighted_y[rows] - weight * own) / (1 - weight.clamp_max(0.999))
    dominated = rows[weight[:, 0] > MAX_REMOVED_WEIGHT]
    if len(dominated):
        sub_lse, sub_wy = _attention(xc[dominated], yc, _eps_rows(eps, dominated), exclude[dominated])
        lse[dominated], weighted_y[dominated] = sub_lse, sub_wy
    return lse, weighted_y


def field_matching_chunked(x, y, eps, exclude=None):
    """The same reduction by explicit logits, a block of query rows at a time."""
    batch = x.shape[0]
    eps = eps_column(eps, x)
    step = max(1, LOGIT_BUDGET // max(1, y.shape[0]))
    y_sq = (y * y).sum(1)
    lses, means = [], []
    for start in range(0, max(batch, 1), step):  # no queries: one empty block
        rows = range(start, min(start + step, batch))
        xb = x[rows.start:rows.stop]
        eps_b = _eps_rows(eps, slice(rows.start, rows.stop))
        logits = (2 * xb @ y.T - (xb * xb).sum(1, keepdim=True) - y_sq) / (2 * eps_b)
        logits = logits.clamp_max(0)  # a squared distance is never negative
        if exclude is not None:
            logits = logits + _exclusion_mask(exclude, rows, y.shape[0], x.dtype)
        lses.append(torch.logsumexp(logits, 1))
        means.append((torch.softmax(logits, 1) @ y - xb) / eps_b)
    lse = torch.cat(lses)
    return lse - reference_counts(exclude, batch, y.shape[0], x.device).log(), torch.cat(means)


def field_matching_naive(x, y, eps, exclude=None):
    """The plain materialised baseline: the full B x M matrix of squared distances."""
    eps = eps_column(eps, x)
    logits = -torch.cdist(x, y).pow(2) / (2 * eps)
    if exclude is not None:
        logits = logits + _exclusion_mask(exclude, range(0, x.shape[0]), y.shape[0], x.dtype)
    lse = torch.logsumexp(logits, 1)
    mean = (torch.softmax(logits, 1) @ y - x) / eps
    return lse - reference_counts(exclude, x.shape[0], y.shape[0], x.device).log(), mean


def stream_seed(stream, *indices):
    """A 63-bit generator seed for the named random stream at nonnegative integer indices,
    hashed by NumPy's SeedSequence: distinct (stream, indices) give unrelated seeds. Seeds
    built from sums and products of the indices collided: a sampler batch's start drew the
    numbers of its first step's noise at seed 0, and step k at offset b those of step k + 1."""
    words = (zlib.crc32(stream.encode()), *indices)
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> np.uint64(1))


def sde_noise(shape, seed, step, offset, device):
    """Gaussian noise for one SDE step of one particle block, reproducible from its indices."""
    generator = torch.Generator(device=device)
    generator.manual_seed(stream_seed("sde noise", seed, step, offset))
    return torch.randn(shape, generator=generator, device=device)


def sde_step_torch(x, s, g, h, seed, step, offset=0, delta=None):
    """One Euler-Maruyama step (see reference.sde_step_reference) with its own noise."""
    noise = sde_noise(x.shape, seed, step, offset, x.device)
    p = s.clamp_min(0).unsqueeze(1)
    if delta is None:
        drift, diffusion = g, p.sqrt()
    else:
        drift = g * (p + 2 * delta) / (2 * (p + delta) ** 2)
        diffusion = (p / (p + delta)).sqrt()
    return x + h * drift + math.sqrt(h) * diffusion * noise

"""Group-wise weight quantizers.

Every quantized group of weights is described by two numbers per output row,
``scale`` and ``zero``, and integer codes ``q`` in ``[0, 2**bits - 1]``:

    w_hat = scale * (q - zero)          q = clamp(round(w / scale + zero), 0, maxq)

- bits 2, 3, 4, 8: min-max affine (asymmetric, the GPTQ default) or symmetric.
  ``zero`` is an integer in ``[0, maxq]``.
- bits 1: a binary code per group, w_hat = mu + alpha * sign(w - mu), with mu the
  group mean and alpha = mean |w - mu| (the least-squares alpha for those signs).
  In the form above: scale = 2 * alpha, zero = (alpha - mu) / scale, a float.

``scale`` (and the binary ``zero``) are rounded to float16 as soon as they are
computed, because that is how the packed checkpoint stores them: the fake-quantized
weights produced here are then bit-identical to what the packed model dequantizes.

Grids (``grid=``): "minmax" takes the parameters above from each group's min and max.
"search" (the default) keeps min-max as one candidate and tries others, keeping per
group the one with the smallest weighted squared error  sum_j c_j (w_j - w_hat_j)^2:
- bits >= 2: the range shrunk by N_SHRINK factors down to 1 - 0.7**(bits-1), the zero
  of the best one moved by -1 and +1, then the least-squares scale for the chosen codes
  and zero. The zero stays an integer, the scale float16: the checkpoint is unchanged.
- bits 1: two weighted 2-means (Lloyd) steps from the weighted mean.
``c_j`` is the cost of an error in column j: GPTQ passes 1 / [U]_jj^2 (U the Cholesky
factor of H^-1, so e^2 / U_jj^2 is its own loss for column j); RTN passes nothing (c = 1).
Min-max being a candidate, the search is never worse than it on a group, by construction.
benchmarks/bench_gptq_quality.py measured these choices.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

SUPPORTED_BITS = (1, 2, 3, 4, 8)


def check_bits(bits: int) -> int:
    if int(bits) != bits or int(bits) not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bit width {bits!r}: choose one of {', '.join(map(str, SUPPORTED_BITS))}")
    return int(bits)


def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).to(x.dtype)


GRIDS = ("search", "minmax")
N_SHRINK = 3         # range factors the search tries (4 lowered GPTQ's error by 0.3-1.3%, 8 by 0.8-2.2%)
ZERO_LIMIT = 6.2e-5  # stands in for a zero scale: below the float16 normal range


def check_grid(grid: str) -> str:
    if grid not in GRIDS:
        raise ValueError(f"unknown grid {grid!r}: choose one of {', '.join(GRIDS)}")
    return grid


def _range(w: torch.Tensor, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group's [min, max], widened to hold 0 ([-1, 1] for an all-zero group)."""
    xmin = w.amin(dim=-1, keepdim=True).clamp(max=0)
    xmax = w.amax(dim=-1, keepdim=True).clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -torch.ones_like(xmin), xmin)
    xmax = torch.where(empty, torch.ones_like(xmax), xmax)
    return xmin, xmax


def _fp16_scale(x: torch.Tensor) -> torch.Tensor:
    scale = _fp16(x)
    return torch.where(scale == 0, torch.full_like(scale, ZERO_LIMIT), scale)


def _affine(xmin: torch.Tensor, xmax: torch.Tensor, maxq: torch.Tensor, sym: bool):
    """scale, integer zero mapping [xmin, xmax] onto [0, maxq]."""
    scale = _fp16_scale((xmax - xmin) / maxq)
    if sym:
        zero = torch.floor((maxq + 1) / 2).expand_as(scale).clone()
    else:
        zero = torch.clamp(torch.round(-xmin / scale), torch.zeros_like(maxq), maxq).expand_as(scale).clone()
    return scale, zero


def minmax_params(w: torch.Tensor, maxq: torch.Tensor, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """scale, zero of shape (..., 1) for groups laid out along the last dim of ``w``."""
    return _affine(*_range(w, sym), maxq, sym)


def group_error(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: torch.Tensor,
                colw: torch.Tensor | None = None) -> torch.Tensor:
    """sum_j c_j (w_j - w_hat_j)^2 over each group (last dim), with w_hat exactly as
    quantized and dequantized below; ``colw`` c: (B, 1, G) for w (B, R, G), or None (c = 1).
    float32 on CUDA: one fused kernel (quant/triton_search.py); elsewhere eager."""
    if w.is_cuda and w.dtype == torch.float32 and w.dim() == 3:
        from . import triton_search
        if triton_search.available():
            return triton_search.group_error_triton(w, scale, zero, maxq, colw)
    return _group_error_eager(w, scale, zero, maxq, colw)


def _group_error_eager(w, scale, zero, maxq, colw=None):
    # (w - w_hat)^2 in one kernel, summed (weighted) in one more: the search evaluates this a
    # few times per group over all B x R x G weights, so it is what the search costs
    err = F.mse_loss(w, dequantize(quantize_codes(w, scale, zero, maxq), scale, zero), reduction="none")
    # a sum along each row, not a batched matmul: a CPU bmm may split its sums differently for
    # another batch size, and an expert's result must not depend on which experts share its batch
    return (err if colw is None else err * colw).sum(dim=-1, keepdim=True)


def _keep_better(best, cand):
    """(error, scale, zero) of each group: the candidate's where its error is smaller."""
    better = cand[0] < best[0]
    return tuple(torch.where(better, c, b) for c, b in zip(cand, best))


def searched_params(w: torch.Tensor, maxq: torch.Tensor, sym: bool, colw: torch.Tensor | None = None):
    """scale, zero (..., 1) of the best candidate per group (see the module doc).
    maxq: (B, 1, 1); a fixed number of tensor ops, no host sync (runs in a CUDA graph)."""
    xmin, xmax = _range(w, sym)
    scale, zero = _affine(xmin, xmax, maxq, sym)
    best = (group_error(w, scale, zero, maxq, colw), scale, zero)
    # The best range shrinks with fewer levels (clipping a few large weights costs less
    # than coarse steps for all): searching 90 factors in [0.1, 1] on the benchmark's
    # 512 x 1024 problem, GPTQ's picks fell in [0.36, 1] at 2 bits, [0.56, 1] at 3 and
    # [0.71, 1] at 4 (1st to 99th percentile).
    span = 0.7 ** (torch.log2(maxq + 1) - 1)  # factors down to 0.3, 0.51, 0.66 at 2, 3, 4 bits
    for k in range(1, N_SHRINK + 1):
        p = 1 - k / N_SHRINK * span
        scale, zero = _affine(p * xmin, p * xmax, maxq, sym)
        best = _keep_better(best, (group_error(w, scale, zero, maxq, colw), scale, zero))
    if not sym:  # rounding the zero to the nearest integer is not always best
        _, scale, zero = best
        for dz in (-1, 1):
            z = torch.clamp(zero + dz, torch.zeros_like(maxq), maxq)
            best = _keep_better(best, (group_error(w, scale, z, maxq, colw), scale, z))
    # The least-squares scale for the chosen codes and zero: min_s sum_j c_j (w_j - s (q_j - z))^2
    _, scale, zero = best
    qz = quantize_codes(w, scale, zero, maxq) - zero
    cqz = qz if colw is None else qz * colw
    ls = _fp16((cqz * w).sum(-1, keepdim=True) / (cqz * qz).sum(-1, keepdim=True).clamp(min=1e-30))
    ls = torch.where(ls > 0, ls, scale)  # no codes off the zero: keep it
    best = _keep_better(best, (group_error(w, ls, zero, maxq, colw), ls, zero))
    return best[1], best[2]


def _binary(mu: torch.Tensor, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """scale, zero of the code mu +- alpha."""
    scale = _fp16(2 * alpha)
    return scale, _fp16((alpha - mu) / scale)


def binary_params(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mu = w.mean(dim=-1, keepdim=True)
    return _binary(mu, (w - mu).abs().mean(dim=-1, keepdim=True).clamp(min=3.1e-5))


def searched_binary_params(w: torch.Tensor, colw: torch.Tensor | None = None, steps: int = 2):
    """Weighted 2-means of each group: split at mu, move mu +- alpha to the weighted means
    of the two halves, repeat. Kept only where it beats ``binary_params`` on the weighted error."""
    one = torch.ones((), dtype=w.dtype, device=w.device)
    scale, zero = binary_params(w)
    best = (group_error(w, scale, zero, one, colw), scale, zero)
    c = torch.ones_like(w[..., :1, :]) if colw is None else colw.expand_as(w[..., :1, :])
    c_all, cw_all = c.sum(-1, keepdim=True), (c * w).sum(-1, keepdim=True)
    mu = cw_all / c_all
    for _ in range(steps):
        c_hi = c * (w >= mu)
        n_hi = c_hi.sum(-1, keepdim=True)
        s_hi = (c_hi * w).sum(-1, keepdim=True)
        m_hi = s_hi / n_hi.clamp(min=1e-30)
        m_lo = (cw_all - s_hi) / (c_all - n_hi).clamp(min=1e-30)
        mu, alpha = (m_hi + m_lo) / 2, ((m_hi - m_lo) / 2).clamp(min=3.1e-5)
    scale, zero = _binary(mu, alpha)
    best = _keep_better(best, (group_error(w, scale, zero, one, colw), scale, zero))
    return best[1], best[2]


def binary_group_params(w: torch.Tensor, grid: str = "search", colw: torch.Tensor | None = None):
    """group_params for 1-bit matrices only."""
    return searched_binary_params(w, colw) if check_grid(grid) == "search" else binary_params(w)


def group_params(w: torch.Tensor, bits: torch.Tensor, sym: bool, has_binary: bool | None = None,
                 grid: str = "search", colw: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantization parameters for one group per row.

    w: (B, R, G) weights of B matrices; bits: (B,) bit width of each matrix (may differ).
    Returns scale, zero of shape (B, R, 1). ``has_binary``: whether any bits == 1, if the
    caller knows (avoids a device sync, e.g. inside a CUDA graph). ``colw``: the search's
    per-column error weights, (B, 1, G) or (1, 1, G); None: all equal.
    """
    maxq = (2 ** bits.to(w.dtype) - 1).view(-1, 1, 1)
    search = check_grid(grid) == "search"
    scale, zero = searched_params(w, maxq, sym, colw) if search else minmax_params(w, maxq, sym)
    binary = (bits == 1).view(-1, 1, 1)
    if has_binary if has_binary is not None else bool(binary.any()):
        bscale, bzero = binary_group_params(w, grid, colw)
        scale = torch.where(binary, bscale, scale)
        zero = torch.where(binary, bzero, zero)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: torch.Tensor) -> torch.Tensor:
    # addcdiv: w / scale + zero in one kernel, the same rounding as the two operations
    return torch.clamp(torch.round(torch.addcdiv(zero, w, scale)), torch.zeros_like(maxq), maxq)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (q - zero)


def rtn(weight: torch.Tensor, bits: int, groupsize: int, sym: bool = False, grid: str = "search"):
    """Round-to-nearest quantization of a (R, C) matrix (the GPTQ baseline), on the same
    grid as GPTQ; its search weighs all columns alike (RTN does not look at the data).

    Returns (codes (R, C) uint8, scale (R, G), zero (R, G), dequantized (R, C))."""
    bits = check_bits(bits)
    w = weight.float()
    rows, cols = w.shape
    gs = cols if groupsize <= 0 else groupsize
    groups = w.reshape(rows, cols // gs, gs)
    bits_t = torch.tensor([bits], device=w.device)
    scale, zero = group_params(groups.reshape(1, -1, gs), bits_t, sym, grid=grid)
    scale = scale.reshape(rows, cols // gs, 1)
    zero = zero.reshape(rows, cols // gs, 1)
    maxq = torch.tensor(2.0 ** bits - 1, device=w.device)
    q = quantize_codes(groups, scale, zero, maxq)
    deq = dequantize(q, scale, zero).reshape(rows, cols)
    return q.reshape(rows, cols).to(torch.uint8), scale[..., 0], zero[..., 0], deq

"""Many tokens per expert (prefill, loglikelihood): every expert dequantized once, in one launch per
kind of matrix, then one grouped GEMM per kind on the tokens sorted by expert.

    W_up  = dequantize(gate_up_proj)            (E, R, H), one launch, every width (triton_dequant)
    h     = act(x[sorted] @ W_up[e]^T)          one grouped GEMM over the sorted slots (SwiGLU: one launch)
    W_dn  = dequantize(down_proj)               (E, H, I), after W_up is freed
    out   = sum_k w_route * (h @ W_dn[e]^T)     one grouped GEMM, then each token gathers its k rows

The weights are made exactly as the reference path makes them (quant/modules.
dequantize_experts_forward: s (q - z) in float32, rounded to the activations' dtype); what differs
is one launch for all experts, where the reference loops over them in Python with a
dequantization and two matmuls each. The fused kernels (triton_experts) read the codes again for
every tile of 128 tokens, which costs more than this once the experts have ~128 tokens each
(quant/modules.FUSED_MAX_TOKENS_PER_EXPERT).
"""
from __future__ import annotations

from functools import lru_cache

import torch

from . import triton_dequant
from .triton_experts import PackedMatrices, combine_rows, route

try:
    import triton
    import triton.language as tl
except ImportError:  # the grouped backend needs Triton (quant/modules.set_experts_backend says so)
    triton = None


def dequantize_stack(mats: PackedMatrices, counts: torch.Tensor, dtype, words: bool | None = None,
                     tiles: tuple[int, int, int] | None = None) -> torch.Tensor:
    """(E, R, C) weights of every expert that has tokens (the others' slices left unwritten): read as
    int32 words where the rows are whole words (``words``; None: where they are), else as bytes;
    ``tiles``: the kernel's (None: its default)."""
    words = mats.words is not None if words is None else words
    if words:
        return triton_dequant.dequantize_experts_words(mats.words, mats.word_offsets, mats.bits, counts, mats.scale,
                                                       mats.zero, mats.cols, mats.group_size, dtype,
                                                       tiles=tiles or triton_dequant.WORDS_TILES)
    return triton_dequant.dequantize_experts_triton(mats.codes, mats.code_offsets, mats.bits, counts, mats.scale,
                                                    mats.zero, mats.cols, dtype, tiles=tiles or triton_dequant.DEQUANT_TILES)


def grouped_mm(a: torch.Tensor, w: torch.Tensor, ends: torch.Tensor, *, fused: bool) -> torch.Tensor:
    """(M, N) rows of a (M, K) sorted by group, times each group's w[g] (E, N, K) transposed;
    ``ends`` the int32 end row of each group. ``fused``: torch's grouped GEMM (one launch), else one
    matmul per group that has rows."""
    if fused:
        return torch._grouped_mm(a, w.transpose(1, 2), offs=ends)
    out = a.new_empty(a.shape[0], w.shape[1])
    start = 0
    for g, end in enumerate(ends.tolist()):
        if end > start:
            out[start:end] = a[start:end] @ w[g].T
        start = end
    return out


@lru_cache(maxsize=None)
def _grouped_mm_runs(device: torch.device, dtype: torch.dtype) -> bool:
    try:
        a = torch.ones(16, 16, device=device, dtype=dtype)
        ends = torch.tensor([8, 16], device=device, dtype=torch.int32)
        return bool(torch._grouped_mm(a, torch.ones(2, 16, 16, device=device, dtype=dtype), offs=ends).eq(16).all())
    except (RuntimeError, NotImplementedError, AttributeError):
        return False


def grouped_mm_applies(x: torch.Tensor) -> bool:
    """torch's grouped GEMM runs for x's device and dtype: which ones it takes differs between torch
    versions and GPUs (bf16 on Hopper in all that have it), so a tiny one is tried once per pair."""
    return _grouped_mm_runs(x.device, x.dtype)


def grouped_experts(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                    up: PackedMatrices, down: PackedMatrices, *, activation, swiglu: bool = False,
                    fused_mm: bool | None = None) -> torch.Tensor:
    """The MoE experts output (T, hidden). ``activation`` maps the (slots, R) output of ``up`` to
    (slots, I) (SwiGLU on [gate; up], or the family's own); ``swiglu``: it is plain SwiGLU, which
    one launch applies (swiglu_rows); ``fused_mm``: torch's grouped GEMM (None: where
    grouped_mm_applies)."""
    T, H = hidden.shape
    k = top_k_index.shape[-1]
    num_experts = up.scale.shape[0]
    fused_mm = grouped_mm_applies(hidden) if fused_mm is None else fused_mm
    order, counts, starts, _ = route(top_k_index, num_experts)
    ends = starts + counts
    x = hidden[order // k]
    expert = top_k_index.reshape(-1)[order] if up.bias is not None or down.bias is not None else None
    w_up = dequantize_stack(up, counts, hidden.dtype)
    h = grouped_mm(x, w_up, ends, fused=fused_mm)
    del w_up, x                                     # the down weights take their place
    if up.bias is not None:
        h = h + up.bias[expert].to(h.dtype)
    h = swiglu_rows(h, hidden.dtype) if swiglu else activation(h).to(hidden.dtype).contiguous()
    w_down = dequantize_stack(down, counts, hidden.dtype)
    y = grouped_mm(h, w_down, ends, fused=fused_mm)
    del w_down, h
    if down.bias is not None:
        y = y + down.bias[expert].to(y.dtype)
    return combine_slots(y, order, top_k_weights)


if triton is not None:

    @triton.jit
    def _swiglu_kernel(h_ptr, out_ptr, INTER, BLOCK: tl.constexpr):
        """out[r, c] = silu(h[r, c]) * h[r, INTER + c], in float32, rounded once to out's dtype."""
        r = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = c < INTER
        g = tl.load(h_ptr + r * 2 * INTER + c, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(h_ptr + r * 2 * INTER + INTER + c, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + r * INTER + c, (g * tl.sigmoid(g) * u).to(out_ptr.dtype.element_ty), mask=mask)


def swiglu_rows(h: torch.Tensor, dtype) -> torch.Tensor:
    """silu(gate) * up of h's (rows, 2 I) [gate; up] halves as (rows, I) in ``dtype``: one launch that
    reads h once and writes the result once (torch's silu, then the product, read and write it three
    times: 0.25-0.36 ms of a Mixtral-shaped layer at 4096 tokens on an H100, though slower by 0.12 ms
    at 1024 tokens in one run; benchmarks/results/bench_experts_kernel_h100_v11*), in float32,
    rounded once."""
    h = h.contiguous()
    inter = h.shape[1] // 2
    out = torch.empty(h.shape[0], inter, device=h.device, dtype=dtype)
    if h.shape[0]:
        _swiglu_kernel[(h.shape[0], triton.cdiv(inter, 1024))](h, out, inter, BLOCK=1024, num_warps=4)
    return out


def combine_slots(y: torch.Tensor, order: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    """(T, H) sums over each token's k slots of its routing weight times the slot's row of y (rows
    sorted by expert, ``order`` the slot at each row): each token gathers its k rows, so nothing is
    added with atomics and the sum is the same every call."""
    T, k = top_k_weights.shape
    position = torch.empty_like(order)
    position[order] = torch.arange(order.numel(), device=order.device)
    return combine_rows(y, T, k, y.dtype, weights=top_k_weights, position=position)

"""Many tokens per expert (prefill, loglikelihood): every expert dequantized once, in one launch per
kind of matrix, then one grouped GEMM per kind on the tokens sorted by expert.

    W_up  = dequantize(gate_up_proj)            (E, R, H), one launch, every width (triton_dequant)
    h     = act(x[sorted] @ W_up[e]^T)          one grouped GEMM over the sorted slots (SwiGLU: one launch)
    W_dn  = dequantize(down_proj)               (E, H, I), on a second CUDA stream during that GEMM
    out   = sum_k w_route * (h @ W_dn[e]^T)     one grouped GEMM, then the slots added per token

The weights are made exactly as the reference path makes them (quant/modules.
dequantize_experts_forward: s (q - z) in float32, rounded to the activations' dtype); what differs
is one launch for all experts, where the reference loops over them in Python with a
dequantization and two matmuls each. The fused kernels (triton_experts) read the codes again for
every tile of 128 tokens, which costs more than this once the experts have ~256 tokens each
(quant/modules.FUSED_MAX_TOKENS_PER_EXPERT).
"""
from __future__ import annotations

from functools import lru_cache

import torch

from . import triton_dequant, triton_experts
from .triton_experts import PackedMatrices, route


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


@lru_cache(maxsize=None)
def _side_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)


def grouped_experts(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                    up: PackedMatrices, down: PackedMatrices, *, activation, swiglu: bool = False,
                    fused_mm: bool | None = None, overlap: bool | None = None) -> torch.Tensor:
    """The MoE experts output (T, hidden). ``activation`` maps the (slots, R) output of ``up`` to
    (slots, I) (SwiGLU on [gate; up], or the family's own); ``swiglu``: it is plain SwiGLU, which
    one Triton launch applies (triton_experts.swiglu); ``fused_mm``: torch's grouped GEMM (None:
    where grouped_mm_applies); ``overlap``: the down weights are dequantized on a second CUDA
    stream while the first grouped GEMM runs (None: on CUDA), holding both stacks at once."""
    T, H = hidden.shape
    k = top_k_index.shape[-1]
    num_experts = up.scale.shape[0]
    fused_mm = grouped_mm_applies(hidden) if fused_mm is None else fused_mm
    overlap = hidden.is_cuda if overlap is None else overlap
    order, counts, _, _ = route(top_k_index, num_experts)
    ends = torch.cumsum(counts, 0, dtype=torch.int32)
    token = order // k
    x = hidden[token]
    expert = top_k_index.reshape(-1)[order] if up.bias is not None or down.bias is not None else None
    w_up = dequantize_stack(up, counts, hidden.dtype)
    if overlap:
        main, side = torch.cuda.current_stream(hidden.device), _side_stream(hidden.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            w_down = dequantize_stack(down, counts, hidden.dtype)
    h = grouped_mm(x, w_up, ends, fused=fused_mm)
    del w_up, x                                     # without overlap the down weights take their place
    if up.bias is not None:
        h = h + up.bias[expert].to(h.dtype)
    h = triton_experts.swiglu(h, hidden.dtype) if swiglu else activation(h).to(hidden.dtype).contiguous()
    if overlap:
        main.wait_stream(side)
        w_down.record_stream(main)                  # made on the side stream, used and freed on this one
    else:
        w_down = dequantize_stack(down, counts, hidden.dtype)
    y = grouped_mm(h, w_down, ends, fused=fused_mm)
    del w_down, h
    if down.bias is not None:
        y = y + down.bias[expert].to(y.dtype)
    y = y.float() * top_k_weights.reshape(-1)[order].float()[:, None]
    out = torch.zeros(T, H, device=hidden.device, dtype=torch.float32)
    out.index_add_(0, token, y)
    return out.to(hidden.dtype)

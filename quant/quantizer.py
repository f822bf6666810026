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
"""
from __future__ import annotations

import torch

SUPPORTED_BITS = (1, 2, 3, 4, 8)


def check_bits(bits: int) -> int:
    if int(bits) != bits or int(bits) not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bit width {bits!r}: choose one of {', '.join(map(str, SUPPORTED_BITS))}")
    return int(bits)


def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).to(x.dtype)


def minmax_params(w: torch.Tensor, maxq: torch.Tensor, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """scale, zero of shape (..., 1) for groups laid out along the last dim of ``w``."""
    xmin = w.amin(dim=-1, keepdim=True).clamp(max=0)
    xmax = w.amax(dim=-1, keepdim=True).clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -torch.ones_like(xmin), xmin)
    xmax = torch.where(empty, torch.ones_like(xmax), xmax)
    scale = _fp16((xmax - xmin) / maxq)
    scale = torch.where(scale == 0, torch.full_like(scale, 6.2e-5), scale)  # below fp16 normal range
    if sym:
        zero = torch.floor((maxq + 1) / 2).expand_as(scale).clone()
    else:
        zero = torch.clamp(torch.round(-xmin / scale), torch.zeros_like(maxq), maxq).expand_as(scale).clone()
    return scale, zero


def binary_params(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mu = w.mean(dim=-1, keepdim=True)
    alpha = (w - mu).abs().mean(dim=-1, keepdim=True).clamp(min=3.1e-5)
    scale = _fp16(2 * alpha)
    zero = _fp16((alpha - mu) / scale)
    return scale, zero


def group_params(w: torch.Tensor, bits: torch.Tensor, sym: bool,
                 has_binary: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantization parameters for one group per row.

    w: (B, R, G) weights of B matrices; bits: (B,) bit width of each matrix (may differ).
    Returns scale, zero of shape (B, R, 1). ``has_binary``: whether any bits == 1, if the
    caller knows (avoids a device sync, e.g. inside a CUDA graph).
    """
    maxq = (2 ** bits.to(w.dtype) - 1).view(-1, 1, 1)
    scale, zero = minmax_params(w, maxq, sym)
    binary = (bits == 1).view(-1, 1, 1)
    if has_binary if has_binary is not None else bool(binary.any()):
        bscale, bzero = binary_params(w)
        scale = torch.where(binary, bscale, scale)
        zero = torch.where(binary, bzero, zero)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.round(w / scale + zero), torch.zeros_like(maxq), maxq)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (q - zero)


def rtn(weight: torch.Tensor, bits: int, groupsize: int, sym: bool = False):
    """Round-to-nearest quantization of a (R, C) matrix (the GPTQ baseline).

    Returns (codes (R, C) uint8, scale (R, G), zero (R, G), dequantized (R, C))."""
    bits = check_bits(bits)
    w = weight.float()
    rows, cols = w.shape
    gs = cols if groupsize <= 0 else groupsize
    groups = w.reshape(rows, cols // gs, gs)
    bits_t = torch.tensor([bits], device=w.device)
    scale, zero = group_params(groups.reshape(1, -1, gs), bits_t, sym)
    scale = scale.reshape(rows, cols // gs, 1)
    zero = zero.reshape(rows, cols // gs, 1)
    maxq = torch.tensor(2.0 ** bits - 1, device=w.device)
    q = quantize_codes(groups, scale, zero, maxq)
    deq = dequantize(q, scale, zero).reshape(rows, cols)
    return q.reshape(rows, cols).to(torch.uint8), scale[..., 0], zero[..., 0], deq

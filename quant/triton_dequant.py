"""Fused unpack + dequantize of one packed matrix as a Triton kernel (GPU path).

Reads each packed byte once and writes the weight once in the compute dtype, where the
eager version (quant/packing.dequantize_packed) makes several passes over
intermediate tensors. Same arithmetic: w = scale * (q - zero) in float32, then cast.
The tests run it through Triton's interpreter on the CPU (TRITON_INTERPRET=1).
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None


if triton is not None:
    @triton.jit
    def _dequant_kernel(q_ptr, s_ptr, z_ptr, out_ptr, R, C, W, G, GS,
                        BITS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        chunks = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)          # groups of 8 codes
        rmask = rows < R
        cmask = chunks < (C + 7) // 8
        m2 = rmask[:, None] & cmask[None, :]
        v = tl.zeros((BLOCK_R, BLOCK_J), dtype=tl.int64)
        for t in tl.static_range(BITS):                                     # BITS bytes per 8 codes
            byte = tl.load(q_ptr + rows[:, None] * W + chunks[None, :] * BITS + t, mask=m2, other=0)
            v = v | (byte.to(tl.int64) << (8 * t))
        k = tl.arange(0, 8)
        codes = (v[:, :, None] >> (k[None, None, :] * BITS)) & ((1 << BITS) - 1)
        cols = chunks[:, None] * 8 + k[None, :]                              # (BLOCK_J, 8)
        m3 = rmask[:, None, None] & (cols < C)[None, :, :]
        g = cols // GS
        scale = tl.load(s_ptr + rows[:, None, None] * G + g[None, :, :], mask=m3, other=0.0).to(tl.float32)
        zero = tl.load(z_ptr + rows[:, None, None] * G + g[None, :, :], mask=m3, other=0.0)
        w = scale * (codes.to(tl.float32) - zero)
        tl.store(out_ptr + rows[:, None, None] * C + cols[None, :, :], w.to(out_ptr.dtype.element_ty), mask=m3)


def available() -> bool:
    return triton is not None


def dequantize_triton(qweight: torch.Tensor, scales: torch.Tensor, zero: torch.Tensor, bits: int, cols: int,
                      dtype=torch.float16) -> torch.Tensor:
    """zero: the unpacked zero points as float32 (R, G)."""
    rows, groups = scales.shape
    out = torch.empty(rows, cols, device=qweight.device, dtype=dtype)
    block_r, block_j = 16, 32
    grid = (triton.cdiv(rows, block_r), triton.cdiv((cols + 7) // 8, block_j))
    _dequant_kernel[grid](qweight, scales, zero.contiguous(), out, rows, cols, qweight.shape[1], groups,
                          cols // groups, BITS=bits, BLOCK_R=block_r, BLOCK_J=block_j)
    return out

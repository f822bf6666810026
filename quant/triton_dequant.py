"""Fused unpack + dequantize of one packed matrix as a Triton kernel (GPU path).

Writes the weight once in the compute dtype, where the eager version
(quant/packing.dequantize_packed) makes several passes over intermediate tensors. Same arithmetic: w = scale * (q - zero) in float32, then cast.
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
                        BITS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        """A packed row is a little-endian bit stream (code c at bit c * BITS): each code is
        read from its byte, and the next one where it runs over (3 bits). Neighbouring
        threads take neighbouring columns, so the reads and the writes are coalesced."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        m2 = (rows < R)[:, None] & (cols < C)[None, :]
        bit = cols * BITS
        shift = (bit & 7)[None, :]
        ptr = q_ptr + rows[:, None].to(tl.int64) * W + (bit >> 3)[None, :]
        v = tl.load(ptr, mask=m2, other=0).to(tl.int32)
        if BITS == 3:
            v = v | (tl.load(ptr + 1, mask=m2 & (shift > 5), other=0).to(tl.int32) << 8)
        codes = (v >> shift) & ((1 << BITS) - 1)
        g = cols // GS
        scale = tl.load(s_ptr + rows[:, None] * G + g[None, :], mask=m2, other=0.0).to(tl.float32)
        zero = tl.load(z_ptr + rows[:, None] * G + g[None, :], mask=m2, other=0.0)
        w = scale * (codes.to(tl.float32) - zero)
        tl.store(out_ptr + rows[:, None].to(tl.int64) * C + cols[None, :], w.to(out_ptr.dtype.element_ty), mask=m2)


def available() -> bool:
    return triton is not None


def dequantize_triton(qweight: torch.Tensor, scales: torch.Tensor, zero: torch.Tensor, bits: int, cols: int,
                      dtype=torch.float16) -> torch.Tensor:
    """zero: the unpacked zero points as float32 (R, G)."""
    rows, groups = scales.shape
    out = torch.empty(rows, cols, device=qweight.device, dtype=dtype)
    block_r, block_c = 8, 256
    grid = (triton.cdiv(rows, block_r), triton.cdiv(cols, block_c))
    _dequant_kernel[grid](qweight, scales, zero.contiguous(), out, rows, cols, qweight.shape[1], groups,
                          cols // groups, BITS=bits, BLOCK_R=block_r, BLOCK_C=block_c)
    return out

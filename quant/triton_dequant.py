"""Fused unpack + dequantize of one packed matrix as a Triton kernel (GPU path).

Writes the weight once in the compute dtype, where the eager version
(quant/packing.dequantize_packed) makes several passes over intermediate tensors. Same
arithmetic: w = scale * (q - zero) in float32, then cast. The codes are read as the fused
experts kernel reads them (quant/triton_experts.py: _codes_tile).
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
    from .triton_experts import _codes_tile

    @triton.jit
    def _dequant_kernel(q_ptr, s_ptr, z_ptr, out_ptr, R, C, W, G, GS,
                        BITS: tl.constexpr, BLOCK_R: tl.constexpr, U: tl.constexpr):
        """A packed row is units of 8 codes, BITS bytes each (quant/packing.py): a program
        loads U units of BLOCK_R rows, unpacks them in registers in column order and writes
        8 U consecutive columns per row."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        unit = tl.program_id(1) * U + tl.arange(0, U)
        cols = tl.program_id(1) * U * 8 + tl.arange(0, U * 8)
        row_ok = (rows < R)[:, None]
        q = _codes_tile(q_ptr + rows.to(tl.int64) * W, unit, row_ok & (unit * 8 < C)[None, :], BITS)
        m2 = row_ok & (cols < C)[None, :]
        g = (cols // GS)[None, :]
        scale = tl.load(s_ptr + rows[:, None] * G + g, mask=m2, other=0.0).to(tl.float32)
        zero = tl.load(z_ptr + rows[:, None] * G + g, mask=m2, other=0.0)
        w = scale * (q.to(tl.float32) - zero)
        tl.store(out_ptr + rows[:, None].to(tl.int64) * C + cols[None, :], w.to(out_ptr.dtype.element_ty), mask=m2)


def available() -> bool:
    return triton is not None


def dequantize_triton(qweight: torch.Tensor, scales: torch.Tensor, zero: torch.Tensor, bits: int, cols: int,
                      dtype=torch.float16) -> torch.Tensor:
    """zero: the unpacked zero points as float32 (R, G)."""
    rows, groups = scales.shape
    out = torch.empty(rows, cols, device=qweight.device, dtype=dtype)
    block_r, units = 8, 32
    grid = (triton.cdiv(rows, block_r), triton.cdiv(triton.cdiv(cols, 8), units))
    _dequant_kernel[grid](qweight, scales, zero.contiguous(), out, rows, cols, qweight.shape[1], groups,
                          cols // groups, BITS=bits, BLOCK_R=block_r, U=units)
    return out

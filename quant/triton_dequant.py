"""Fused unpack + dequantize of one packed matrix as a Triton kernel (GPU path).

Writes the weight once in the compute dtype, where the eager version
(quant/packing.dequantize_packed) makes several passes over intermediate tensors. Same
arithmetic: w = scale * (q - zero) in float32, then cast. A packed row is read as units of 8
codes, ``bits`` bytes each (quant/packing.py), unpacked in column order in registers.
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
    def _unit_words(row_ptr, unit, mask, BITS: tl.constexpr):
        """Units ``unit`` of the packed rows at ``row_ptr``, (rows, U) int32 of 8 * BITS bits
        (BITS <= 4): a unit is 8 codes in BITS consecutive bytes, little-endian."""
        ptr = row_ptr[:, None] + unit[None, :] * BITS
        v = tl.load(ptr, mask=mask, other=0).to(tl.int32)
        for b in tl.static_range(1, BITS):
            v = v | (tl.load(ptr + b, mask=mask, other=0).to(tl.int32) << (8 * b))
        return v

    @triton.jit
    def _plane(v, row_ptr, unit, mask, j: tl.constexpr, BITS: tl.constexpr):
        """Code j of every unit, (rows, U) int32: shifted out of the unit, or (8 bits) its byte."""
        if BITS == 8:
            return tl.load(row_ptr[:, None] + unit[None, :] * 8 + j, mask=mask, other=0).to(tl.int32)
        else:
            return (v >> (j * BITS)) & ((1 << BITS) - 1)

    @triton.jit
    def _codes_tile(row_ptr, unit, mask, BITS: tl.constexpr):
        """The codes of units ``unit`` in column order, (rows, 8 U) int32: the 8 planes
        interleaved in registers (interleave(x, y) alternates x and y along the last axis)."""
        v = tl.zeros(mask.shape, dtype=tl.int32)
        if BITS != 8:
            v = _unit_words(row_ptr, unit, mask, BITS)
        p0 = _plane(v, row_ptr, unit, mask, 0, BITS)
        p1 = _plane(v, row_ptr, unit, mask, 1, BITS)
        p2 = _plane(v, row_ptr, unit, mask, 2, BITS)
        p3 = _plane(v, row_ptr, unit, mask, 3, BITS)
        p4 = _plane(v, row_ptr, unit, mask, 4, BITS)
        p5 = _plane(v, row_ptr, unit, mask, 5, BITS)
        p6 = _plane(v, row_ptr, unit, mask, 6, BITS)
        p7 = _plane(v, row_ptr, unit, mask, 7, BITS)
        return tl.interleave(tl.interleave(tl.interleave(p0, p4), tl.interleave(p2, p6)),
                             tl.interleave(tl.interleave(p1, p5), tl.interleave(p3, p7)))

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

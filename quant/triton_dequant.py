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

from . import triton_experts


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
    def _dequant_tile(q_ptr, s_ptr, z_ptr, out_ptr, R, C, W, G, GS: tl.constexpr, BITS: tl.constexpr, BLOCK_R: tl.constexpr,
                      U: tl.constexpr):
        """Tile (program_id(0), program_id(1)) of one (R, C) matrix, W bytes a row: U units of BLOCK_R
        rows loaded, unpacked in registers in column order, 8 U consecutive columns a row written."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        unit = tl.program_id(1) * U + tl.arange(0, U)
        cols = tl.program_id(1) * U * 8 + tl.arange(0, U * 8)
        row_ok = (rows < R)[:, None]
        q = _codes_tile(q_ptr + rows.to(tl.int64) * W, unit, row_ok & (unit * 8 < C)[None, :], BITS)
        m2 = row_ok & (cols < C)[None, :]
        g = (cols // GS)[None, :]
        scale = tl.load(s_ptr + rows[:, None] * G + g, mask=m2, other=0.0).to(tl.float32)
        zero = tl.load(z_ptr + rows[:, None] * G + g, mask=m2, other=0.0).to(tl.float32)
        w = scale * (q.to(tl.float32) - zero)
        tl.store(out_ptr + rows[:, None].to(tl.int64) * C + cols[None, :], w.to(out_ptr.dtype.element_ty), mask=m2)

    @triton.jit
    def _dequant_kernel(q_ptr, s_ptr, z_ptr, out_ptr, R, C, W, G, GS: tl.constexpr,
                        BITS: tl.constexpr, BLOCK_R: tl.constexpr, U: tl.constexpr):
        """A packed row is units of 8 codes, BITS bytes each (quant/packing.py)."""
        _dequant_tile(q_ptr, s_ptr, z_ptr, out_ptr, R, C, W, G, GS, BITS, BLOCK_R, U)

    @triton.jit
    def _dequant_experts_kernel(q_ptr, off_ptr, bits_ptr, count_ptr, s_ptr, z_ptr, out_ptr, R, C, G, GS: tl.constexpr,
                                BLOCK_R: tl.constexpr, U: tl.constexpr):
        """Expert program_id(2) of an (E, R, C) stack of packed matrices, each at its own width (one
        tile loop per width compiled in, the expert's picks one): its codes from byte
        off[e], written to out[e]; experts that no token is routed to (count[e] == 0) are skipped."""
        e = tl.program_id(2)
        if tl.load(count_ptr + e) == 0:
            return
        bits = tl.load(bits_ptr + e)
        q_e = q_ptr + tl.load(off_ptr + e)
        s_e = s_ptr + e.to(tl.int64) * R * G
        z_e = z_ptr + e.to(tl.int64) * R * G
        out_e = out_ptr + e.to(tl.int64) * R * C
        if bits == 1:
            _dequant_tile(q_e, s_e, z_e, out_e, R, C, C // 8, G, GS, 1, BLOCK_R, U)
        elif bits == 2:
            _dequant_tile(q_e, s_e, z_e, out_e, R, C, C // 4, G, GS, 2, BLOCK_R, U)
        elif bits == 3:
            _dequant_tile(q_e, s_e, z_e, out_e, R, C, C * 3 // 8, G, GS, 3, BLOCK_R, U)
        elif bits == 4:
            _dequant_tile(q_e, s_e, z_e, out_e, R, C, C // 2, G, GS, 4, BLOCK_R, U)
        else:
            _dequant_tile(q_e, s_e, z_e, out_e, R, C, C, G, GS, 8, BLOCK_R, U)


    @triton.jit
    def _words_tile(words_e, s_e, z_e, out_e, n, n_mask, k0, KW, G, ONE, GS: tl.constexpr, BITS: tl.constexpr,
                    BLOCK_K: tl.constexpr):
        """K tile k0 of rows n of one expert read as int32 words (the fused kernels' layout and code
        floats, triton_experts._tile_words / _tile_float: each thread unpacks whole columns of the
        tile, one row of W, every shift known when compiled), written as s (q - z), the reference's
        arithmetic: q = 2^BITS x - 2^BITS is exact."""
        K = KW * 32
        rows = words_e + n.to(tl.int64) * (KW * BITS)
        x = triton_experts._tile_float(triton_experts._tile_words(rows, k0, K, n_mask, BITS, BLOCK_K), ONE, BITS)
        q = x * (1 << BITS) - (1 << BITS)
        k = k0 + tl.arange(0, BLOCK_K)
        if GS % BLOCK_K == 0:                       # the tile lies in one group: a scale per row
            s = tl.load(s_e + n * G + k0 // GS, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            z = tl.load(z_e + n * G + k0 // GS, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        else:
            m = (k < K)[:, None] & n_mask[None, :]
            s = tl.load(s_e + n[None, :] * G + (k // GS)[:, None], mask=m, other=0.0).to(tl.float32)
            z = tl.load(z_e + n[None, :] * G + (k // GS)[:, None], mask=m, other=0.0).to(tl.float32)
        w = s * (q - z)
        tl.store(out_e + n[None, :].to(tl.int64) * K + k[:, None], w.to(out_e.dtype.element_ty),
                 mask=(k < K)[:, None] & n_mask[None, :])

    @triton.jit
    def _dequant_words_kernel(words_ptr, word_off_ptr, bits_ptr, count_ptr, s_ptr, z_ptr, out_ptr, R, KW, G, ONE,
                              GS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Program (row tile, K tile, expert) of an (E, R, 32 KW) stack read as int32 words; experts
        without tokens (count[e] == 0) skipped; one loop per width compiled in."""
        e = tl.program_id(2)
        if tl.load(count_ptr + e) == 0:
            return
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = n < R
        k0 = tl.program_id(1) * BLOCK_K
        bits = tl.load(bits_ptr + e)
        words_e = words_ptr + tl.load(word_off_ptr + e)
        e = e.to(tl.int64)
        s_e = s_ptr + e * R * G
        z_e = z_ptr + e * R * G
        out_e = out_ptr + e * R * KW * 32
        if bits == 1:
            _words_tile(words_e, s_e, z_e, out_e, n, n_mask, k0, KW, G, ONE, GS, 1, BLOCK_K)
        elif bits == 2:
            _words_tile(words_e, s_e, z_e, out_e, n, n_mask, k0, KW, G, ONE, GS, 2, BLOCK_K)
        elif bits == 3:
            _words_tile(words_e, s_e, z_e, out_e, n, n_mask, k0, KW, G, ONE, GS, 3, BLOCK_K)
        elif bits == 4:
            _words_tile(words_e, s_e, z_e, out_e, n, n_mask, k0, KW, G, ONE, GS, 4, BLOCK_K)
        else:
            _words_tile(words_e, s_e, z_e, out_e, n, n_mask, k0, KW, G, ONE, GS, 8, BLOCK_K)


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


DEQUANT_TILES = (1, 256, 4)   # rows, units of 8 codes (columns / 8), warps: --dequant_sweep, v10


def dequantize_experts_triton(codes: torch.Tensor, code_offsets: torch.Tensor, bits: torch.Tensor,
                              counts: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, cols: int,
                              dtype, tiles: tuple[int, int, int] = DEQUANT_TILES) -> torch.Tensor:
    """(E, R, C) weights in ``dtype`` from a stack of packed experts, one launch: flat uint8
    ``codes``, each expert's byte offset and width (device tensors), scales and decoded zeros
    (E, R, G). Experts with ``counts[e] == 0`` are skipped: their slice of the result is left
    unwritten (nothing should read it). ``tiles``: (rows, units of 8 codes, warps) a program."""
    experts, rows, groups = scale.shape
    out = torch.empty(experts, rows, cols, device=codes.device, dtype=dtype)
    block_r, units, warps = tiles
    grid = (triton.cdiv(rows, block_r), triton.cdiv(triton.cdiv(cols, 8), units), experts)
    _dequant_experts_kernel[grid](codes, code_offsets, bits, counts, scale, zero, out, rows, cols, groups,
                                  cols // groups, BLOCK_R=block_r, U=units, num_warps=warps)
    return out


WORDS_TILES = (32, 128, 1)    # rows, codes (K), warps: --dequant_sweep, v10


def dequantize_experts_words(words: torch.Tensor, word_offsets: torch.Tensor, bits: torch.Tensor,
                             counts: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, cols: int,
                             group_size: int, dtype, tiles: tuple[int, int, int] = WORDS_TILES) -> torch.Tensor:
    """As dequantize_experts_triton, the codes read as int32 words (rows of whole words in one group:
    triton_experts.words_ok; ``words`` / ``word_offsets`` as in triton_experts.PackedMatrices)."""
    experts, rows, groups = scale.shape
    out = torch.empty(experts, rows, cols, device=words.device, dtype=dtype)
    block_n, block_k, warps = tiles
    grid = (triton.cdiv(rows, block_n), triton.cdiv(cols, block_k), experts)
    _dequant_words_kernel[grid](words, word_offsets, bits, counts, scale, zero, out, rows, cols // 32, groups,
                                triton_experts.ONE_BITS, GS=group_size, BLOCK_N=block_n, BLOCK_K=block_k,
                                num_warps=warps)
    return out

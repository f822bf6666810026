"""GPTQ's column loop over one sub-block of columns as one Triton kernel (GPU path).

Inside a sub-block (<= 32 columns, one quantization group), for column i of every row of
every matrix b of the batch:

    q_i  = clamp(rne(z + w_i / s), 0, maxq)           (the group's s, z already fixed)
    e_i  = (w_i - s (q_i - z)) / Hinv[b]_ii
    w_j -= e_i Hinv[b]_ij      for the sub-block's columns j > i

Rows are independent, so a program holds a tile of rows x the sub-block's columns in
registers and walks the columns; codes and errors are stored once per tile. The eager
loop (quant/gptq.py, _BlockRunner._columns) runs ~10 kernels per column over strided
columns: ~11 ms of a 14 ms block of 47 DeepSeek-V3 experts on an H100. Same arithmetic
(IEEE divisions, round half to even); the GPU may fuse the update's multiply and subtract
(one rounding instead of two). The lazy update of the block's later columns and the group
parameters stay in quant/gptq.py. The tests run it through Triton's interpreter on the CPU.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None


if triton is not None:
    from .triton_search import _round_half_even

    @triton.jit
    def _columns_kernel(w_ptr, h_ptr, s_ptr, z_ptr, m_ptr, q_ptr, e_ptr, R, BS, G1, j0, width, g,
                        BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        rows = tl.program_id(1).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_S)
        row_ok = rows < R
        col_ok = cols < width
        ok = row_ok[:, None] & col_ok[None, :]
        at = b * R * BS + rows[:, None] * BS + j0 + cols[None, :]          # (B, R, BS) buffers
        w = tl.load(w_ptr + at, mask=ok, other=0.0)
        s = tl.load(s_ptr + b * R * G1 + rows * G1 + g, mask=row_ok, other=1.0)
        z = tl.load(z_ptr + b * R * G1 + rows * G1 + g, mask=row_ok, other=0.0)
        maxq = tl.load(m_ptr + b)
        h_row0 = h_ptr + b * BS * BS + j0 * BS + j0                        # Hinv[b, j0, j0]
        q_tile = tl.zeros((BLOCK_R, BLOCK_S), dtype=tl.float32)
        e_tile = tl.zeros((BLOCK_R, BLOCK_S), dtype=tl.float32)
        for i in range(0, width):
            here = (cols == i)[None, :]
            w_i = tl.sum(tl.where(here, w, 0.0), axis=1)
            q = tl.minimum(tl.maximum(_round_half_even(z + tl.math.div_rn(w_i, s)), 0.0), maxq)
            d = tl.load(h_row0 + i * BS + i)
            err = tl.math.div_rn(w_i - s * (q - z), d)
            h = tl.load(h_row0 + i * BS + cols, mask=col_ok & (cols > i), other=0.0)
            w = w - err[:, None] * h[None, :]
            q_tile = tl.where(here, q[:, None], q_tile)
            e_tile = tl.where(here, err[:, None], e_tile)
        tl.store(q_ptr + at, q_tile, mask=ok)
        tl.store(e_ptr + at, e_tile, mask=ok)


def available() -> bool:
    return triton is not None


def quantize_columns(W1: torch.Tensor, H1: torch.Tensor, S1: torch.Tensor, Z1: torch.Tensor, maxq: torch.Tensor,
                     Q1: torch.Tensor, E1: torch.Tensor, j0: int, j1: int, g: int) -> None:
    """Columns j0 .. j1-1 of the block buffers (W1, Q1, E1: (B, R, BS); H1: (B, BS, BS) the
    block's Hinv; S1, Z1: (B, R, G1); maxq: (B, ...) one per matrix), all in group g: codes
    into Q1, scaled errors into E1. W1's own columns j0 .. j1-1 are not written back (the
    block needs only its later columns, updated from E1 afterwards)."""
    B, R, BS = W1.shape
    for t in (W1, H1, S1, Z1, Q1, E1):
        assert t.is_contiguous() and t.dtype == torch.float32
    width = j1 - j0
    block_s = max(16, triton.next_power_of_2(width))
    block_r = max(1, min(64, 2048 // block_s))
    grid = (B, triton.cdiv(R, block_r))
    _columns_kernel[grid](W1, H1, S1, Z1, maxq.reshape(B).contiguous(), Q1, E1, R, BS, S1.shape[2], j0, width, g,
                          BLOCK_R=block_r, BLOCK_S=block_s)

"""The grid search's group error (quant/quantizer.group_error) as one Triton kernel (GPU path).

For each group (a row of w, G weights) it quantizes, dequantizes and sums the weighted
squared error in registers:

    err = sum_j c_j (w_j - s (clamp(rne(z + w_j / s), 0, maxq) - z))^2

where the eager version makes six passes over (B, R, G) float32 tensors per candidate, and
the search tries seven candidates per group: on a DeepSeek-V3 chunk of experts this was
about half of GPTQ's block time on an H100. Same arithmetic as the eager version (IEEE
division, round half to even, then the products); only the order of the final sum over a
group differs. The tests run it through Triton's interpreter on the CPU (TRITON_INTERPRET=1).
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
    def _round_half_even(x):
        f = tl.floor(x)
        d = x - f
        odd = f - 2.0 * tl.floor(f * 0.5)   # 1.0 where f is odd
        return tl.where(d > 0.5, f + 1.0, tl.where(d < 0.5, f, f + odd))

    @triton.jit
    def _group_error_kernel(w_ptr, s_ptr, z_ptr, m_ptr, c_ptr, out_ptr, R, G,
                            swb, swr, swg, ssb, ssr, szb, szr, smb, scb, scg,
                            HAS_C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        rows = tl.program_id(1).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_G)
        row_ok = rows < R
        ok = row_ok[:, None] & (cols < G)[None, :]
        w = tl.load(w_ptr + b * swb + rows[:, None] * swr + cols[None, :] * swg, mask=ok, other=0.0)
        s = tl.load(s_ptr + b * ssb + rows * ssr, mask=row_ok, other=1.0)[:, None]
        z = tl.load(z_ptr + b * szb + rows * szr, mask=row_ok, other=0.0)[:, None]
        maxq = tl.load(m_ptr + b * smb)
        q = _round_half_even(z + tl.math.div_rn(w, s))
        q = tl.minimum(tl.maximum(q, 0.0), maxq)
        e = w - s * (q - z)
        e = e * e
        if HAS_C:
            e = e * tl.load(c_ptr + b * scb + cols * scg, mask=cols < G, other=0.0)[None, :]
        e = tl.where(ok, e, 0.0)
        tl.store(out_ptr + b * R + rows, tl.sum(e, axis=1), mask=row_ok)


def available() -> bool:
    return triton is not None


def group_error_triton(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: torch.Tensor,
                       colw: torch.Tensor | None = None) -> torch.Tensor:
    """group_error's contract: w (B, R, G) float32 (any strides); scale, zero (B, R, 1) or
    broadcastable to it; maxq broadcastable to (B, 1, 1); colw (B, 1, G), (1, 1, G) or None.
    Returns (B, R, 1) float32."""
    B, R, G = w.shape
    scale, zero = scale.expand(B, R, 1), zero.expand(B, R, 1)
    maxq = maxq.to(w.dtype).expand(B, 1, 1)
    out = torch.empty(B, R, 1, device=w.device, dtype=torch.float32)
    c = colw.expand(B, 1, G) if colw is not None else w   # (unused without HAS_C)
    block_g = triton.next_power_of_2(G)
    block_r = max(1, min(64, 8192 // block_g))
    grid = (B, triton.cdiv(R, block_r))
    _group_error_kernel[grid](w, scale, zero, maxq, c, out, R, G,
                              w.stride(0), w.stride(1), w.stride(2), scale.stride(0), scale.stride(1),
                              zero.stride(0), zero.stride(1), maxq.stride(0), c.stride(0), c.stride(-1),
                              HAS_C=colw is not None, BLOCK_R=block_r, BLOCK_G=block_g)
    return out

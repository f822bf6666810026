"""Fused mixed-bit MoE experts: grouped GEMMs straight from the packed codes (GPU path).

One launch computes every routed expert's gate/up projection, whatever width each expert
has, and one more launch its down projection; the codes are unpacked and dequantized in
registers, never written out:

    tokens sorted by expert (a stable sort of the T*k routing slots, no host sync)
    h  = silu(x W_gate^T) * (x W_up^T)      launch 1, rows of x gathered by slot // k
    y  = w_route * (h W_down^T)             launch 2, rows written back to their slot
    out[t] = sum over t's k slots of y      (one reduction)

A program owns (expert, BLOCK_M of its tokens, BLOCK_N output rows) and walks the input
columns BLOCK_K at a time. A packed row (quant/packing.py) is units of 8 codes, ``bits``
bytes each: a unit is loaded with one byte load per bit of width and its codes shifted out
in registers. One loop per width is compiled in; the expert's width picks one at run time,
so every mix runs in the same two launches. One token per tile runs on the CUDA cores
(products kept per (row, unit), reduced once at the end); more run on the tensor cores
(codes put in column order in registers, one ``tl.dot`` per K tile, the scale and zero
point applied after the dot when the tile lies in one group). Programs past an expert's
token count return at once, so the grid is sized from T alone. With few tokens (decode)
the down projection is split over K (``split_k``) and summed with float32 atomics, to keep
every SM reading codes.

The reference it is tested against is quant/modules.dequantize_experts_forward (dequantize
the routed experts, then matmuls); the tests run this file through Triton's interpreter on
the CPU (TRITON_INTERPRET=1), ``benchmarks/bench_experts_kernel.py --check`` on the GPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference path runs instead
    triton = None


def available() -> bool:
    return triton is not None


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
    def _scales(scale_e, zero_e, n, n_mask, mask, unit, k0, G, GS, ONE_GROUP: tl.constexpr):
        """Scale s and offset c = -s z of rows n for the units of one K tile: (rows, 1)
        inside one group, else (rows, U), so that w = q s + c."""
        if ONE_GROUP:
            g = k0 // GS
            s = tl.load(scale_e + n * G + g, mask=n_mask, other=0.0).to(tl.float32)[:, None]
            z = tl.load(zero_e + n * G + g, mask=n_mask, other=0.0).to(tl.float32)[:, None]
        else:
            gu = ((unit * 8) // GS)[None, :]
            s = tl.load(scale_e + n[:, None] * G + gu, mask=mask, other=0.0).to(tl.float32)
            z = tl.load(zero_e + n[:, None] * G + gu, mask=mask, other=0.0).to(tl.float32)
        return s, -s * z

    @triton.jit
    def _loop_fma(acc, acc_up, a_ptr, a_row, codes_e, n, n_mask, N, row_bytes, scale_e, zero_e, G, GS, K,
                  k_lo, k_hi, BITS: tl.constexpr, SILU: tl.constexpr, ONE_GROUP: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """One token (decode): acc (+ acc_up) += a @ W^T on the CUDA cores. A K tile is
        U = BLOCK_K / 8 units of 8 codes; code j of every unit (column 8u + j) is shifted out
        of the loaded unit, dequantized (w = q s + c) and multiplied with those columns of a.
        Products stay per (row, unit) until the loop ends, in the layout the codes were
        loaded in: one reduction over the units at the end."""
        U: tl.constexpr = BLOCK_K // 8
        u = tl.arange(0, U)
        rows = codes_e + n.to(tl.int64) * row_bytes
        rows_up = codes_e + (n + N).to(tl.int64) * row_bytes
        p = tl.zeros((BLOCK_N, U), dtype=tl.float32)
        p_up = tl.zeros((BLOCK_N, U), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            unit = k0 // 8 + u
            mask = n_mask[:, None] & (unit * 8 < K)[None, :]
            v = tl.zeros((BLOCK_N, U), dtype=tl.int32)
            v_up = tl.zeros((BLOCK_N, U), dtype=tl.int32)
            if BITS != 8:
                v = _unit_words(rows, unit, mask, BITS)
                if SILU:
                    v_up = _unit_words(rows_up, unit, mask, BITS)
            s, c = _scales(scale_e, zero_e, n, n_mask, mask, unit, k0, G, GS, ONE_GROUP)
            s_up, c_up = s, c
            if SILU:
                s_up, c_up = _scales(scale_e, zero_e, n + N, n_mask, mask, unit, k0, G, GS, ONE_GROUP)
            for j in tl.static_range(8):
                col = unit * 8 + j
                a = tl.load(a_ptr + a_row * K + col, mask=col < K, other=0.0).to(tl.float32)[None, :]
                p += (_plane(v, rows, unit, mask, j, BITS).to(tl.float32) * s + c) * a
                if SILU:
                    p_up += (_plane(v_up, rows_up, unit, mask, j, BITS).to(tl.float32) * s_up + c_up) * a
        acc += tl.sum(p, axis=1)[None, :]
        if SILU:
            acc_up += tl.sum(p_up, axis=1)[None, :]
        return acc, acc_up

    @triton.jit
    def _dot_tile(acc, a, a_sum, rows, unit, umask, k, kmask, scale_e, zero_e, n, n_mask, G, GS, k0,
                  BITS: tl.constexpr, ONE_GROUP: tl.constexpr, FP32_DOT: tl.constexpr):
        """acc += a @ W^T for one K tile of rows ``rows`` on the tensor cores. Inside one
        quantization group the scale and zero point come out of the sum,
        sum_k a_k s (q_k - z) = s (sum_k a_k q_k - z sum_k a_k), so the codes (exact small
        integers) go to the dot as they are; otherwise each weight is s (q - z) first."""
        q = _codes_tile(rows, unit, umask, BITS)
        if ONE_GROUP:
            g = k0 // GS
            s = tl.load(scale_e + n * G + g, mask=n_mask, other=0.0).to(tl.float32)
            z = tl.load(zero_e + n * G + g, mask=n_mask, other=0.0).to(tl.float32)
            if FP32_DOT:
                part = tl.dot(a, tl.trans(q.to(a.dtype)), input_precision="ieee")
            else:
                part = tl.dot(a, tl.trans(q.to(a.dtype)))
            acc += s[None, :] * (part - z[None, :] * a_sum[:, None])
        else:
            m2 = n_mask[:, None] & kmask[None, :]
            gk = (k // GS)[None, :]
            s = tl.load(scale_e + n[:, None] * G + gk, mask=m2, other=0.0).to(tl.float32)
            z = tl.load(zero_e + n[:, None] * G + gk, mask=m2, other=0.0).to(tl.float32)
            w = (s * (q.to(tl.float32) - z)).to(a.dtype)
            if FP32_DOT:
                acc += tl.dot(a, tl.trans(w), input_precision="ieee")
            else:
                acc += tl.dot(a, tl.trans(w))
        return acc

    @triton.jit
    def _loop_dot(acc, acc_up, a_ptr, a_rows, m_mask, codes_e, n, n_mask, N, row_bytes, scale_e, zero_e, G, GS, K,
                  k_lo, k_hi, BITS: tl.constexpr, SILU: tl.constexpr, ONE_GROUP: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FP32_DOT: tl.constexpr):
        """Many tokens (prefill): acc (+ acc_up) += a @ W^T, a tile of codes in column order
        per K step, one dot each."""
        U: tl.constexpr = BLOCK_K // 8
        u = tl.arange(0, U)
        rows = codes_e + n.to(tl.int64) * row_bytes
        rows_up = codes_e + (n + N).to(tl.int64) * row_bytes
        for k0 in range(k_lo, k_hi, BLOCK_K):
            unit = k0 // 8 + u
            umask = n_mask[:, None] & (unit * 8 < K)[None, :]
            k = k0 + tl.arange(0, BLOCK_K)
            kmask = k < K
            a = tl.load(a_ptr + a_rows[:, None] * K + k[None, :], mask=m_mask[:, None] & kmask[None, :], other=0.0)
            a_sum = tl.sum(a.to(tl.float32), axis=1)
            acc = _dot_tile(acc, a, a_sum, rows, unit, umask, k, kmask, scale_e, zero_e, n, n_mask, G, GS, k0,
                            BITS, ONE_GROUP, FP32_DOT)
            if SILU:
                acc_up = _dot_tile(acc_up, a, a_sum, rows_up, unit, umask, k, kmask, scale_e, zero_e, n + N, n_mask,
                                   G, GS, k0, BITS, ONE_GROUP, FP32_DOT)
        return acc, acc_up

    @triton.jit
    def _k_loop(acc, acc_up, a_ptr, a_rows, m_mask, codes_e, n, n_mask, N, row_bytes, scale_e, zero_e, G, GS, K,
                k_lo, k_hi, BITS: tl.constexpr, SILU: tl.constexpr, ONE_GROUP: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FP32_DOT: tl.constexpr):
        """One width's loop over K (BITS compiled in): the CUDA cores for a tile of one
        token, the tensor cores for more."""
        if BLOCK_M == 1:
            a_row = tl.sum(a_rows)
            return _loop_fma(acc, acc_up, a_ptr, a_row, codes_e, n, n_mask, N, row_bytes, scale_e, zero_e,
                             G, GS, K, k_lo, k_hi, BITS, SILU, ONE_GROUP, BLOCK_N, BLOCK_K)
        else:
            return _loop_dot(acc, acc_up, a_ptr, a_rows, m_mask, codes_e, n, n_mask, N, row_bytes, scale_e, zero_e,
                             G, GS, K, k_lo, k_hi, BITS, SILU, ONE_GROUP, BLOCK_M, BLOCK_N, BLOCK_K, FP32_DOT)

    @triton.jit
    def _experts_gemm_kernel(
            a_ptr, out_ptr, codes_ptr, code_off_ptr, bits_ptr, scale_ptr, zero_ptr, bias_ptr,
            order_ptr, counts_ptr, starts_ptr, route_w_ptr,
            N, K, R, G, GS, TOPK, M_TILES,
            GATHER_A: tl.constexpr, SCATTER_OUT: tl.constexpr, SILU: tl.constexpr, HAS_BIAS: tl.constexpr,
            ROUTE_WEIGHT: tl.constexpr, SPLIT_K: tl.constexpr, ONE_GROUP: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FP32_DOT: tl.constexpr):
        """out = a @ W_e^T for each expert e's sorted rows. N output columns (with SILU: the
        gate rows 0..N-1 and the up rows N..2N-1 of an expert's R = 2N rows)."""
        pid_em = tl.program_id(0)
        e = pid_em // M_TILES
        m_tile = pid_em % M_TILES
        count = tl.load(counts_ptr + e)
        if m_tile * BLOCK_M >= count:
            return
        m = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = m < count
        pos = tl.load(starts_ptr + e) + m                               # sorted slot positions
        slot = tl.load(order_ptr + pos, mask=m_mask, other=0)           # the original (token, k) slot
        if GATHER_A:
            a_rows = slot // TOPK
        else:
            a_rows = pos.to(tl.int64)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = n < N
        bits = tl.load(bits_ptr + e)
        row_bytes = ((K + 7) // 8) * bits
        codes_e = codes_ptr + tl.load(code_off_ptr + e)
        scale_e = scale_ptr + e.to(tl.int64) * R * G
        zero_e = zero_ptr + e.to(tl.int64) * R * G
        k_steps = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K)
        k_lo = tl.program_id(2) * k_steps * BLOCK_K
        k_hi = tl.minimum(K, k_lo + k_steps * BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        # one loop per width, each with its width compiled in; the expert's width picks one
        if bits == 1:
            acc, acc_up = _k_loop(acc, acc_up, a_ptr, a_rows, m_mask, codes_e, n, n_mask, N, row_bytes, scale_e, zero_e, G, GS, K,
                                  k_lo, k_hi, 1, SILU, ONE_GROUP, BLOCK_M, BLOCK_N, BLOCK_K, FP32_DOT)
        elif bits == 2:
            acc, acc_up = _k_loop(acc, acc_up, a_ptr, a_rows, m_mask, codes_e, n, n_mask, N, row_bytes, scale_e, zero_e, G, GS, K,
                                  k_lo, k_hi, 2, SILU, ONE_GROUP, BLOCK_M, BLOCK_N, BLOCK_K, FP32_DOT)
        elif bits == 3:
            acc, acc_up = _k_loop(acc, acc_up, a_ptr, a_rows, m_mask, codes_e, n, n_mask, N, row_bytes, scale_e, zero_e, G, GS, K,
                                  k_lo, k_hi, 3, SILU, ONE_GROUP, BLOCK_M, BLOCK_N, BLOCK_K, FP32_DOT)
        elif bits == 4:
            acc, acc_up = _k_loop(acc, acc_up, a_ptr, a_rows, m_mask, codes_e, n, n_mask, N, row_bytes, scale_e, zero_e, G, GS, K,
                                  k_lo, k_hi, 4, SILU, ONE_GROUP, BLOCK_M, BLOCK_N, BLOCK_K, FP32_DOT)
        else:
            acc, acc_up = _k_loop(acc, acc_up, a_ptr, a_rows, m_mask, codes_e, n, n_mask, N, row_bytes, scale_e, zero_e, G, GS, K,
                                  k_lo, k_hi, 8, SILU, ONE_GROUP, BLOCK_M, BLOCK_N, BLOCK_K, FP32_DOT)
        if HAS_BIAS:
            if tl.program_id(2) == 0:
                acc += tl.load(bias_ptr + e * R + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
                if SILU:
                    acc_up += tl.load(bias_ptr + e * R + N + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        if SILU:
            acc = acc * tl.sigmoid(acc) * acc_up
        if ROUTE_WEIGHT:
            acc = acc * tl.load(route_w_ptr + slot, mask=m_mask, other=0.0).to(tl.float32)[:, None]
        if SCATTER_OUT:
            out_rows = slot
        else:
            out_rows = pos.to(tl.int64)
        optr = out_ptr + out_rows[:, None] * N + n[None, :]
        omask = m_mask[:, None] & n_mask[None, :]
        if SPLIT_K == 1:
            tl.store(optr, acc.to(out_ptr.dtype.element_ty), mask=omask)
        else:
            tl.atomic_add(optr, acc, mask=omask)


@dataclass(frozen=True)
class Tiles:
    """Tile sizes of one launch; ``split_k`` > 1 sums partial products with atomics."""
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 2


@dataclass(frozen=True)
class PackedMatrices:
    """One kind (gate_up_proj, up_proj, down_proj) of a layer's packed experts, as the kernel
    reads them: flat uint8 codes, per-expert byte offsets and widths (device tensors), fp16
    scales and decoded zeros (E, R, G), R x C per expert, groups of ``group_size`` columns."""
    codes: torch.Tensor
    code_offsets: torch.Tensor
    bits: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    rows: int
    cols: int
    group_size: int
    bias: torch.Tensor | None = None


@lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (132 for anything not CUDA: the interpreter
    then picks the tiles an H100 would get)."""
    if device.type != "cuda":
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


# K tile: 16 units of 8 codes, so each of a tile's 8 dots (one per code position) has
# K = 16, the least tl.dot takes.
BLOCK_K = 128


BIG_MATRIX = 1 << 25   # rows x columns of one expert matrix from which the one-token tiles narrow


def group_size_ok(group_size: int) -> bool:
    """The kernel reads whole 8-code units inside one group: group sizes that are multiples of 16."""
    return group_size % 16 == 0


def choose_tiles(tokens: int, top_k: int, n_out: int, k: int, num_experts: int, sms: int, split: bool) -> Tiles:
    """Few tokens per expert (decode): one token per tile on the CUDA cores (a single token
    in) or 16 on the tensor cores, and K split until the active experts' row tiles fill the
    GPU twice over; many (prefill): larger tensor-core tiles."""
    slots = tokens * top_k
    active_experts = min(num_experts, slots)
    per_expert = slots / max(1, active_experts)
    if per_expert <= 8:
        bm = 1 if tokens == 1 else 16
        if bm == 1 and n_out * k >= BIG_MATRIX:
            # Large experts at one token: narrow row tiles (fewer registers, more programs) and
            # K split into spans of ~8 tiles. Mixtral-shaped layer on an H100: 0.55 ms against
            # 0.91 with 64-row tiles and an unsplit gate/up launch; Qwen3-shaped experts (below
            # the threshold) were slower that way (benchmarks/results/bench_experts_kernel_h100_v3*)
            split_k = max(1, min(8, triton.cdiv(k, BLOCK_K) // 8)) if split else 1
            return Tiles(1, 16, BLOCK_K, split_k, num_warps=4, num_stages=2)
        bn = 64
        split_k = 1
        if split:
            programs = max(1, active_experts) * triton.cdiv(n_out, bn)
            split_k = max(1, min(triton.cdiv(k, BLOCK_K), triton.cdiv(2 * sms, programs)))
        return Tiles(bm, bn, BLOCK_K, split_k, num_warps=4, num_stages=2)
    # 128 x 64 tiles, 8 warps, 3 stages: the fastest of the H100 sweep at 4096 tokens for both
    # layer shapes (Qwen3 5.8 ms against 6.8 with 64 x 128, Mixtral 37 against 52;
    # benchmarks/results/bench_experts_kernel_h100_v3_sweep.txt)
    return Tiles(128, 64, BLOCK_K, 1, num_warps=8, num_stages=3)


def _launch(a, out, mats: PackedMatrices, routing, n_out: int, *, gather_a: bool, scatter_out: bool, silu: bool,
            route_w: torch.Tensor | None, tiles: Tiles):
    order, counts, starts, top_k = routing
    num_experts = mats.scale.shape[0]
    # An expert gets at most one slot per token (top-k picks distinct experts): T rows.
    m_tiles = max(1, triton.cdiv(order.numel() // top_k, tiles.block_m))
    grid = (num_experts * m_tiles, triton.cdiv(n_out, tiles.block_n), tiles.split_k)
    dummy = mats.scale
    _experts_gemm_kernel[grid](
        a, out, mats.codes, mats.code_offsets, mats.bits, mats.scale, mats.zero,
        mats.bias if mats.bias is not None else dummy, order, counts, starts,
        route_w if route_w is not None else dummy,
        n_out, mats.cols, mats.rows, mats.scale.shape[2], mats.cols // mats.scale.shape[2], top_k, m_tiles,
        GATHER_A=gather_a, SCATTER_OUT=scatter_out, SILU=silu, HAS_BIAS=mats.bias is not None,
        ROUTE_WEIGHT=route_w is not None, SPLIT_K=tiles.split_k, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
        ONE_GROUP=(mats.group_size % tiles.block_k == 0), BLOCK_K=tiles.block_k, FP32_DOT=a.dtype == torch.float32, num_warps=tiles.num_warps,
        num_stages=tiles.num_stages)


def route(top_k_index: torch.Tensor, num_experts: int):
    """Slots sorted by expert (stable), tokens per expert and each expert's first sorted
    position; all on the device, no host sync."""
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.int32, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    starts = torch.cumsum(counts, 0, dtype=torch.int32) - counts
    return order, counts, starts, top_k_index.shape[-1]


def fused_experts(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                  up: PackedMatrices, down: PackedMatrices, *, gated: bool, fuse_silu: bool, activation=None,
                  tiles: tuple[Tiles, Tiles] | None = None) -> torch.Tensor:
    """The MoE experts output (T, hidden) for routed tokens. ``gated``: ``up`` holds
    [gate; up] rows (R = 2 I); ``fuse_silu``: silu(gate) * up inside the kernel, otherwise
    ``activation`` maps launch 1's (slots, R) output to (slots, I) (a family's own gating)."""
    T, H = hidden.shape
    k = top_k_index.shape[-1]
    sms = sm_count(hidden.device)
    num_experts = up.scale.shape[0]
    routing = route(top_k_index, num_experts)
    inter = up.rows // 2 if gated else up.rows
    # Few tokens (decode): launch 1 too is split over K, so that enough programs stream codes
    # (a Qwen3 layer at one token has 8 experts x 24 row tiles: 192 programs for 132 SMs); the
    # partial sums add up in float32 and the activation follows in torch. Otherwise SwiGLU is
    # applied in the kernel's registers where the family's gating is plain SwiGLU.
    t1 = tiles[0] if tiles else choose_tiles(T, k, up.rows, H, num_experts, sms, split=True)
    fused = gated and fuse_silu and t1.split_k == 1
    n1 = inter if fused else up.rows
    if t1.split_k == 1:
        h = torch.empty(T * k, n1, device=hidden.device, dtype=hidden.dtype)
    else:
        h = torch.zeros(T * k, n1, device=hidden.device, dtype=torch.float32)
    _launch(hidden.contiguous(), h, up, routing, n1, gather_a=True, scatter_out=False, silu=fused, route_w=None,
            tiles=t1)
    if not fused:
        if gated and fuse_silu:
            h = torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]
        else:
            h = activation(h)
        h = h.to(hidden.dtype).contiguous()
    t2 = tiles[1] if tiles else choose_tiles(T, k, H, inter, num_experts, sms, split=True)
    y = torch.zeros(T * k, H, device=hidden.device, dtype=torch.float32)
    _launch(h, y, down, routing, H, gather_a=False, scatter_out=True, silu=False,
            route_w=top_k_weights.reshape(-1).contiguous(), tiles=t2)
    return y.view(T, k, H).sum(1).to(hidden.dtype)


def linear_routing(tokens: int, device) -> tuple:
    """One "expert" that every token goes to: a quantized linear through the same kernel."""
    return (torch.arange(tokens, device=device), torch.full((1,), tokens, dtype=torch.int32, device=device),
            torch.zeros(1, dtype=torch.int32, device=device), 1)


def fused_linear(x: torch.Tensor, mats: PackedMatrices, tiles: Tiles | None = None) -> torch.Tensor:
    """x (T, C) @ W^T for one packed (R, C) matrix (``mats`` with one expert), no bias."""
    T = x.shape[0]
    t = tiles or choose_tiles(T, 1, mats.rows, mats.cols, 1, sm_count(x.device), split=True)
    out = torch.zeros(T, mats.rows, device=x.device, dtype=torch.float32 if t.split_k > 1 else x.dtype)
    _launch(x.contiguous(), out, mats, linear_routing(T, x.device), mats.rows, gather_a=False, scatter_out=False,
            silu=False, route_w=None, tiles=t)
    return out.to(x.dtype)

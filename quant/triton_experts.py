"""Fused mixed-bit MoE experts: the routed experts computed straight from the packed codes (GPU path).

One launch computes every routed expert's gate/up projection, whatever width each expert
has, and one more launch its down projection; the codes are unpacked and dequantized in
registers, never written to memory:

    h   = silu(x W_gate^T) * (x W_up^T)      launch 1, one row per routing slot (token, expert)
    y   = h W_down^T                          launch 2, one row per slot (per K span where K is split)
    out[t] = sum_j w[t, j] y[t k + j]         combine_rows: float32, a fixed order, no atomics, so
                                              the same output every call

Both kernels read a packed row (quant/packing.py) as little-endian int32 words, so a layer
needs rows of whole words inside one quantization group (``words_ok``: columns and group
size multiples of 32); other layers run the dequantize path. One loop per width is compiled
in and the expert's width picks one at run time, so every mix of 1/2/3/4/8 bits runs in the
same two launches.

- ``_gemv_kernel`` (decode: one token, or no more routed slots than twice the experts): one program per
  (routed slot, row tile, K span), the expert read off top_k_index in the kernel (no sort, no
  routing tables), each code masked in place into a subnormal float and multiplied by its
  activation lifted by a power of two (one AND and one FFMA a code and row; a 3-bit row read
  as units of 3 words, 32 codes), the scale and zero point applied once per word; K split
  over programs for the down projection.
- ``_experts_mma_kernel`` (more tokens): slots sorted by expert (route(), no host sync), a
  program owns (expert, BLOCK_M of its tokens, BLOCK_N rows) and per K tile makes the weights
  w = s (q - z) in registers from the words (shifted under the exponent of 1.0, one multiply-add, rounded to
  the activations' dtype as the reference's dequantized matrix is) and hands them to one
  ``tl.dot`` on the tensor cores. Programs past an expert's token count return at once, so the
  grid is sized from T alone.

The reference it is tested against is quant/modules.dequantize_experts_forward (dequantize
the routed experts, then matmuls); the tests run this file through Triton's interpreter on
the CPU (TRITON_INTERPRET=1), ``benchmarks/bench_experts_kernel.py --check`` on the GPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
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
    def _finish(acc, acc_up, out_ptr, out_rows, n, n_mask, m_mask, e, bias_ptr, R, N, k_span, SPAN,
                SILU: tl.constexpr, HAS_BIAS: tl.constexpr):
        """The end of a grouped program, (tokens, rows) sums in: the bias (added by the first K span
        only), SwiGLU, then stored into ``out_rows`` of the K span's partial sums (SPAN elements
        apart; combine_rows adds them in a fixed order, no atomics)."""
        if HAS_BIAS:
            if k_span == 0:
                acc += tl.load(bias_ptr + e * R + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
                if SILU:
                    acc_up += tl.load(bias_ptr + e * R + N + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        if SILU:
            acc = acc * tl.sigmoid(acc) * acc_up
        optr = out_ptr + k_span.to(tl.int64) * SPAN + out_rows[:, None] * N + n[None, :]
        tl.store(optr, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])

    @triton.jit
    def _sorted_slots(e, m_tile, count, starts_ptr, order_ptr, BLOCK_M: tl.constexpr):
        """Tile m_tile of expert e's ``count`` routed slots (sorted by expert, route()): the mask, the
        sorted positions and the original (token, k) slots."""
        m = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = m < count
        pos = tl.load(starts_ptr + e) + m
        slot = tl.load(order_ptr + pos, mask=m_mask, other=0)
        return m_mask, pos, slot


    # ---- decode: one routing slot (token, expert) per program, codes read as int32 words ----
    # A row of K codes at ``bits`` bits is K * bits / 32 little-endian int32 words (K a multiple
    # of 32): with 1, 2, 4 or 8 bits word w holds codes 32/bits * w .. 32/bits * (w + 1) - 1,
    # lowest bits first; with 3 bits, units of 3 words hold 32 codes, codes 10 and 21 straddling
    # two words (_unit3_term).

    # A code is made a float by masking it in place: q at bits p .. p + bits - 1 of a word with a
    # zero exponent field is the subnormal float q 2^(p - 149), exact, and the GPU's float32
    # multiply-add keeps subnormals (Triton emits no .ftz). Its activation, lifted by 2^(LIFT - p),
    # makes the product a q 2^(LIFT - 149), the same power of two for every code, so one AND and
    # one FFMA per code and row (was a shift, a LOP3 and the FFMA); the sum is brought back by
    # 2^(149 - LIFT) once per element. Codes above bit 15 are read from the word shifted down by
    # 16 (one shift per word), so p <= 15 (3 bits: <= 20), below the exponent field. The lifted
    # activation is exact (a power of two) and finite for |a| < 2^(127 - LIFT) = 2^63; the product
    # is a normal float for |a| >= 2^(23 - LIFT) = 2^-41 (smaller activations still add, with
    # fewer bits).
    LIFT = tl.constexpr(64)

    @triton.jit
    def _high_half(w):
        """The word shifted down by 16: the high half's codes at bits 0 .. 15."""
        return (w.to(tl.uint32, bitcast=True) >> 16).to(tl.int32, bitcast=True)

    @triton.jit
    def _code_term(w, w_hi, a, j: tl.constexpr, BITS: tl.constexpr):
        """a q 2^(LIFT - 149) for code j of the (rows, elements) words w (1, 2, 4 or 8 bits) and the
        elements' activation a: the low half's codes masked in place in w, the high half's in
        w_hi = w >> 16, each the subnormal q 2^(p - 149), times a 2^(LIFT - p)."""
        P: tl.constexpr = 32 // BITS
        if j < P // 2:
            p: tl.constexpr = j * BITS
            x = w & (((1 << BITS) - 1) << p)
        else:
            p: tl.constexpr = (j - P // 2) * BITS
            x = w_hi & (((1 << BITS) - 1) << p)
        return x.to(tl.float32, bitcast=True) * (a * (2.0 ** (LIFT - p)))[None, :]

    @triton.jit
    def _unit3_term(w0, w1, w2, h0, h1, h2, a, c: tl.constexpr):
        """As _code_term for code c (0..31) of units of 32 3-bit codes, code c at bits 3c .. 3c + 2
        of the unit's three words w0, w1, w2 (h0, h1, h2: the same shifted down by 16). Codes 10
        and 21 start at bit 30 and 31 of a word and take their high bits from the next word's
        lowest: moved to bit 0."""
        q0: tl.constexpr = 3 * c
        j: tl.constexpr = q0 // 32                      # the word the code starts in
        off: tl.constexpr = q0 - 32 * j
        if j == 0:
            lo = w0
            lo_hi = h0
            hi = w1
        elif j == 1:
            lo = w1
            lo_hi = h1
            hi = w2
        else:
            lo = w2
            lo_hi = h2
            hi = w2
        if off <= 20:
            p: tl.constexpr = off
            x = lo & (7 << off)
        elif off <= 29:
            p: tl.constexpr = off - 16
            x = lo_hi & (7 << (off - 16))
        else:                                           # straddles: 32 - off bits here, the rest in hi
            p: tl.constexpr = 0
            x = ((lo.to(tl.uint32, bitcast=True) >> off).to(tl.int32, bitcast=True) | (hi << (32 - off))) & 7
        return x.to(tl.float32, bitcast=True) * (a * (2.0 ** (LIFT - p)))[None, :]

    @triton.jit
    def _word_sum(pq, a_sum, s, z):
        """s sum_k a_k (q_k - z) from pq = sum_k a_k q_k 2^(LIFT - 149) and a_sum = sum_k a_k."""
        return s * (pq * (2.0 ** (149 - LIFT)) - z * a_sum)

    @triton.jit
    def _word_scales(scale_rows, zero_rows, n_mask, c0, c_hi, col0, GS: tl.constexpr, P: tl.constexpr,
                     NW: tl.constexpr):
        """Scale and zero point of each (row, element) of a tile of elements c0 .. c0 + NW - 1 of P
        codes each (a word: 32 / bits; a 3-bit unit: 32), elements up to c_hi in the row, ``col0``
        the column of each element's first code, which sets its group: (rows, 1) when the tile lies
        in one group, else one (rows,) load per group the tile can touch and a select per element.
        (A 2D load whose addresses repeat along the elements made the compiler lay the tile out one
        row per thread, every activation then loaded once per row.)"""
        g0 = (c0 * P) // GS
        if (NW * P) % GS == 0:
            NG: tl.constexpr = (NW * P) // GS           # tiles start on group boundaries
        else:
            NG: tl.constexpr = (NW * P) // GS + 2
        if GS % (NW * P) == 0:
            s = tl.load(scale_rows + g0, mask=n_mask, other=0.0).to(tl.float32)[:, None]
            z = tl.load(zero_rows + g0, mask=n_mask, other=0.0).to(tl.float32)[:, None]
        else:
            if (NW * P) % GS == 0:
                in_group = (tl.arange(0, NW) * P // GS)[None, :]   # known when compiled
            else:
                in_group = (col0 // GS - g0)[None, :]
            s = tl.zeros((scale_rows.shape[0], NW), dtype=tl.float32)
            z = tl.zeros((scale_rows.shape[0], NW), dtype=tl.float32)
            for gi in tl.static_range(NG):
                # the group exists in this span if its first code lies before element c_hi's
                ok = n_mask & (tl.zeros(n_mask.shape, tl.int32) + (g0 + gi) * GS < c_hi * P)
                s = tl.where(in_group == gi, tl.load(scale_rows + g0 + gi, mask=ok, other=0.0).to(tl.float32)[:, None], s)
                z = tl.where(in_group == gi, tl.load(zero_rows + g0 + gi, mask=ok, other=0.0).to(tl.float32)[:, None], z)
        return s, z

    @triton.jit
    def _elem_words(rows, c, mask, BITS: tl.constexpr):
        """The words of elements c of each row, (rows, elements): one word (1, 2, 4, 8 bits), or the
        three words of a unit of 32 codes (3 bits); (w, w, w) in the first case. The units are loaded
        as (elements, rows) and transposed: loaded (rows, elements) at a stride of 3 words the compiler
        laid them out one row per thread, each activation then loaded once per row, not once per 4."""
        if BITS == 3:
            p = rows[None, :] + 3 * c[:, None]
            m = tl.trans(mask)
            return tl.trans(tl.load(p, mask=m, other=0)), tl.trans(tl.load(p + 1, mask=m, other=0)), \
                tl.trans(tl.load(p + 2, mask=m, other=0))
        else:
            w = tl.load(rows[:, None] + c[None, :], mask=mask, other=0)
            return w, w, w

    @triton.jit
    def _gemv_tile(wd, a_row, c0, c_hi, wcol, wmask, m2, scale_rows, zero_rows, n_mask, GS: tl.constexpr,
                   BITS: tl.constexpr, NW: tl.constexpr):
        """sum over the tile's codes of a_k w_k for each (row, element), w_k = s (q_k - z): ``wd`` the
        elements' words (_elem_words), an element a word, or with 3 bits a unit of 32 codes. The scale
        and zero point come out of an element's sum, s (sum_k a_k q_k - z sum_k a_k), so a code costs
        one AND and one multiply-add (_code_term)."""
        pq = tl.zeros(m2.shape, dtype=tl.float32)
        a_sum = tl.zeros(wcol.shape, dtype=tl.float32)
        if BITS == 3:
            col0 = wcol * 32                            # the column of each unit's first code
            h0, h1, h2 = _high_half(wd[0]), _high_half(wd[1]), _high_half(wd[2])
            for c in tl.static_range(32):
                a = tl.load(a_row + col0 + c, mask=wmask, other=0.0).to(tl.float32)
                pq += _unit3_term(wd[0], wd[1], wd[2], h0, h1, h2, a, c)
                a_sum += a
            s, z = _word_scales(scale_rows, zero_rows, n_mask, c0, c_hi, col0, GS, 32, NW)
        else:
            P: tl.constexpr = 32 // BITS
            col0 = wcol * P                             # the first code column of each word
            w_hi = _high_half(wd[0])
            for j in tl.static_range(P):
                a = tl.load(a_row + col0 + j, mask=wmask, other=0.0).to(tl.float32)
                pq += _code_term(wd[0], w_hi, a, j, BITS)
                a_sum += a
            s, z = _word_scales(scale_rows, zero_rows, n_mask, c0, c_hi, col0, GS, P, NW)
        return _word_sum(pq, a_sum[None, :], s, z)

    @triton.jit
    def _gemv_loop(a_row, words_e, n, n_mask, KW, scale_e, zero_e, G, k_step, k_steps,
                   GS: tl.constexpr, BITS: tl.constexpr, BLOCK_N: tl.constexpr, NW: tl.constexpr):
        """(rows,) sums a @ W^T over this program's span of K for rows ``n`` of one width. A tile is
        NW consecutive elements of every row: words (NW * 32 / BITS codes), or with 3 bits units of
        three words (NW * 32 codes); the next tile's words are loaded before this one's codes are
        unpacked, so two tiles of loads are in flight."""
        EL: tl.constexpr = 1 if BITS == 3 else BITS     # elements per 32 codes of a row
        rows = words_e + n.to(tl.int64) * (KW * BITS)
        scale_rows = scale_e + n * G
        zero_rows = zero_e + n * G
        wi = tl.arange(0, NW)
        acc = tl.zeros((BLOCK_N, NW), dtype=tl.float32)
        c_lo = k_step * k_steps * NW * EL               # elements, KW * EL per row
        c_hi = tl.minimum(KW * EL, c_lo + k_steps * NW * EL)
        wd = _elem_words(rows, c_lo + wi, n_mask[:, None] & ((c_lo + wi) < c_hi)[None, :], BITS)
        for c0 in range(c_lo, c_hi, NW):
            wcol = c0 + wi
            wmask = wcol < c_hi
            m2 = n_mask[:, None] & wmask[None, :]
            wd_next = _elem_words(rows, wcol + NW, n_mask[:, None] & ((wcol + NW) < c_hi)[None, :], BITS)
            acc += _gemv_tile(wd, a_row, c0, c_hi, wcol, wmask, m2, scale_rows, zero_rows, n_mask, GS, BITS, NW)
            wd = wd_next
        return tl.sum(acc, axis=1)

    @triton.jit
    def _gemv_width(a_row, words_e, n, n_mask, N, KW, scale_e, zero_e, G, k_step, k_steps, SILU: tl.constexpr,
                    GS: tl.constexpr, BITS: tl.constexpr, BLOCK_N: tl.constexpr, NW: tl.constexpr):
        acc = _gemv_loop(a_row, words_e, n, n_mask, KW, scale_e, zero_e, G, k_step, k_steps, GS, BITS, BLOCK_N, NW)
        acc_up = acc
        if SILU:
            acc_up = _gemv_loop(a_row, words_e, n + N, n_mask, KW, scale_e, zero_e, G, k_step, k_steps,
                                GS, BITS, BLOCK_N, NW)
        return acc, acc_up

    @triton.jit
    def _gemv_kernel(
            a_ptr, out_ptr, words_ptr, word_off_ptr, bits_ptr, scale_ptr, zero_ptr, bias_ptr, idx_ptr,
            N, KW, R, G, A_DIV, SPAN,
            GS: tl.constexpr, SILU: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
            BLOCK_N: tl.constexpr, NW: tl.constexpr):
        """Program (slot, row tile, K span): out[k span, slot, n] = a[slot // A_DIV] @ W_e^T over the
        span's part of K, for the expert e = idx[slot] the slot is routed to; no sorting, no routing
        tables. K = 32 KW; the K spans' partial sums lie SPAN elements apart (combine_rows adds
        them). With SILU: silu(gate rows n) * (up rows N + n)."""
        slot = tl.program_id(0)
        e = tl.load(idx_ptr + slot).to(tl.int64)
        K = KW * 32
        a_row = a_ptr + (slot // A_DIV).to(tl.int64) * K
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = n < N
        bits = tl.load(bits_ptr + e)
        words_e = words_ptr + tl.load(word_off_ptr + e)
        scale_e = scale_ptr + e * R * G
        zero_e = zero_ptr + e * R * G
        k_step = tl.program_id(2)
        k_steps = tl.cdiv(tl.cdiv(KW * 32, NW * 32), SPLIT_K)   # spans of NW * 32 codes per program
        # one loop per width, each with its width compiled in; the expert's width picks one
        if bits == 1:
            acc, acc_up = _gemv_width(a_row, words_e, n, n_mask, N, KW, scale_e, zero_e, G, k_step, k_steps, SILU,
                                      GS, 1, BLOCK_N, NW)
        elif bits == 2:
            acc, acc_up = _gemv_width(a_row, words_e, n, n_mask, N, KW, scale_e, zero_e, G, k_step, k_steps, SILU,
                                      GS, 2, BLOCK_N, NW)
        elif bits == 3:
            acc, acc_up = _gemv_width(a_row, words_e, n, n_mask, N, KW, scale_e, zero_e, G, k_step, k_steps, SILU,
                                      GS, 3, BLOCK_N, NW)
        elif bits == 4:
            acc, acc_up = _gemv_width(a_row, words_e, n, n_mask, N, KW, scale_e, zero_e, G, k_step, k_steps, SILU,
                                      GS, 4, BLOCK_N, NW)
        else:
            acc, acc_up = _gemv_width(a_row, words_e, n, n_mask, N, KW, scale_e, zero_e, G, k_step, k_steps, SILU,
                                      GS, 8, BLOCK_N, NW)
        if HAS_BIAS:
            if k_step == 0:
                acc += tl.load(bias_ptr + e * R + n, mask=n_mask, other=0.0).to(tl.float32)
                if SILU:
                    acc_up += tl.load(bias_ptr + e * R + N + n, mask=n_mask, other=0.0).to(tl.float32)
        if SILU:
            acc = acc * tl.sigmoid(acc) * acc_up
        optr = out_ptr + k_step.to(tl.int64) * SPAN + slot.to(tl.int64) * N + n
        tl.store(optr, acc.to(out_ptr.dtype.element_ty), mask=n_mask)


    # ---- more tokens: tensor cores, the weights made from int32 words in registers each K tile ----

    @triton.jit
    def _top_of_mantissa(v, sh, BITS: tl.constexpr):
        """Bits sh .. sh + BITS - 1 of the uint32 words v moved to the top BITS bits of a float's mantissa
        (bits 23 - BITS .. 22) with 1.0's exponent above them: the float 1 + q / 2^BITS. ``sh`` is known
        per register where this is used (a dimension each thread holds whole), so the select and the
        shifts fold into one shift and one LOP3."""
        TOP: tl.constexpr = 23 - BITS
        x = tl.where(sh <= TOP, v << tl.maximum(TOP - sh, 0).to(tl.uint32), v >> tl.maximum(sh - TOP, 0).to(tl.uint32))
        return x & (((1 << BITS) - 1) << TOP)

    @triton.jit
    def _dense_float(wd, one, BITS: tl.constexpr):
        """Codes of the tile's words ``wd`` (words, rows), each word loaded once, as the floats
        1 + q / 2^BITS, (K tile, rows), with 1, 2, 4 or 8 bits: (words, codes of a word, rows) made by
        shifts, seen as (words x codes, rows). Rows last: the compiler's default layout then gives each
        thread whole columns of the tile (one row of W), so the expansion moves no data between threads
        and every shift is known per register."""
        P: tl.constexpr = 32 // BITS
        sh = (tl.arange(0, P) * BITS)[None, :, None]
        x = _top_of_mantissa(wd.to(tl.uint32, bitcast=True)[:, None, :], sh, BITS)
        x = tl.reshape(x, (wd.shape[0] * P, wd.shape[1]))
        return (x.to(tl.int32, bitcast=True) | one).to(tl.float32, bitcast=True)

    @triton.jit
    def _dense3_float(w0, w1, w2, one):
        """As _dense_float for 3 bits: ``w0, w1, w2`` (units, rows) the three words of each unit of 32
        codes (code c at bits 3c .. 3c + 2 of the unit; codes 10 and 21 straddle two words)."""
        c = tl.arange(0, 32)[None, :, None]
        j = (3 * c) // 32                                   # the word code c starts in
        off = 3 * c - 32 * j
        a0 = w0.to(tl.uint32, bitcast=True)[:, None, :]
        a1 = w1.to(tl.uint32, bitcast=True)[:, None, :]
        a2 = w2.to(tl.uint32, bitcast=True)[:, None, :]
        lo = tl.where(j == 0, a0, tl.where(j == 1, a1, a2))
        hi = tl.where(j == 0, a1, a2)                       # the next word (j = 2: no code straddles)
        x = _top_of_mantissa(lo, off, 3)
        # a code starting at bit 30 or 31 takes its high bits from the next word's lowest
        x = x | tl.where(off > 29, (hi << tl.minimum(52 - off, 31).to(tl.uint32)) & (7 << 20), 0)
        x = tl.reshape(x, (w0.shape[0] * 32, w0.shape[1]))
        return (x.to(tl.int32, bitcast=True) | one).to(tl.float32, bitcast=True)

    @triton.jit
    def _mma_tile(acc, a_t, x, k, k0, kmask, n_mask, scale_rows, zero_rows, GS: tl.constexpr,
                  ONE_GROUP: tl.constexpr, BITS: tl.constexpr, FP32_DOT: tl.constexpr):
        """acc (tokens, rows) += a W^T for one K tile, x (K tile, rows) its codes as 1 + q / 2^BITS:
        the weights w = s (q - z) = x 2^BITS s - (2^BITS + z) s (one multiply-add), rounded to the
        activations' dtype as the reference's dequantized matrix is."""
        if ONE_GROUP:
            g = k0 // GS
            s = tl.load(scale_rows + g, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            z = tl.load(zero_rows + g, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        else:
            mask = kmask[:, None] & n_mask[None, :]
            g = (k // GS)[:, None]
            s = tl.load(scale_rows[None, :] + g, mask=mask, other=0.0).to(tl.float32)
            z = tl.load(zero_rows[None, :] + g, mask=mask, other=0.0).to(tl.float32)
        w = (x * (s * (1 << BITS)) - s * ((1 << BITS) + z)).to(a_t.dtype)
        if FP32_DOT:
            return tl.dot(a_t, w, acc, input_precision="ieee")
        else:
            return tl.dot(a_t, w, acc)

    @triton.jit
    def _tile_words(rows, k0, K, n_mask, BITS: tl.constexpr, BLOCK_K: tl.constexpr):
        """The words of K tile k0 of each row, (words, rows), zeros past K; with 3 bits the first,
        second and third word of each unit of 32 codes, (units, rows) each (else the same tensor thrice)."""
        if BITS == 3:
            c = (k0 // 32) * 3 + 3 * tl.arange(0, BLOCK_K // 32)
            m = (c < K * 3 // 32)[:, None] & n_mask[None, :]
            p = rows[None, :] + c[:, None]
            w0 = tl.load(p, mask=m, other=0)
            w1 = tl.load(p + 1, mask=m, other=0)
            w2 = tl.load(p + 2, mask=m, other=0)
            return w0, w1, w2
        else:
            c = k0 * BITS // 32 + tl.arange(0, BLOCK_K * BITS // 32)
            w = tl.load(rows[None, :] + c[:, None], mask=(c < K * BITS // 32)[:, None] & n_mask[None, :], other=0)
            return w, w, w

    @triton.jit
    def _tile_float(wd, one, BITS: tl.constexpr):
        if BITS == 3:
            return _dense3_float(wd[0], wd[1], wd[2], one)
        else:
            return _dense_float(wd[0], one, BITS)

    @triton.jit
    def _mma_width(acc, acc_up, a_rows, m_mask, one, words_e, n, n_mask, N, KW, scale_e, zero_e, G, k_lo, k_hi,
                   GS: tl.constexpr, ONE_GROUP: tl.constexpr, SILU: tl.constexpr, BITS: tl.constexpr,
                   BLOCK_K: tl.constexpr, FP32_DOT: tl.constexpr):
        """One width's loop over this program's K span: acc (+ acc_up, the up rows N + n) += a W^T.
        The next tile's words are loaded into registers before this tile's are unpacked (a load
        carried over the loop, which the compiler's pipeliner leaves alone: it would stage the
        words through shared memory)."""
        K = KW * 32
        rows = words_e + n.to(tl.int64) * (KW * BITS)
        rows_up = words_e + (n + N).to(tl.int64) * (KW * BITS)
        scale_rows, zero_rows = scale_e + n * G, zero_e + n * G
        scale_up, zero_up = scale_e + (n + N) * G, zero_e + (n + N) * G
        kk = tl.arange(0, BLOCK_K)
        wd = _tile_words(rows, k_lo, K, n_mask, BITS, BLOCK_K)
        wd_up = wd
        if SILU:
            wd_up = _tile_words(rows_up, k_lo, K, n_mask, BITS, BLOCK_K)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            k = k0 + kk
            kmask = k < k_hi
            wd_next = _tile_words(rows, k0 + BLOCK_K, K, n_mask, BITS, BLOCK_K)
            wd_up_next = wd_next
            if SILU:
                wd_up_next = _tile_words(rows_up, k0 + BLOCK_K, K, n_mask, BITS, BLOCK_K)
            a_t = tl.load(a_rows[:, None] + k[None, :], mask=m_mask[:, None] & kmask[None, :], other=0.0)
            x = _tile_float(wd, one, BITS)
            acc = _mma_tile(acc, a_t, x, k, k0, kmask, n_mask, scale_rows, zero_rows, GS, ONE_GROUP, BITS, FP32_DOT)
            if SILU:
                x_up = _tile_float(wd_up, one, BITS)
                acc_up = _mma_tile(acc_up, a_t, x_up, k, k0, kmask, n_mask, scale_up, zero_up, GS, ONE_GROUP, BITS,
                                   FP32_DOT)
            wd = wd_next
            wd_up = wd_up_next
        return acc, acc_up

    @triton.jit
    def _experts_mma_kernel(
            a_ptr, out_ptr, words_ptr, word_off_ptr, bits_ptr, scale_ptr, zero_ptr, bias_ptr,
            order_ptr, counts_ptr, starts_ptr,
            N, KW, R, G, TOPK, M_TILES, ONE, SPAN,
            GATHER_A: tl.constexpr, SCATTER_OUT: tl.constexpr, GS: tl.constexpr, SILU: tl.constexpr,
            HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
            ONE_GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
            FP32_DOT: tl.constexpr):
        """Program (expert e, BLOCK_M of its sorted slots, BLOCK_N rows, K span): the (tokens, rows)
        tile a W_e^T on the tensor cores, the weights made in registers from the words each K tile
        (the dot's second operand; the compiler stages it through shared memory). GATHER_A: the a
        rows are the slots' tokens (else their sorted positions); SCATTER_OUT: the output row is the
        slot itself (token t's k slots are rows t k .. t k + k - 1, which combine_rows adds in a fixed
        order), else the sorted position. The K spans' partial sums lie SPAN elements apart."""
        pid = tl.program_id(0)
        e = pid // M_TILES
        m_tile = pid % M_TILES
        count = tl.load(counts_ptr + e)
        if m_tile * BLOCK_M >= count:
            return
        m_mask, pos, slot = _sorted_slots(e, m_tile, count, starts_ptr, order_ptr, BLOCK_M)
        K = KW * 32
        if GATHER_A:
            a_rows = a_ptr + (slot // TOPK).to(tl.int64) * K
        else:
            a_rows = a_ptr + pos.to(tl.int64) * K
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = n < N
        e = e.to(tl.int64)
        bits = tl.load(bits_ptr + e)
        words_e = words_ptr + tl.load(word_off_ptr + e)
        scale_e = scale_ptr + e * R * G
        zero_e = zero_ptr + e * R * G
        k_steps = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K)
        k_lo = tl.program_id(2) * k_steps * BLOCK_K
        k_hi = tl.minimum(K, k_lo + k_steps * BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if bits == 1:
            acc, acc_up = _mma_width(acc, acc_up, a_rows, m_mask, ONE, words_e, n, n_mask, N, KW, scale_e, zero_e, G,
                                     k_lo, k_hi, GS, ONE_GROUP, SILU, 1, BLOCK_K, FP32_DOT)
        elif bits == 2:
            acc, acc_up = _mma_width(acc, acc_up, a_rows, m_mask, ONE, words_e, n, n_mask, N, KW, scale_e, zero_e, G,
                                     k_lo, k_hi, GS, ONE_GROUP, SILU, 2, BLOCK_K, FP32_DOT)
        elif bits == 3:
            acc, acc_up = _mma_width(acc, acc_up, a_rows, m_mask, ONE, words_e, n, n_mask, N, KW, scale_e, zero_e, G,
                                     k_lo, k_hi, GS, ONE_GROUP, SILU, 3, BLOCK_K, FP32_DOT)
        elif bits == 4:
            acc, acc_up = _mma_width(acc, acc_up, a_rows, m_mask, ONE, words_e, n, n_mask, N, KW, scale_e, zero_e, G,
                                     k_lo, k_hi, GS, ONE_GROUP, SILU, 4, BLOCK_K, FP32_DOT)
        else:
            acc, acc_up = _mma_width(acc, acc_up, a_rows, m_mask, ONE, words_e, n, n_mask, N, KW, scale_e, zero_e, G,
                                     k_lo, k_hi, GS, ONE_GROUP, SILU, 8, BLOCK_K, FP32_DOT)
        if SCATTER_OUT:
            out_rows = slot.to(tl.int64)
        else:
            out_rows = pos.to(tl.int64)
        _finish(acc, acc_up, out_ptr, out_rows, n, n_mask, m_mask, e, bias_ptr, R, N, tl.program_id(2), SPAN,
                SILU, HAS_BIAS)


    @triton.jit
    def _combine_kernel(y_ptr, position_ptr, weight_ptr, out_ptr, H, SPAN, K: tl.constexpr, SPANS: tl.constexpr,
                        POSITIONS: tl.constexpr, WEIGHTS: tl.constexpr, BLOCK: tl.constexpr):
        """out[t, c] = sum_j w[t, j] sum_s y[s SPAN + row of slot (t, j), c], in float32, spans then
        slots in order: the row of slot (t, j) is t K + j, or position[t K + j]; w is 1 without WEIGHTS.
        Both loops unrolled, so a program's K x SPANS loads are in flight together (at one token there
        are only H / BLOCK programs)."""
        t = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = c < H
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for j in tl.static_range(K):
            if POSITIONS:
                p = tl.load(position_ptr + t * K + j).to(tl.int64)
            else:
                p = t * K + j
            part = tl.zeros((BLOCK,), dtype=tl.float32)
            for s in tl.static_range(SPANS):
                part += tl.load(y_ptr + s * SPAN + p * H + c, mask=mask, other=0.0).to(tl.float32)
            if WEIGHTS:
                part = part * tl.load(weight_ptr + t * K + j).to(tl.float32)
            acc += part
        tl.store(out_ptr + t * H + c, acc.to(out_ptr.dtype.element_ty), mask=mask)


def combine_rows(y: torch.Tensor, tokens: int, k: int, dtype, *, weights: torch.Tensor | None = None,
                 position: torch.Tensor | None = None) -> torch.Tensor:
    """(tokens, H) in ``dtype``: token t's sum over its k slots (times ``weights`` (tokens, k) where
    given) of the slot's row of y, summed over y's K spans (y: (spans, rows, H), or (rows, H) for one);
    the slot (t, j) is row t k + j, or ``position[t k + j]``. One launch, float32, a fixed order: the
    same sum every call (no atomics)."""
    y = y.contiguous()
    spans = y.shape[0] if y.dim() == 3 else 1
    H = y.shape[-1]
    out = torch.empty(tokens, H, device=y.device, dtype=dtype)
    if tokens:
        dummy = y
        _combine_kernel[(tokens, triton.cdiv(H, 256))](
            y, position if position is not None else dummy, weights.contiguous() if weights is not None else dummy,
            out, H, y[0].numel() if spans > 1 else 0, K=k, SPANS=spans, POSITIONS=position is not None,
            WEIGHTS=weights is not None, BLOCK=256, num_warps=2)
    return out


@dataclass(frozen=True)
class Tiles:
    """Tile sizes of one tensor-core launch (``_experts_mma_kernel``): BLOCK_M tokens x BLOCK_N rows,
    K tiles of BLOCK_K codes; ``split_k`` > 1 writes each K span's partial sums, added after it."""
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
    # the codes as int32 words and each expert's offset in words, as the kernels read them; None
    # where a row is not whole words or a word would span two groups (words_ok): those layers
    # run the dequantize path
    words: torch.Tensor | None = field(default=None, init=False)
    word_offsets: torch.Tensor | None = field(default=None, init=False)

    def __post_init__(self):
        # Rows of whole words make every expert's bytes (rows x row bytes) a multiple of 4, so the
        # offsets, prefix sums of those (quant/format.py), are whole words too.
        if words_ok(self.cols, self.group_size) and self.codes.is_contiguous() \
                and self.codes.data_ptr() % 4 == 0 and self.codes.numel() % 4 == 0:
            object.__setattr__(self, "words", self.codes.view(torch.int32))
            object.__setattr__(self, "word_offsets", self.code_offsets // 4)


@lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (132 for anything not CUDA: the interpreter
    then picks the tiles an H100 would get)."""
    if device.type != "cuda":
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


def words_ok(cols: int, group_size: int) -> bool:
    """The kernels read rows of whole int32 words, a word inside one quantization group: columns and
    group size multiples of 32 (every MoE family's hidden and expert sizes are)."""
    return cols % 32 == 0 and group_size % 32 == 0


def _launch_out(rows: int, n: int, split_k: int, like: torch.Tensor) -> torch.Tensor:
    """A launch's output: (rows, n) in the activations' dtype, or each K span's float32 partial sums,
    (split_k, rows, n)."""
    if split_k == 1:
        return torch.empty(rows, n, device=like.device, dtype=like.dtype)
    return torch.empty(split_k, rows, n, device=like.device, dtype=torch.float32)


def _gate(h: torch.Tensor, inter: int, *, gated: bool, fuse_silu: bool, activation, dtype) -> torch.Tensor:
    """Launch 1's (rows, R) output, where the kernel did not gate it, as launch 2's (rows, I) input:
    SwiGLU on the [gate; up] halves, or the family's own ``activation``."""
    if gated and fuse_silu:
        h = torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]
    else:
        h = activation(h)
    return h.to(dtype).contiguous()


ONE_BITS = 0x3F800000   # the bits of 1.0f: the tensor-core kernel's ONE (see _dense_float)


@dataclass(frozen=True)
class GemvTiles:
    """Tile sizes of one decode launch (``_gemv_kernel``): BLOCK_N rows, ``nw`` word columns per
    K step; ``split_k`` > 1 writes each K span's partial sums, added after it."""
    block_n: int
    nw: int = 8
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 1


def choose_gemv_tiles(slots: int, n_out: int, k: int, sms: int, programs_per_sm: int) -> GemvTiles:
    """8 word columns per step, and 4 warps (64 rows) per program, 2 or 1 where that leaves
    fewer programs than SMs: a warp is 8 word columns x 4 rows of threads, each thread then
    owns 4 rows of one word column, and the value of ``a`` it loads for a code serves all 4.
    K is split until there are about ``programs_per_sm`` programs per SM: 8 for the down
    projection (a Mixtral-shaped layer at one token ran in 0.356 ms split 4 ways against 0.384
    split 3; benchmarks/results/bench_experts_kernel_h100_v4_sweep.txt), 2 for gate/up, which
    then leaves SwiGLU to torch: a Qwen3-shaped layer at one token (192 programs unsplit) took
    0.0285 ms split 2 against 0.0304 (mixed; uniform 4-bit 0.0312 against 0.0427), a
    Mixtral-shaped one (448 programs) stays unsplit (_v12_sweep_t1_*.txt)."""
    nw = 8
    for warps in (4, 2, 1):
        bn = 16 * warps
        if slots * triton.cdiv(n_out, bn) >= sms:
            break
    programs = slots * triton.cdiv(n_out, bn)
    split_k = max(1, min(triton.cdiv(k, nw * 32), triton.cdiv(programs_per_sm * sms, programs)))
    return GemvTiles(bn, nw, split_k, warps)


def _launch_gemv(a, out, mats: PackedMatrices, idx, n_out: int, *, a_div: int, silu: bool, tiles: GemvTiles):
    """``out``: (slots, n_out), or (split_k, slots, n_out) float32 partial sums (_launch_out)."""
    assert out.shape[-2:] == (idx.numel(), n_out) and (tiles.split_k == 1 or out.shape[0] == tiles.split_k)
    grid = (idx.numel(), triton.cdiv(n_out, tiles.block_n), tiles.split_k)
    dummy = mats.scale
    _gemv_kernel[grid](
        a, out, mats.words, mats.word_offsets, mats.bits, mats.scale, mats.zero,
        mats.bias if mats.bias is not None else dummy, idx,
        n_out, mats.cols // 32, mats.rows, mats.scale.shape[2], a_div, out.shape[-2] * n_out,
        GS=mats.group_size, SILU=silu, HAS_BIAS=mats.bias is not None, SPLIT_K=tiles.split_k,
        BLOCK_N=tiles.block_n, NW=tiles.nw, num_warps=tiles.num_warps, num_stages=tiles.num_stages)


# The decode kernel reads an expert's codes once per routed token (no sorting, no routing
# tables): it runs while the routed slots are no more than twice the
# experts (T k <= 2 E, about two tokens per routed expert; the second read mostly hits L2) and
# always at T = 1; the tensor-core kernel, which reads an expert's codes once per 16 to 128 of
# its tokens, above that. At T k = 2 E on the H100 the decode kernel took 0.696 ms against 0.799
# for a mixed Mixtral-shaped layer (T 8) and 0.321 against 0.362 for a Qwen3-shaped one (T 32);
# uniform 4-bit layers went the other way by 3-9%
# (benchmarks/results/bench_experts_kernel_h100_v11_few_sweep_*.txt).
def choose_kernel(tokens: int, top_k: int, num_experts: int) -> str:
    return "gemv" if tokens == 1 or tokens * top_k <= 2 * num_experts else "mma"


def _two_launches(hidden, top_k_weights, up: PackedMatrices, *, slots: int, gated: bool, fuse_silu: bool,
                  activation, t1, t2, launch1, launch2) -> torch.Tensor:
    """The layer's two launches, whichever kernel, and the sum: launch 1 writes one hidden row per
    routing slot (silu(gate) * up fused where the family's gating is plain SwiGLU and K is not split,
    else the gating after it in torch); launch 2 writes each slot's down projection, in slot order
    (token t's k slots are rows t k .. t k + k - 1), per K span; combine_rows then adds each token's
    k rows times their routing weights in float32, in a fixed order. Nothing is added with atomics,
    so a layer gives the same output every call. ``launch1(h, n_out, silu)``, ``launch2(h, y)``."""
    inter = up.rows // 2 if gated else up.rows
    fused = gated and fuse_silu and t1.split_k == 1
    n1 = inter if fused else up.rows
    h = _launch_out(slots, n1, t1.split_k, hidden)
    launch1(h, n1, fused)
    if t1.split_k > 1:
        h = h.sum(0)                                # the K spans, in order
    if not fused:
        h = _gate(h, inter, gated=gated, fuse_silu=fuse_silu, activation=activation, dtype=hidden.dtype)
    y = torch.empty(t2.split_k, slots, hidden.shape[1], device=hidden.device, dtype=torch.float32)
    launch2(h, y)
    return combine_rows(y, hidden.shape[0], top_k_weights.shape[-1], hidden.dtype, weights=top_k_weights)


def _fused_experts_gemv(hidden, top_k_index, top_k_weights, up: PackedMatrices, down: PackedMatrices, *, gated: bool,
                        fuse_silu: bool, activation, tiles: tuple[GemvTiles, GemvTiles] | None):
    """Decode: launch 1 writes each slot's hidden row h[slot] (gathering x[slot // k]); launch 2
    writes h[slot] W_down^T per K span, which combine_rows adds up."""
    H = hidden.shape[1]
    k = top_k_index.shape[-1]
    idx = top_k_index.reshape(-1)
    slots = idx.numel()
    sms = sm_count(hidden.device)
    inter = up.rows // 2 if gated else up.rows
    t1 = tiles[0] if tiles else choose_gemv_tiles(slots, inter if gated and fuse_silu else up.rows, H, sms,
                                                  programs_per_sm=2)
    t2 = tiles[1] if tiles else choose_gemv_tiles(slots, H, inter, sms, programs_per_sm=8)
    x = hidden.contiguous()
    return _two_launches(
        hidden, top_k_weights, up, slots=slots, gated=gated, fuse_silu=fuse_silu, activation=activation, t1=t1,
        t2=t2, launch1=lambda h, n1, silu: _launch_gemv(x, h, up, idx, n1, a_div=k, silu=silu, tiles=t1),
        launch2=lambda h, y: _launch_gemv(h, y, down, idx, H, a_div=1, silu=False, tiles=t2))


def _launch_mma(a, out, mats: PackedMatrices, routing, n_out: int, *, gather_a: bool, scatter_out: bool,
                silu: bool, tiles: Tiles):
    """``out``: (slots, n_out), or (split_k, slots, n_out) float32 partial sums (_launch_out)."""
    order, counts, starts, top_k = routing
    assert out.shape[-2:] == (order.numel(), n_out) and (tiles.split_k == 1 or out.shape[0] == tiles.split_k)
    num_experts = mats.scale.shape[0]
    m_tiles = max(1, triton.cdiv(order.numel() // top_k, tiles.block_m))   # an expert has at most T slots
    grid = (num_experts * m_tiles, triton.cdiv(n_out, tiles.block_n), tiles.split_k)
    dummy = mats.scale
    _experts_mma_kernel[grid](
        a, out, mats.words, mats.word_offsets, mats.bits, mats.scale, mats.zero,
        mats.bias if mats.bias is not None else dummy, order, counts, starts,
        n_out, mats.cols // 32, mats.rows, mats.scale.shape[2], top_k, m_tiles, ONE_BITS, out.shape[-2] * n_out,
        GATHER_A=gather_a, SCATTER_OUT=scatter_out, GS=mats.group_size, SILU=silu, HAS_BIAS=mats.bias is not None,
        SPLIT_K=tiles.split_k,
        ONE_GROUP=mats.group_size % tiles.block_k == 0, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
        BLOCK_K=tiles.block_k, FP32_DOT=a.dtype == torch.float32, num_warps=tiles.num_warps,
        num_stages=tiles.num_stages)


def choose_mma_tiles(tokens: int, top_k: int, num_experts: int) -> Tiles:
    """Tiles of 16 to 128 tokens (the routed tokens per active expert, rounded up to a power of two)
    x 128 rows x K tiles of 128 codes, 3 stages: 4 warps up to 32 tokens, where unpacking the codes is
    the work, 8 above, where the tensor cores are. From the H100 sweeps
    (benchmarks/results/bench_experts_kernel_h100_v8_mma_sweep.txt, _v8_sweep16.txt): Mixtral-shaped
    layer at 16 tokens 0.94 ms, against 1.14 with 2 stages and 1.34 with 64 rows (splitting the down
    projection's K in two as well measured 1.13 in _v8b.txt); Qwen3-shaped at 4096, 2.67 ms against
    2.88 with K tiles of 64."""
    slots = tokens * top_k
    active = max(1, min(num_experts, slots))
    bm = min(128, max(16, triton.next_power_of_2(math.ceil(slots / active))))
    return Tiles(bm, 128, 128, 1, num_warps=4 if bm <= 32 else 8, num_stages=3)


def _fused_experts_mma(hidden, top_k_index, top_k_weights, up: PackedMatrices, down: PackedMatrices, *,
                       gated: bool, fuse_silu: bool, activation, tiles: tuple[Tiles, Tiles] | None):
    """Tensor cores: slots sorted by expert; launch 1 writes h at the sorted positions (gathering x
    rows by token), launch 2 writes h W_down^T at each slot's own row, which combine_rows adds up."""
    T, H = hidden.shape
    k = top_k_index.shape[-1]
    num_experts = up.scale.shape[0]
    routing = route(top_k_index, num_experts)
    t1 = tiles[0] if tiles else choose_mma_tiles(T, k, num_experts)
    t2 = tiles[1] if tiles else t1
    x = hidden.contiguous()
    return _two_launches(
        hidden, top_k_weights, up, slots=T * k, gated=gated, fuse_silu=fuse_silu, activation=activation, t1=t1,
        t2=t2, launch1=lambda h, n1, silu: _launch_mma(x, h, up, routing, n1, gather_a=True, scatter_out=False,
                                                       silu=silu, tiles=t1),
        launch2=lambda h, y: _launch_mma(h, y, down, routing, H, gather_a=False, scatter_out=True, silu=False,
                                         tiles=t2))


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
                  kernel: str | None = None, tiles: tuple[Tiles, Tiles] | None = None,
                  gemv_tiles: tuple[GemvTiles, GemvTiles] | None = None) -> torch.Tensor:
    """The MoE experts output (T, hidden) for routed tokens. ``gated``: ``up`` holds
    [gate; up] rows (R = 2 I); ``fuse_silu``: silu(gate) * up inside the kernel, otherwise
    ``activation`` maps launch 1's (slots, R) output to (slots, I) (a family's own gating).
    ``kernel``: "gemv" the decode kernel (one program per routed slot), "mma" the tensor-core
    kernel (slots sorted by expert, tiles of an expert's tokens); None: choose_kernel.
    ``tiles`` / ``gemv_tiles``: the two launches' tiles (None: chosen from the shapes)."""
    assert up.words is not None and down.words is not None, "rows of whole words only (words_ok)"
    T = hidden.shape[0]
    kernel = kernel or choose_kernel(T, top_k_index.shape[-1], up.scale.shape[0])
    run = _fused_experts_gemv if kernel == "gemv" else _fused_experts_mma
    return run(hidden, top_k_index, top_k_weights, up, down, gated=gated, fuse_silu=fuse_silu, activation=activation,
               tiles=gemv_tiles if kernel == "gemv" else tiles)


def linear_routing(tokens: int, device) -> tuple:
    """One "expert" that every token goes to: a quantized linear through the same kernel."""
    return (torch.arange(tokens, device=device), torch.full((1,), tokens, dtype=torch.int32, device=device),
            torch.zeros(1, dtype=torch.int32, device=device), 1)


@lru_cache(maxsize=64)
def _zero_index(tokens: int, device: torch.device) -> torch.Tensor:
    """Every token routed to "expert" 0: a linear through the decode kernel."""
    return torch.zeros(tokens, dtype=torch.int64, device=device)


LINEAR_GEMV_MAX_TOKENS = 16   # the decode kernel reads the matrix once per token (from L2 after the first)


def fused_linear(x: torch.Tensor, mats: PackedMatrices, tiles: Tiles | None = None,
                 gemv_tiles: GemvTiles | None = None) -> torch.Tensor:
    """x (T, C) @ W^T for one packed (R, C) matrix (``mats`` with one expert), no bias: the decode
    kernel up to LINEAR_GEMV_MAX_TOKENS tokens (or with ``gemv_tiles``), the tensor cores above."""
    T = x.shape[0]
    x = x.contiguous()
    if tiles is None and (T <= LINEAR_GEMV_MAX_TOKENS or gemv_tiles is not None):
        t = gemv_tiles or choose_gemv_tiles(T, mats.rows, mats.cols, sm_count(x.device), programs_per_sm=8)
        out = _launch_out(T, mats.rows, t.split_k, x)
        _launch_gemv(x, out, mats, _zero_index(T, x.device), mats.rows, a_div=1, silu=False, tiles=t)
    else:
        t = tiles or choose_mma_tiles(T, 1, 1)
        out = _launch_out(T, mats.rows, t.split_k, x)
        _launch_mma(x, out, mats, linear_routing(T, x.device), mats.rows, gather_a=False, scatter_out=False,
                    silu=False, tiles=t)
    return out if t.split_k == 1 else combine_rows(out, T, 1, x.dtype)     # the K spans, in order

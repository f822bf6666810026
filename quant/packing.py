"""Dense bit packing of integer codes, and dequantization of one packed matrix.

Integer codes of ``b`` bits (b in 1, 2, 3, 4, 8) along the last dimension are padded
with zeros to a multiple of 8 codes; every 8 consecutive codes c0..c7 form one
little-endian integer of 8*b bits,  v = sum_k c_k << (b*k),  stored as ``b`` bytes
(byte j = (v >> 8j) & 0xff). A row of C codes takes ceil(C/8)*b bytes: exactly b
bits per weight, for every b, including 3. The checkpoint format that uses this is
documented in quant/format.py.
"""
from __future__ import annotations

import torch


def packed_width(n: int, bits: int) -> int:
    return (n + 7) // 8 * bits


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., C) integer codes in [0, 2**bits) -> (..., ceil(C/8)*bits) uint8.

    In bytes, without wide integers (a DeepSeek-V3 layer packs ~11e9 codes: int64 would
    move 8x the bytes): 1, 2, 4 bits OR 8/bits codes into each byte; 3 bits builds each
    unit's 24-bit integer in int32; 8 bits are the codes themselves."""
    *lead, C = codes.shape
    c = torch.nn.functional.pad(codes.to(torch.uint8), (0, (-C) % 8))
    if bits == 8:
        return c
    if 8 % bits == 0:   # byte j of a unit holds codes j*per .. j*per+per-1, lowest bits first
        per = 8 // bits
        c = c.view(*lead, -1, per)
        out = c[..., 0].clone()
        for k in range(1, per):
            out |= c[..., k] << (bits * k)
        return out.reshape(*lead, -1)
    c = c.view(*lead, -1, 8).to(torch.int32)   # 3 bits: 8 codes in 24 bits
    v = c[..., 0].clone()
    for k in range(1, 8):
        v |= c[..., k] << (bits * k)
    return torch.stack([(v >> (8 * j)) & 0xFF for j in range(bits)], dim=-1).to(torch.uint8).reshape(*lead, -1)


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of pack_codes: (..., ceil(n/8)*bits) uint8 -> (..., n) uint8."""
    *lead, width = packed.shape
    if bits == 8:
        return packed[..., :n]
    if 8 % bits == 0:  # 1, 2, 4 bits: whole codes per byte, lowest bits first
        shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
        codes = (packed[..., None] >> shifts) & ((1 << bits) - 1)
        return codes.reshape(*lead, -1)[..., :n]
    b = packed.to(torch.int32).view(*lead, -1, bits)  # 3 bits: 8 codes in 3 bytes, 24 bits
    v = (b << (torch.arange(bits, device=packed.device, dtype=torch.int32) * 8)).sum(-1, keepdim=True)
    codes = (v >> (torch.arange(8, device=packed.device, dtype=torch.int32) * bits)) & ((1 << bits) - 1)
    return codes.reshape(*lead, -1)[..., :n].to(torch.uint8)


def dequantize_packed(qweight: torch.Tensor, scales: torch.Tensor, zero: torch.Tensor, bits: int, cols: int,
                      dtype=torch.float32) -> torch.Tensor:
    """The (R, C) weight of one packed matrix: qweight uint8 (R, ceil(C/8)*bits), scales
    (R, G), zero the decoded zero points (R, G). Same arithmetic, in float32, as the fake
    quantization in quant/quantizer.py, so the two agree bit for bit."""
    rows, groups = scales.shape
    q = unpack_codes(qweight, bits, cols).float().view(rows, groups, cols // groups)
    w = scales.float()[..., None] * (q - zero.float()[..., None])
    return w.view(rows, cols).to(dtype)

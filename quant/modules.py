"""Modules that hold packed weights and dequantize them on the fly (format: quant/packing.py)."""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from . import triton_dequant
from .packing import dequantize_packed, packed_width, unpack_codes
from .triton_dequant import dequantize_triton

# GPU: one fused Triton kernel per dequantization (MOEQ_TRITON=0 for the eager path).
USE_TRITON = triton_dequant.available() and os.environ.get("MOEQ_TRITON", "1") != "0"


class PackedMatrix(nn.Module):
    """One (rows x cols) matrix at ``bits``, stored packed: qweight, scales, qzeros | zeros."""

    def __init__(self, rows: int, cols: int, bits: int, groupsize: int, device="meta"):
        super().__init__()
        self.rows, self.cols, self.bits = rows, cols, bits
        groups = cols // groupsize if groupsize > 0 else 1
        u8, f16 = dict(dtype=torch.uint8, device=device), dict(dtype=torch.float16, device=device)
        self.register_buffer("qweight", torch.empty(rows, packed_width(cols, bits), **u8))
        self.register_buffer("scales", torch.empty(rows, groups, **f16))
        if bits == 1:
            self.register_buffer("zeros", torch.empty(rows, groups, **f16))
        else:
            self.register_buffer("qzeros", torch.empty(rows, packed_width(groups, bits), **u8))

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        if self.qweight.is_cuda and USE_TRITON:
            zero = self.zeros.float() if self.bits == 1 else \
                unpack_codes(self.qzeros, self.bits, self.scales.shape[1]).float()
            return dequantize_triton(self.qweight, self.scales, zero, self.bits, self.cols, dtype)
        zeros = self.zeros if self.bits == 1 else self.qzeros
        return dequantize_packed(self.qweight, self.scales, zeros, self.bits, self.cols, dtype)

    def extra_repr(self) -> str:
        return f"rows={self.rows}, cols={self.cols}, bits={self.bits}"


class QuantLinear(PackedMatrix):
    """Drop-in for a bias-free or biased nn.Linear."""

    def __init__(self, in_features: int, out_features: int, bits: int, groupsize: int, bias: bool = False,
                 device="meta", dtype=torch.float16):
        super().__init__(out_features, in_features, bits, groupsize, device)
        self.in_features, self.out_features, self.compute_dtype = in_features, out_features, dtype
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype), requires_grad=False) \
            if bias else None

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (some model code reads ``linear.weight``, e.g. Switch's
        dtype check before ``wo``); costs one dequantization per access."""
        return self.dequantize(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize(x.dtype), self.bias)


class QuantExperts(nn.Module):
    """Fused gated experts (transformers-5 Mixtral layout: gate_up_proj (E, 2I, H),
    down_proj (E, H, I)), each expert at its own bit width. Same forward contract as
    ``MixtralExperts``: (hidden_states (T, H), top_k_index (T, k), top_k_weights (T, k))."""

    def __init__(self, hidden: int, intermediate: int, gate_up_bits: list[int], down_bits: list[int],
                 groupsize: int, act_fn, device="meta"):
        super().__init__()
        self.num_experts = len(gate_up_bits)
        self.hidden_dim, self.intermediate_dim = hidden, intermediate
        self.gate_up_proj = nn.ModuleList(PackedMatrix(2 * intermediate, hidden, b, groupsize, device)
                                          for b in gate_up_bits)
        self.down_proj = nn.ModuleList(PackedMatrix(hidden, intermediate, b, groupsize, device) for b in down_bits)
        self.act_fn = act_fn

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = F.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)  # (E, k, T)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for e in hit[:, 0].tolist():
            pos, tok = torch.where(mask[e])
            x = hidden_states[tok]
            gate, up = F.linear(x, self.gate_up_proj[e].dequantize(x.dtype)).chunk(2, dim=-1)
            y = F.linear(self.act_fn(gate) * up, self.down_proj[e].dequantize(x.dtype))
            y = y * top_k_weights[tok, pos, None]
            out.index_add_(0, tok, y.to(out.dtype))
        return out

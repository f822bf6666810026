"""Modules that hold packed weights (format: quant/format.py) and dequantize them on the fly.

- ``QuantLinear``: drop-in for an ``nn.Linear``.
- ``QuantExperts``: drop-in for a transformers-5 fused experts module (``gate_up_proj`` /
  ``up_proj`` and ``down_proj``, forward ``(hidden_states, top_k_index, top_k_weights)``),
  every expert at its own bit width. It goes through transformers' experts interface
  (``use_experts_implementation``), so an experts implementation (a fused kernel) is chosen
  the way transformers chooses one; ``MOEQ_EXPERTS_FUNCTIONS`` lists ours.

No model-family knowledge: module shapes come from the quantization_config, activation
and gating from the module being replaced.
"""
from __future__ import annotations

import os
import types
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.moe import ExpertsInterface, use_experts_implementation

from . import triton_dequant
from .format import ExpertsLayout, decode_zero, num_groups
from .packing import dequantize_packed, packed_width

# GPU: one fused Triton kernel per dequantization (MOEQ_TRITON=0 for the eager path).
USE_TRITON = triton_dequant.available() and os.environ.get("MOEQ_TRITON", "1") != "0"


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, cols: int,
               dtype) -> torch.Tensor:
    """(R, C) weight from uint8 packed codes, fp16 scales and float zero points (R, G)."""
    if codes.is_cuda and USE_TRITON:
        return triton_dequant.dequantize_triton(codes, scale, zero, bits, cols, dtype)
    return dequantize_packed(codes, scale, zero, bits, cols, dtype)


class QuantLinear(nn.Module):
    """An (out x in) linear at ``bits``: ``weight`` (packed codes, int8), ``weight_scale``,
    ``weight_zero``, and ``bias`` unquantized. ``weight`` is int8, as for other quantized
    linears, so model code that checks ``linear.weight.dtype`` leaves activations alone."""

    def __init__(self, in_features: int, out_features: int, bits: int, groupsize: int, bias: bool = False,
                 dtype=torch.float16, device="meta"):
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.groups = num_groups(in_features, groupsize)
        kw = dict(device=device)
        self.weight = _frozen(torch.empty(out_features, packed_width(in_features, bits), dtype=torch.int8, **kw))
        self.weight_scale = _frozen(torch.empty(out_features, self.groups, dtype=torch.float16, **kw))
        zero = (out_features, self.groups) if bits == 1 else (out_features, packed_width(self.groups, bits))
        self.weight_zero = _frozen(torch.empty(zero, dtype=torch.float16 if bits == 1 else torch.int8, **kw))
        self.bias = _frozen(torch.empty(out_features, dtype=dtype, **kw)) if bias else None

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        zero = decode_zero(self.weight_zero, self.bits, self.groups)
        return dequantize(self.weight.view(torch.uint8), self.weight_scale, zero, self.bits, self.in_features, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}"


class QuantExperts(nn.Module):
    """Fused experts with packed matrices ``specs = {kind: (rows, cols, [bits per expert])}``
    (kinds: gate_up_proj or up_proj, and down_proj), each stored as ``kind`` (flat codes),
    ``kind_scale`` and ``kind_zero``. ``template``: the experts module being replaced, for
    its activation, gating and unquantized biases."""

    def __init__(self, config, specs: dict[str, tuple[int, int, list[int]]], groupsize: int, template: nn.Module):
        super().__init__()
        self.num_experts = len(next(iter(specs.values()))[2])
        self.layouts: dict[str, ExpertsLayout] = {}
        for kind, (rows, cols, bits) in specs.items():
            layout = ExpertsLayout(rows, cols, num_groups(cols, groupsize), tuple(bits))
            self.layouts[kind] = layout
            setattr(self, kind, _frozen(torch.empty(layout.code_offsets()[-1], dtype=torch.int8, device="meta")))
            setattr(self, f"{kind}_scale", _frozen(torch.empty(self.num_experts, rows, layout.groups,
                                                               dtype=torch.float16, device="meta")))
            setattr(self, f"{kind}_zero", _frozen(torch.empty(layout.zero_offsets()[-1], dtype=torch.int8,
                                                              device="meta")))
        for kind in specs:  # unquantized biases keep the template's names and shapes
            bias = getattr(template, f"{kind}_bias", None)
            if isinstance(bias, torch.Tensor):
                setattr(self, f"{kind}_bias", _frozen(torch.empty_like(bias, device="meta")))
        self.gate_kind = "gate_up_proj" if "gate_up_proj" in specs else "up_proj"
        self.act_fn = getattr(template, "act_fn", None)
        for k, v in vars(template).items():  # scalars a custom gate reads (e.g. a clamp limit)
            if not k.startswith("_") and isinstance(v, (bool, int, float, str)) and k not in ("training",):
                setattr(self, k, v)
        gate = getattr(type(template), "_apply_gate", None)
        if gate is not None:  # the family's own gating (e.g. a clamped, interleaved SwiGLU), run on our weights
            self._template_gate = types.MethodType(gate, self)

    def weight(self, kind: str, e: int, dtype=torch.float32) -> torch.Tensor:
        """Expert e's (rows, cols) matrix of ``kind``, dequantized."""
        layout = self.layouts[kind]
        codes = layout.codes(getattr(self, kind), e)
        zero = layout.zero(getattr(self, f"{kind}_zero"), e)
        return dequantize(codes, getattr(self, f"{kind}_scale")[e], zero, layout.bits[e], layout.cols, dtype)

    def _bias(self, kind: str, e: int):
        bias = getattr(self, f"{kind}_bias", None)
        return None if bias is None else bias[e]

    def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "_template_gate"):
            return self._template_gate(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return self.act_fn(gate) * up

    def expert_forward(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """One expert on its tokens x (T, hidden)."""
        h = F.linear(x, self.weight(self.gate_kind, e, x.dtype), self._bias(self.gate_kind, e))
        h = self._apply_gate(h) if self.gate_kind == "gate_up_proj" else self.act_fn(h)
        return F.linear(h, self.weight("down_proj", e, x.dtype), self._bias("down_proj", e))

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return dequantize_experts_forward(self, hidden_states, top_k_index, top_k_weights)


def dequantize_experts_forward(self: QuantExperts, hidden_states, top_k_index, top_k_weights):
    """Each routed expert's matrices dequantized, then plain matmuls (the reference path)."""
    out = torch.zeros_like(hidden_states)
    with torch.no_grad():
        mask = F.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)  # (E, k, T)
        hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
    for e in hit[:, 0].tolist():
        pos, tok = torch.where(mask[e])
        y = self.expert_forward(hidden_states[tok], e) * top_k_weights[tok, pos, None]
        out.index_add_(0, tok, y.to(out.dtype))
    return out


class MoeqExpertsInterface(ExpertsInterface):
    """Experts implementations for packed experts. transformers' own (grouped_mm, batched_mm)
    read dense 3D weights, so their names map to the packed path too."""
    _global_mapping = {"grouped_mm": dequantize_experts_forward, "batched_mm": dequantize_experts_forward}


MOEQ_EXPERTS_FUNCTIONS = MoeqExpertsInterface()


@lru_cache(maxsize=None)
def experts_class(has_gate: bool, has_bias: bool) -> type:
    """QuantExperts behind transformers' experts interface, for one gate/bias combination
    (the decorator fixes those flags per class)."""
    cls = type("QuantExperts", (QuantExperts,), {"__module__": __name__, "__qualname__": "QuantExperts"})
    return use_experts_implementation(cls, experts_interface=MOEQ_EXPERTS_FUNCTIONS, has_gate=has_gate,
                                      has_bias=has_bias)

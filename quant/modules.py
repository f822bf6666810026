"""Modules that hold packed weights (format: quant/format.py) and dequantize them on the fly.

- ``QuantLinear``: drop-in for an ``nn.Linear``.
- ``QuantExperts``: drop-in for a transformers-5 fused experts module (``gate_up_proj`` /
  ``up_proj`` and ``down_proj``, forward ``(hidden_states, top_k_index, top_k_weights)``),
  every expert at its own bit width. It goes through transformers' experts interface
  (``use_experts_implementation``); every experts implementation name transformers knows
  maps to ``packed_experts_forward``, which runs ``QuantExperts.backend``:
  ``"fused"`` the mixed-bit Triton kernels (quant/triton_experts.py), ``"grouped"`` every
  expert dequantized in one launch then grouped GEMMs (quant/grouped_experts.py),
  ``"dequantize"`` each routed expert dequantized then plain matmuls (the reference),
  ``"auto"`` (the default) on CUDA fused up to FUSED_MAX_TOKENS_PER_EXPERT routed tokens per
  expert where the kernel applies, grouped above (within GROUPED_MAX_STACK_BYTES), and
  dequantize on CPU (auto_backend).
  ``set_experts_backend`` sets it for a whole model.

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
from transformers.integrations import moe as _hf_moe
from transformers.integrations.moe import ExpertsInterface, use_experts_implementation

from . import grouped_experts, triton_dequant, triton_experts
from .format import ExpertsLayout, decode_zero, num_groups
from .packing import dequantize_packed, packed_width

# GPU: one fused Triton kernel per dequantization (MOEQ_TRITON=0 for the eager path).
USE_TRITON = triton_dequant.available() and os.environ.get("MOEQ_TRITON", "1") != "0"

# transformers' SwiGLU on [gate; up] halves, which every decorated experts class without its
# own gate gets; ours is the same math (and the fused kernel's), so it is not copied over.
_DEFAULT_GATE = getattr(_hf_moe, "_default_apply_gate", None)


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
        self.backend = "auto"   # as QuantExperts.backend
        self._kernel_cache: dict = {}

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        zero = decode_zero(self.weight_zero, self.bits, self.groups)
        return dequantize(self.weight.view(torch.uint8), self.weight_scale, zero, self.bits, self.in_features, dtype)

    def fused_applies(self) -> bool:
        return triton_experts.available() and self.in_features % self.groups == 0 \
            and triton_experts.words_ok(self.in_features, self.in_features // self.groups)

    def packed(self) -> triton_experts.PackedMatrices:
        """This matrix as the fused kernel reads it: one "expert" (zeros decoded once, per device)."""
        key = (self.weight.device, self.weight.data_ptr())
        if key not in self._kernel_cache:
            dev = self.weight.device
            zero = decode_zero(self.weight_zero, self.bits, self.groups)
            self._kernel_cache = {key: triton_experts.PackedMatrices(
                codes=self.weight.view(torch.uint8).reshape(-1), code_offsets=torch.zeros(1, dtype=torch.int64, device=dev),
                bits=torch.full((1,), self.bits, dtype=torch.int32, device=dev), scale=self.weight_scale[None],
                zero=zero.to(torch.float16)[None].contiguous(), rows=self.out_features, cols=self.in_features,
                group_size=self.in_features // self.groups)}
        return self._kernel_cache[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        backend = self.backend
        if backend == "auto":
            fused = x.is_cuda and x.numel() // self.in_features <= FUSED_MAX_TOKENS_LINEAR and self.fused_applies()
            backend = "fused" if fused else "dequantize"
        if backend == "fused":
            y = triton_experts.fused_linear(x.reshape(-1, self.in_features), self.packed())
            y = y.view(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias
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
        if gate is not None and gate is not _DEFAULT_GATE:  # the family's own gating (e.g. a clamped, interleaved SwiGLU), run on our weights
            self._template_gate = types.MethodType(gate, self)
        self.backend = "auto"
        self._kernel_cache: dict = {}

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

    def _activate(self, h: torch.Tensor) -> torch.Tensor:
        """The first projection's output (rows, R) as the second's input (rows, I): the gating on
        [gate; up] rows, or the activation where there is no gate."""
        return self._apply_gate(h) if self.gate_kind == "gate_up_proj" else self.act_fn(h)

    def expert_forward(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """One expert on its tokens x (T, hidden)."""
        h = self._activate(F.linear(x, self.weight(self.gate_kind, e, x.dtype), self._bias(self.gate_kind, e)))
        return F.linear(h, self.weight("down_proj", e, x.dtype), self._bias("down_proj", e))

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return packed_experts_forward(self, hidden_states, top_k_index, top_k_weights)

    def packed(self, kind: str) -> triton_experts.PackedMatrices:
        """``kind``'s matrices as the fused kernel reads them (zeros decoded once, per device)."""
        codes = getattr(self, kind)
        key = (kind, codes.device, codes.data_ptr())
        if key not in self._kernel_cache:
            layout = self.layouts[kind]
            zeros = torch.stack([layout.zero(getattr(self, f"{kind}_zero"), e) for e in range(self.num_experts)])
            bias = getattr(self, f"{kind}_bias", None)
            self._kernel_cache = {k: v for k, v in self._kernel_cache.items() if k[0] != kind}
            self._kernel_cache[key] = triton_experts.PackedMatrices(
                codes=codes.view(torch.uint8),
                code_offsets=torch.tensor(layout.code_offsets()[:-1], dtype=torch.int64, device=codes.device),
                bits=torch.tensor(layout.bits, dtype=torch.int32, device=codes.device),
                scale=getattr(self, f"{kind}_scale"), zero=zeros.to(torch.float16).contiguous(),
                rows=layout.rows, cols=layout.cols, group_size=layout.cols // layout.groups,
                bias=None if bias is None else bias.contiguous())
        return self._kernel_cache[key]

    def fused_applies(self) -> bool:
        """The kernels take these shapes (rows of whole int32 words in one group: words_ok) and Triton is there."""
        return all(layout.cols % layout.groups == 0 and triton_experts.words_ok(layout.cols, layout.cols // layout.groups)
                   for layout in self.layouts.values()) and triton_experts.available()

    def _silu_gate(self) -> bool:
        """Plain SwiGLU on [gate; up] rows: the kernel can apply it in registers."""
        return (self.gate_kind == "gate_up_proj" and not hasattr(self, "_template_gate")
                and type(self.act_fn).__name__ in ("SiLU", "SiLUActivation"))


def fused_experts_forward(self: QuantExperts, hidden_states, top_k_index, top_k_weights):
    """The mixed-bit Triton kernels: two launches for all routed experts, whatever their widths."""
    return triton_experts.fused_experts(hidden_states, top_k_index, top_k_weights, self.packed(self.gate_kind),
                                        self.packed("down_proj"), gated=self.gate_kind == "gate_up_proj",
                                        fuse_silu=self._silu_gate(), activation=self._activate)


# "auto" runs the fused kernels up to this many routed tokens per expert (T * k / E) and the
# grouped path above it, where dequantizing each expert once beats unpacking it again for every
# tile of 128 tokens. Measured on one H100 (mixed 3/3/2/2/2/2/1/1 layers,
# benchmarks/results/bench_experts_kernel_h100_v11b_prefill.txt): at 64 per expert (Qwen3-30B-A3B
# shapes, T 1024) fused 1.48 ms against grouped 1.61; at 256, grouped 3.74 against 4.43 (Mixtral,
# T 1024) and 1.90 against 2.84 (Qwen3, T 4096).
FUSED_MAX_TOKENS_PER_EXPERT = 128

# A packed linear (one "expert" every token goes to) runs the fused kernels up to this many tokens
# and dequantizes its matrix above (v8: the experts' threshold then, not measured for linears).
FUSED_MAX_TOKENS_LINEAR = 256


def grouped_experts_forward(self: QuantExperts, hidden_states, top_k_index, top_k_weights):
    """Every expert dequantized in one launch per kind, then grouped GEMMs (quant/grouped_experts.py)."""
    return grouped_experts.grouped_experts(hidden_states, top_k_index, top_k_weights, self.packed(self.gate_kind),
                                           self.packed("down_proj"), activation=self._activate,
                                           swiglu=self._silu_gate())


# The grouped path holds one kind's dequantized experts at once (every expert that has tokens):
# 1.9 GB of bf16 for Mixtral-8x7B's gate/up, 0.8 GB for Qwen3-30B-A3B's, but 15 GB for
# DeepSeek-V3's 256 experts. Above this "auto" keeps the fused kernels, which need no such copy,
# rather than risk running out of memory in the middle of a prefill.
GROUPED_MAX_STACK_BYTES = 4 << 30


def auto_backend(tokens: int, top_k: int, num_experts: int, stack_bytes: int, *, gpu: bool,
                 fused_applies: bool) -> str:
    """"auto"'s choice for one call: dequantize without a GPU (or Triton); the fused kernels up to
    FUSED_MAX_TOKENS_PER_EXPERT routed tokens per expert, or where the grouped path's dequantized
    experts (``stack_bytes``) would pass GROUPED_MAX_STACK_BYTES; grouped otherwise (also where the
    fused kernels do not take the layer; there, past the cap, the per-expert dequantize loop)."""
    if not gpu:
        return "dequantize"
    too_big = stack_bytes > GROUPED_MAX_STACK_BYTES
    if fused_applies and (tokens * top_k / num_experts <= FUSED_MAX_TOKENS_PER_EXPERT or too_big):
        return "fused"
    return "dequantize" if too_big else "grouped"


def packed_experts_forward(self: QuantExperts, hidden_states, top_k_index, top_k_weights):
    """Runs ``self.backend`` (module docstring)."""
    backend = self.backend
    if backend == "auto":
        widest = max(self.layouts[kind].rows * self.layouts[kind].cols for kind in self.layouts)
        backend = auto_backend(hidden_states.shape[0], top_k_index.shape[-1], self.num_experts,
                               self.num_experts * widest * hidden_states.element_size(),
                               gpu=hidden_states.is_cuda and triton_dequant.available(),
                               fused_applies=self.fused_applies())
    if backend == "fused":
        return fused_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    if backend == "grouped":
        return grouped_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    return dequantize_experts_forward(self, hidden_states, top_k_index, top_k_weights)


EXPERTS_BACKENDS = ("auto", "fused", "grouped", "dequantize")


def set_experts_backend(model: nn.Module, backend: str, linears: bool = True) -> int:
    """Every packed experts module of ``model`` (and, with ``linears``, every packed linear)
    runs ``backend``; returns how many modules that is."""
    if backend not in EXPERTS_BACKENDS:
        raise ValueError(f"experts backend {backend!r} is not one of {', '.join(EXPERTS_BACKENDS)}")
    kinds = (QuantExperts, QuantLinear) if linears else (QuantExperts,)
    mods = [m for m in model.modules() if isinstance(m, kinds)]
    for m in mods:
        if backend == "grouped" and not triton_dequant.available():
            raise ValueError("the grouped backend needs Triton; use backend='dequantize'")
        if backend == "fused" and not m.fused_applies():
            raise ValueError("the fused kernels need Triton, and columns and a group size that are multiples of 32; "
                             "use backend='dequantize'")
        m.backend = backend
    return len(mods)


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
    read dense 3D weights, so their names map to the packed path, which picks its backend
    from the module (``QuantExperts.backend``), not from the name."""
    _global_mapping = {"grouped_mm": packed_experts_forward, "batched_mm": packed_experts_forward}


MOEQ_EXPERTS_FUNCTIONS = MoeqExpertsInterface()


@lru_cache(maxsize=None)
def experts_class(has_gate: bool, has_bias: bool) -> type:
    """QuantExperts behind transformers' experts interface, for one gate/bias combination
    (the decorator fixes those flags per class)."""
    cls = type("QuantExperts", (QuantExperts,), {"__module__": __name__, "__qualname__": "QuantExperts"})
    return use_experts_implementation(cls, experts_interface=MOEQ_EXPERTS_FUNCTIONS, has_gate=has_gate,
                                      has_bias=has_bias)

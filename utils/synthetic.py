"""Packed experts with random codes at given widths, for kernel tests and benchmarks.

The codes, scales and zero points are random (not a quantized model: speed and agreement
between two ways of computing the same packed layer do not depend on where the codes came
from); the tensors are written by quant/format.py's writer, so they are laid out exactly as
in a real packed checkpoint.
"""
from __future__ import annotations

import torch
from torch import nn

from ..quant.format import MemoryWriter, linear_tensors, num_groups
from ..quant.modules import QuantExperts, QuantLinear, experts_class


def _random_matrix(rows: int, cols: int, bits: int, groupsize: int, gen: torch.Generator, device):
    """Codes (rows, cols), scales and zero points (rows, groups) of one random packed matrix."""
    kw = dict(generator=gen, device=device)
    groups = num_groups(cols, groupsize)
    codes = torch.randint(0, 2 ** bits, (rows, cols), dtype=torch.int64, **kw)
    scale = (torch.rand(rows, groups, **kw) + 0.5) * (0.04 / 2 ** bits)
    if bits == 1:
        zero = torch.rand(rows, groups, **kw) * 0.6 + 0.2
    else:
        zero = torch.randint(0, 2 ** bits, (rows, groups), **kw).float()
    return codes, scale, zero


def random_packed_linear(in_features: int, out_features: int, bits: int, groupsize: int, device="cpu",
                         seed: int = 0, bias: bool = False, dtype=torch.float16) -> QuantLinear:
    """A QuantLinear with random codes, scales and zero points."""
    gen = torch.Generator(device=device).manual_seed(seed)
    state = linear_tensors(*_random_matrix(out_features, in_features, bits, groupsize, gen, device), bits)
    if bias:
        state["bias"] = torch.randn(out_features, generator=gen, device=device).to(dtype) * 0.1
    lin = QuantLinear(in_features, out_features, bits, groupsize, bias, dtype=dtype)
    lin.load_state_dict(state, assign=True, strict=True)
    return lin.to(device)


def random_packed_experts(template: nn.Module, config, shapes: dict[str, tuple[int, int]], bits: list[int],
                          groupsize: int, device="cpu", seed: int = 0, bias_dtype=torch.float32) -> QuantExperts:
    """A QuantExperts replacing ``template`` (a transformers experts module, on meta is fine)
    with ``shapes = {kind: (rows, cols)}`` (out x in), expert e at ``bits[e]``; the random
    tensors are drawn (and packed) on ``device``."""
    gen = torch.Generator(device=device).manual_seed(seed)
    sink = MemoryWriter(groupsize, False)
    E = len(bits)
    for kind, (rows, cols) in shapes.items():
        for e, b in enumerate(bits):
            codes, scale, zero = _random_matrix(rows, cols, b, groupsize, gen, device)
            sink.add_experts(f"x.{kind}", codes[None], scale[None], zero[None], [b], first=e, all_bits=bits)
    specs = {kind: (rows, cols, list(bits)) for kind, (rows, cols) in shapes.items()}
    has_bias = any(isinstance(getattr(template, f"{k}_bias", None), torch.Tensor) for k in shapes)
    module = experts_class("gate_up_proj" in shapes, has_bias)(config, specs, groupsize, template)
    state = {name[2:]: t for name, t in sink.tensors.items()}
    for kind, (rows, _) in shapes.items():
        if has_bias:
            state[f"{kind}_bias"] = (torch.randn(E, rows, generator=gen, device=device).cpu() * 0.1).to(bias_dtype)
    module.load_state_dict(state, assign=True, strict=True)
    return module.to(device)


def random_family_experts(family: str, hidden: int, inter: int, bits: list[int], groupsize: int) -> QuantExperts:
    """A packed experts module of a small ``family`` layer ("mixtral": SwiGLU, no biases; "gpt_oss":
    its own gating and biases), one expert per entry of ``bits``, on the CPU."""
    from transformers import GptOssConfig, MixtralConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts
    config_cls, cls = {"mixtral": (MixtralConfig, MixtralExperts), "gpt_oss": (GptOssConfig, GptOssExperts)}[family]
    config = config_cls(hidden_size=hidden, intermediate_size=inter, num_local_experts=len(bits))
    with torch.device("meta"):
        template = cls(config)
    return random_packed_experts(template, config, {"gate_up_proj": (2 * inter, hidden), "down_proj": (hidden, inter)},
                                 bits, groupsize)

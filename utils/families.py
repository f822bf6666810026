"""Per-family adapters: the only place that knows module names.

The pipeline sees a model as a list of blocks; each block has
- attention linears in groups that share one input (q/k/v; o), and
- at most one MoE block: a router (E x hidden) and expert matrices, each exposed
  as a stacked (E, out, in) weight with a rule for the input it sees.

Adding a family means writing one of these classes, not another pipeline.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ExpertMatrix:
    """One kind of expert weight, e.g. Mixtral's fused gate_up_proj, all experts stacked."""
    name: str                                           # "gate_up_proj", "down_proj", "wi", ...
    get: Callable[[], torch.Tensor]                     # -> (E, out, in)
    set: Callable[[torch.Tensor], None]                 # (E, out, in) -> written into the model


@dataclass
class MoEBlock:
    name: str                     # module path of the MoE block, e.g. "model.layers.3.mlp"
    module: nn.Module
    num_experts: int
    top_k: int
    matrices: list[ExpertMatrix]  # in forward order: the first one's input is the block input


class MixtralFamily:
    """transformers-5 Mixtral layout (and anything shaped like it: fused 3D experts)."""
    name = "mixtral"

    @staticmethod
    def matches(model: nn.Module) -> bool:
        layers = getattr(getattr(model, "model", None), "layers", None)
        return layers is not None and len(layers) > 0 and any(
            hasattr(getattr(l, "mlp", None), "experts") and hasattr(l.mlp, "gate") for l in layers)

    def blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return [(f"model.layers.{i}", layer) for i, layer in enumerate(model.model.layers)]

    def attention_groups(self, block: nn.Module) -> list[list[tuple[str, nn.Linear]]]:
        a = block.self_attn
        return [[("self_attn.q_proj", a.q_proj), ("self_attn.k_proj", a.k_proj), ("self_attn.v_proj", a.v_proj)],
                [("self_attn.o_proj", a.o_proj)]]

    def moe(self, block: nn.Module, block_name: str) -> MoEBlock | None:
        mlp = getattr(block, "mlp", None)
        if mlp is None or not hasattr(mlp, "experts"):
            return None
        ex = mlp.experts

        def getter(attr):
            return lambda: getattr(ex, attr).data

        def setter(attr):
            def set_(w):
                getattr(ex, attr).data.copy_(w.to(getattr(ex, attr).dtype))
            return set_
        mats = [ExpertMatrix("gate_up_proj", getter("gate_up_proj"), setter("gate_up_proj")),
                ExpertMatrix("down_proj", getter("down_proj"), setter("down_proj"))]
        return MoEBlock(f"{block_name}.mlp", mlp, ex.num_experts, mlp.gate.top_k, mats)

    def router_weight(self, moe: MoEBlock) -> torch.Tensor:
        return moe.module.gate.weight.data

    def router_param_name(self, moe: MoEBlock) -> str:
        return f"{moe.name}.gate.weight"

    def neuron_input_weights(self, moe: MoEBlock) -> torch.Tensor:
        """(E, I, hidden): rows of each expert's gate projection (for MaxVar)."""
        gate_up = moe.module.experts.gate_up_proj.data
        return gate_up[:, : gate_up.shape[1] // 2]

    def route(self, moe: MoEBlock, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (T, hidden) -> (top_k expert ids (T, k), router probabilities (T, E))."""
        logits = F.linear(x, moe.module.gate.weight)
        probs = logits.float().softmax(dim=-1)
        return probs.topk(moe.top_k, dim=-1).indices, probs

    def expert_inputs(self, moe: MoEBlock, expert: int, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The input each expert matrix sees when ``x`` (T, hidden) is routed to ``expert``."""
        ex = moe.module.experts
        gate, up = F.linear(x, ex.gate_up_proj[expert]).chunk(2, dim=-1)
        return {"gate_up_proj": x, "down_proj": ex.act_fn(gate) * up}

    def read_tensor(self, source, name: str) -> torch.Tensor:
        """A tensor by its transformers-5 name; older Mixtral checkpoints (the hub's
        Mixtral-8x7B) store per-expert w1/w3/w2 and block_sparse_moe.gate, fused here."""
        if name in source:
            return source.get(name)
        if name.endswith(".mlp.gate.weight"):
            return source.get(name.replace(".mlp.gate.", ".block_sparse_moe.gate."))
        for fused, parts in ((".mlp.experts.gate_up_proj", ("w1", "w3")), (".mlp.experts.down_proj", ("w2",))):
            if name.endswith(fused):
                base = name[: -len(fused)] + ".block_sparse_moe.experts"
                experts = []
                e = 0
                while f"{base}.{e}.w1.weight" in source:
                    experts.append(torch.cat([source.get(f"{base}.{e}.{w}.weight") for w in parts]))
                    e += 1
                if experts:
                    return torch.stack(experts)
        raise KeyError(f"tensor {name} not found in the checkpoint {source.path}")

    # -- the layer-by-layer driver's view: stages of blocks fed from the embeddings --
    def stages(self, model: nn.Module) -> list[list[tuple[str, nn.Module]]]:
        return [self.blocks(model)]

    def num_windows(self, calib: torch.Tensor) -> int:
        return calib.shape[0]

    def embed_forward(self, model: nn.Module, calib: torch.Tensor, rows: slice, device, stage: int = 0, prev=None):
        """Runs the model until the first block's pre-hook stops it."""
        model.model(input_ids=calib[rows].to(device), use_cache=False)

    def passed_on(self, block_output) -> dict:
        return {}

    def input_layer(self, model: nn.Module, stage: int = 0) -> nn.Module:
        return model.model.layers[0]

    def head(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return model.lm_head(model.model.norm(hidden))

    def pre_block_modules(self, model: nn.Module, stage: int = 0) -> list[nn.Module]:
        """Modules run before the first block (moved to the device for input capture)."""
        return [model.model.embed_tokens, model.model.rotary_emb]

    def post_block_modules(self, model: nn.Module) -> list[nn.Module]:
        return [model.model.norm, model.lm_head]


FAMILIES = [MixtralFamily]


def family_for(model: nn.Module):
    for fam in FAMILIES:
        if fam.matches(model):
            return fam()
    raise ValueError(f"{type(model).__name__} is not a supported MoE model (no layers with a router and "
                     f"experts were found): pass a Mixtral-family checkpoint to quantize_mixtral.py, "
                     f"or a Switch Transformer to quantize_switch.py")

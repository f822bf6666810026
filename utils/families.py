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
    linears: list[str] | None = None                    # per-expert nn.Linear paths (Switch), else fused


@dataclass
class SourceTensor:
    """Where a model tensor is in a checkpoint: ``parts[i]`` are names concatenated along
    dim 0; with ``stacked``, the parts (one per expert) are stacked into a new dim 0."""
    parts: list[list[str]]
    stacked: bool = False

    def read(self, source) -> torch.Tensor:
        rows = [torch.cat([source.get(n) for n in names]) if len(names) > 1 else source.get(names[0])
                for names in self.parts]
        return torch.stack(rows) if self.stacked else rows[0]

    def shape(self, source) -> tuple[int, ...]:
        rows = []
        for names in self.parts:
            shapes = [source.shape(n) for n in names]
            rows.append((sum(s[0] for s in shapes), *shapes[0][1:]) if len(shapes) > 1 else shapes[0])
        return (len(rows), *rows[0]) if self.stacked else tuple(rows[0])

    def names(self) -> list[str]:
        return [n for names in self.parts for n in names]


class Family:
    """What every adapter shares: reading a model tensor through ``locate``."""

    def locate(self, source, name: str) -> SourceTensor:
        if name in source:
            return SourceTensor([[name]])
        raise KeyError(f"tensor {name} not found in the checkpoint {source.path}")

    def read_tensor(self, source, name: str) -> torch.Tensor:
        return self.locate(source, name).read(source)

    def token_masks(self, calib, rows: slice, stage: int = 0) -> dict | None:
        """Which calibration tokens are real (see sequential.batch_masks); None: all."""
        return None

    def attention_input(self, block, group: list) -> str:
        """Which tokens a group of attention linears reads ("block": the block's own)."""
        return "block"


@dataclass
class MoEBlock:
    name: str                     # module path of the MoE block, e.g. "model.layers.3.mlp"
    module: nn.Module
    num_experts: int
    top_k: int
    matrices: list[ExpertMatrix]  # in forward order: the first one's input is the block input


class MixtralFamily(Family):
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

    def locate(self, source, name: str) -> SourceTensor:
        """A tensor by its transformers-5 name; older Mixtral checkpoints (the hub's
        Mixtral-8x7B) store per-expert w1/w3/w2 and block_sparse_moe.gate, fused here."""
        if name in source:
            return SourceTensor([[name]])
        if name.endswith(".mlp.gate.weight"):
            return super().locate(source, name.replace(".mlp.gate.", ".block_sparse_moe.gate."))
        for fused, parts in ((".mlp.experts.gate_up_proj", ("w1", "w3")), (".mlp.experts.down_proj", ("w2",))):
            if name.endswith(fused):
                base = name[: -len(fused)] + ".block_sparse_moe.experts"
                experts = []
                while f"{base}.{len(experts)}.w1.weight" in source:
                    experts.append([f"{base}.{len(experts)}.{w}.weight" for w in parts])
                if experts:
                    return SourceTensor(experts, stacked=True)
        return super().locate(source, name)

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


class SwitchFamily(Family):
    """transformers-5 Switch Transformer (encoder-decoder, T5 blocks): MoE feed-forward in
    every ``encoder_sparse_step``-th block of both stacks, experts as separate nn.Linear
    ``wi``/``wo``, top-1 router ``router.classifier``. Two stages: encoder, then decoder
    (fed the quantized encoder's output for cross-attention). Dense feed-forwards stay
    unquantized. Calibration routes top-1 without the expert-capacity cut (it depends on
    batch layout)."""
    name = "switch"

    @staticmethod
    def matches(model: nn.Module) -> bool:
        return getattr(model.config, "model_type", None) == "switch_transformers"

    def stages(self, model):
        return [[(f"encoder.block.{i}", b) for i, b in enumerate(model.encoder.block)],
                [(f"decoder.block.{i}", b) for i, b in enumerate(model.decoder.block)]]

    def blocks(self, model):
        return [b for stage in self.stages(model) for b in stage]

    def attention_groups(self, block):
        a = block.layer[0].SelfAttention
        groups = [[("layer.0.SelfAttention.q", a.q), ("layer.0.SelfAttention.k", a.k), ("layer.0.SelfAttention.v", a.v)],
                  [("layer.0.SelfAttention.o", a.o)]]
        if block.is_decoder:
            c = block.layer[1].EncDecAttention
            groups += [[("layer.1.EncDecAttention.q", c.q)],
                       [("layer.1.EncDecAttention.k", c.k), ("layer.1.EncDecAttention.v", c.v)],  # input: encoder output
                       [("layer.1.EncDecAttention.o", c.o)]]
        return groups

    def moe(self, block, block_name):
        ff_index = len(block.layer) - 1
        mlp = block.layer[ff_index].mlp
        if not hasattr(mlp, "router"):
            return None
        name = f"{block_name}.layer.{ff_index}.mlp"
        experts = [mlp.experts[f"expert_{e}"] for e in range(mlp.experts.num_experts)]

        def matrix(kind):
            def set_(w):
                for e, ex in enumerate(experts):
                    getattr(ex, kind).weight.data.copy_(w[e].to(getattr(ex, kind).weight.dtype))
            return ExpertMatrix(kind, lambda: torch.stack([getattr(ex, kind).weight.data for ex in experts]), set_,
                                [f"{name}.experts.expert_{e}.{kind}" for e in range(len(experts))])
        return MoEBlock(name, mlp, len(experts), 1, [matrix("wi"), matrix("wo")])

    def router_weight(self, moe):
        return moe.module.router.classifier.weight.data

    def router_param_name(self, moe):
        return f"{moe.name}.router.classifier.weight"

    def neuron_input_weights(self, moe):
        return moe.matrices[0].get()

    def route(self, moe, x):
        logits = F.linear(x.float(), moe.module.router.classifier.weight.float())
        probs = logits.softmax(dim=-1)
        return probs.argmax(dim=-1, keepdim=True), probs

    def expert_inputs(self, moe, expert, x):
        ex = moe.module.experts[f"expert_{expert}"]
        return {"wi": x, "wo": ex.act(ex.wi(x))}

    def locate(self, source, name):
        if name not in source and (name.endswith("embed_tokens.weight") or name == "lm_head.weight"):
            return super().locate(source, "shared.weight")  # tied to the shared embedding
        return super().locate(source, name)

    # -- driver --
    def num_windows(self, calib):
        return calib.src.shape[0]

    def token_masks(self, calib, rows, stage=0):
        """data.Pairs are right-padded: the encoder's tokens are the source's, the decoder's the target's."""
        if calib.src_mask is None:
            return None
        return {"block": (calib.src_mask if stage == 0 else calib.tgt_mask)[rows], "encoder": calib.src_mask[rows]}

    def attention_input(self, block, group: list) -> str:
        """Which tokens a group of attention linears reads: cross-attention keys and values
        read the encoder's."""
        return "encoder" if group[0][0].startswith("layer.1.EncDecAttention.k") else "block"

    def embed_forward(self, model, calib, rows, device, stage=0, prev=None):
        src_mask = None if calib.src_mask is None else calib.src_mask[rows].to(device)
        if stage == 0:
            model.encoder(input_ids=calib.src[rows].to(device), attention_mask=src_mask)
        else:
            enc = model.encoder.final_layer_norm(prev)
            tgt_mask = None if calib.tgt_mask is None else calib.tgt_mask[rows].to(device)
            model.decoder(input_ids=model._shift_right(calib.tgt[rows].to(device)), attention_mask=tgt_mask,
                          encoder_hidden_states=enc, encoder_attention_mask=src_mask, use_cache=False)

    def passed_on(self, out):
        # T5 blocks compute relative position biases in the first block and pass them on.
        passed = {"position_bias": out[1]}
        if len(out) > 2 and out[2] is not None:
            passed["encoder_decoder_position_bias"] = out[2]
        return passed

    def input_layer(self, model, stage=0):
        return (model.encoder if stage == 0 else model.decoder).block[0]

    def pre_block_modules(self, model, stage=0):
        return [model.shared] if stage == 0 else [model.shared, model.encoder.final_layer_norm]

    def post_block_modules(self, model):
        return [model.decoder.final_layer_norm, model.lm_head]


FAMILIES = [MixtralFamily, SwitchFamily]


def family_for(model: nn.Module):
    for fam in FAMILIES:
        if fam.matches(model):
            return fam()
    raise ValueError(f"{type(model).__name__} is not a supported MoE model (no layers with a router and "
                     f"experts were found): pass a Mixtral-family checkpoint to quantize_mixtral.py, "
                     f"or a Switch Transformer to quantize_switch.py")

"""Per-family adapters: the only place that knows module names.

The pipeline sees a model as stages of blocks; each block has
- linears before its feed-forward (attention), grouped by the input they read,
- a feed-forward: a MoE block (experts, router, maybe shared experts) or a dense MLP.

``DecoderFamily`` covers every decoder-only transformers-5 MoE whose experts use
transformers' experts interface (``use_experts_implementation``: fused ``gate_up_proj`` /
``up_proj`` and ``down_proj``, forward ``(hidden_states, top_k_index, top_k_weights)``):
Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2/V3, PhiMoE, GPT-OSS, GraniteMoE and
others built the same way. Routing is the model's own: the pipeline records what the
router hands the experts module. ``SwitchFamily`` is the encoder-decoder Switch
Transformer (experts as separate linears, top-1 routing re-done without the capacity cut).

Checkpoint tensors are found through transformers' own conversion mapping (the hub layout
stores one tensor per expert; the model fuses them), so streaming reads what
``from_pretrained`` would.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

GATE_MAX_OUT = 16   # linears with fewer outputs (e.g. a shared expert's gate) stay unquantized, like routers


@dataclass
class ExpertMatrix:
    """One kind of expert weight, e.g. the fused gate_up_proj, all experts stacked."""
    name: str                                           # "gate_up_proj", "down_proj", "wi", ...
    get: Callable[[], torch.Tensor]                     # -> (E, out, in)
    set: Callable[..., None]                            # (n, out, in), first expert (default 0) -> the model
    linears: list[str] | None = None                    # per-expert nn.Linear paths (Switch), else fused


@dataclass
class MoEBlock:
    name: str                     # module path of the MoE block, e.g. "model.layers.3.mlp"
    module: nn.Module
    num_experts: int
    matrices: list[ExpertMatrix]  # in forward order: the first one's input is the block input
    experts: nn.Module | None = None   # the experts-interface module: routing is recorded at its input
    top_k: int = 1
    experts_path: str | None = None    # its module path ("model.layers.3.mlp.experts")


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
    """What every adapter shares: finding a model tensor in a checkpoint, and defaults."""

    def __init__(self, model: nn.Module | None = None):
        self.conversions = _conversions(model) if model is not None else []

    def locate(self, source, name: str) -> SourceTensor:
        """The checkpoint tensors a model tensor is made of: itself, a renamed one, or
        per-expert tensors fused as transformers' conversion mapping fuses them."""
        for candidate in self._renamed(name):
            if candidate in source:
                return SourceTensor([[candidate]])
        for sources, target, ops in self.conversions:
            if target is None or not name.endswith(target):
                continue
            prefix = name[: -len(target)]
            experts = []
            while True:
                found = [self._find(source, prefix + s.replace("*", str(len(experts)))) for s in sources]
                if None in found:
                    break
                experts.append(found)
            if experts and ops <= {"MergeModulelist", "Concatenate"}:
                return SourceTensor(experts, stacked="MergeModulelist" in ops)
        raise KeyError(f"tensor {name} not found in the checkpoint {source.path}")

    def _renamed(self, name: str) -> list[str]:
        """``name`` and what plain renamings, undone in any combination, make of it."""
        out = [name]
        for candidate in out:          # grows while it is walked: every combination
            for source_pattern, target, ops in self.conversions:
                if ops is None and target in candidate:
                    renamed = candidate.replace(target, source_pattern)
                    if renamed not in out and len(out) < 64:
                        out.append(renamed)
        return out

    def _find(self, source, name: str) -> str | None:
        return next((c for c in self._renamed(name) if c in source), None)

    def read_tensor(self, source, name: str) -> torch.Tensor:
        return self.locate(source, name).read(source)

    def token_masks(self, calib, rows: slice, stage: int = 0) -> dict | None:
        """Which calibration tokens are real (see sequential.batch_masks); None: all."""
        return None

    def attention_input(self, block, linear_name: str) -> str:
        """Which tokens an attention linear reads ("block": the block's own)."""
        return "block"


def _conversions(model) -> list[tuple]:
    """transformers' conversion mapping of ``model`` as (source patterns, target, ops):
    converters as (list of patterns with * for the expert index, target suffix, op names);
    plain renamings as (source, target, None). Regex renamings are left out."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        mapping = get_model_conversion_mapping(model)
    except Exception:  # a transformers without it: direct names only
        return []
    out = []
    for c in mapping:
        sources = [p.replace("\\.", ".") for p in c.source_patterns]   # escaped dots are plain dots
        targets = list(c.target_patterns)
        ops = getattr(c, "operations", None)
        if ops:
            if len(targets) == 1 and all(_plain(s.replace("*", "0")) for s in sources):
                out.append((sources, targets[0], {type(o).__name__ for o in ops}))
        else:
            out += [(s, t, None) for s, t in zip(sources, targets) if _plain(s) and _plain(t)]
    return out


def _plain(pattern: str) -> bool:
    return not any(ch in pattern for ch in "^$\\()[]?+{}|")


class DecoderFamily(Family):
    """Decoder-only MoE LMs with experts behind transformers' experts interface."""
    name = "decoder"

    @staticmethod
    def matches(model: nn.Module) -> bool:
        layers = getattr(getattr(model, "model", None), "layers", None)
        return layers is not None and any(_experts_module(layer) is not None for layer in layers)

    def blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return [(f"model.layers.{i}", layer) for i, layer in enumerate(model.model.layers)]

    def stages(self, model: nn.Module) -> list[list[tuple[str, nn.Module]]]:
        return [self.blocks(model)]

    def feed_forward(self, block: nn.Module) -> tuple[str, nn.Module] | None:
        """The block's MLP: the child that holds the experts, else a dense MLP child."""
        for name, child in block.named_children():
            if _experts_module(child) is not None:
                return name, child
        for name in ("mlp", "feed_forward", "block_sparse_moe"):
            if isinstance(getattr(block, name, None), nn.Module):
                return name, getattr(block, name)
        return None

    def attention_linears(self, block: nn.Module) -> list[tuple[str, nn.Linear]]:
        """Every linear of the block outside its MLP (the attention projections)."""
        ff = self.feed_forward(block)
        skip = f"{ff[0]}." if ff else None
        return [(n, m) for n, m in block.named_modules() if isinstance(m, nn.Linear)
                and not (skip and n.startswith(skip)) and m.out_features >= GATE_MAX_OUT]

    def mlp_linears(self, block: nn.Module) -> list[tuple[str, nn.Linear]]:
        """The MLP's own linears: a dense MLP's, or a MoE block's shared experts' (not the
        routed experts, routers or gates)."""
        ff = self.feed_forward(block)
        if ff is None:
            return []
        name, module = ff
        return [(f"{name}.{n}", m) for n, m in module.named_modules()
                if isinstance(m, nn.Linear) and m.out_features >= GATE_MAX_OUT and not _is_router(m, module)]

    def moe(self, block: nn.Module, block_name: str) -> MoEBlock | None:
        ff = self.feed_forward(block)
        ex = _experts_module(ff[1]) if ff else None
        if ex is None:
            return None
        name, module = ff
        kinds = ["gate_up_proj" if ex.has_gate else "up_proj", "down_proj"]
        mats = [ExpertMatrix(k, _getter(ex, k), _setter(ex, k)) for k in kinds]
        router = _router(module, ex)
        top_k = getattr(router, "top_k", None) or getattr(getattr(module, "config", None), "num_experts_per_tok", 1)
        rel = next(n for n, m in module.named_modules() if m is ex)
        return MoEBlock(f"{block_name}.{name}", module, ex.down_proj.shape[0], mats, experts=ex, top_k=int(top_k),
                        experts_path=f"{block_name}.{name}.{rel}")

    def router_weight(self, moe: MoEBlock) -> torch.Tensor:
        """The router's weight rows (E, hidden): the paper's score. A router bias (GPT-OSS)
        or score-correction bias (DeepSeek-V3) is not part of it."""
        return _router(moe.module, moe.experts).weight.data

    def router_param_name(self, moe: MoEBlock) -> str:
        router = _router(moe.module, moe.experts)
        return f"{moe.name}.{next(n for n, m in moe.module.named_modules() if m is router)}.weight"

    def neuron_input_weights(self, moe: MoEBlock) -> torch.Tensor:
        """(E, I, hidden): the rows that feed each expert's neurons (gate rows, for MaxVar)."""
        w = moe.matrices[0].get()
        if not moe.experts.has_gate:
            return w
        return w[:, 0::2] if not getattr(moe.experts, "is_concatenated", True) else w[:, : w.shape[1] // 2]

    def expert_inputs(self, moe: MoEBlock, expert: int, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The input each expert matrix sees when ``x`` (T, hidden) is routed to ``expert``,
        through the experts module's own activation and gating."""
        ex, first = moe.experts, moe.matrices[0]
        bias = getattr(ex, f"{first.name}_bias", None)
        h = F.linear(x, first.get()[expert].to(x.dtype), None if bias is None else bias[expert].to(x.dtype))
        h = ex._apply_gate(h) if ex.has_gate else ex.act_fn(h)
        return {first.name: x, "down_proj": h}

    # -- the layer-by-layer driver's view --
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
        logits = model.lm_head(model.model.norm(hidden))
        return logits / getattr(model.config, "logits_scaling", 1.0)   # GraniteMoE divides its logits

    def pre_block_modules(self, model: nn.Module, stage: int = 0) -> list[nn.Module]:
        """Modules run before the first block (embeddings, rotary), moved to the device for input capture."""
        return [m for n, m in model.model.named_children() if n not in ("layers", "norm")]

    def post_block_modules(self, model: nn.Module) -> list[nn.Module]:
        return [model.model.norm, model.lm_head]


MixtralFamily = DecoderFamily   # the first family it was written for


def _experts_module(module: nn.Module) -> nn.Module | None:
    """The experts-interface module in ``module`` (the decorator sets has_gate / is_transposed)."""
    for m in module.modules():
        if hasattr(m, "is_transposed") and hasattr(m, "has_gate") and isinstance(getattr(m, "down_proj", None),
                                                                                  torch.Tensor):
            return m
    return None


def _is_router(linear: nn.Module, moe_block: nn.Module) -> bool:
    ex = _experts_module(moe_block)
    return ex is not None and linear.weight.shape[0] == (ex.down_proj.shape[0])


def _router(moe_block: nn.Module, experts: nn.Module) -> nn.Module:
    """The module of ``moe_block`` whose weight is (num_experts, hidden): the router."""
    E = experts.down_proj.shape[0]
    for m in moe_block.modules():
        w = getattr(m, "weight", None)
        if m is not experts and isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape[0] == E:
            return m
    raise ValueError(f"{type(moe_block).__name__} has no router (a weight of {E} rows): this family is not supported")


def _getter(ex: nn.Module, attr: str):
    # (E, out, in) whatever the module stores: transposed layouts (GPT-OSS) are turned.
    if ex.is_transposed:
        return lambda: getattr(ex, attr).data.transpose(1, 2)
    return lambda: getattr(ex, attr).data


def _setter(ex: nn.Module, attr: str):
    def set_(w, first: int = 0):
        p = getattr(ex, attr)
        p.data[first:first + w.shape[0]].copy_((w.transpose(1, 2) if ex.is_transposed else w).to(p.dtype))
    return set_


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

    def feed_forward(self, block):
        ff_index = len(block.layer) - 1
        return f"layer.{ff_index}.mlp", block.layer[ff_index].mlp

    def attention_linears(self, block):
        a = block.layer[0].SelfAttention
        out = [("layer.0.SelfAttention.q", a.q), ("layer.0.SelfAttention.k", a.k), ("layer.0.SelfAttention.v", a.v),
               ("layer.0.SelfAttention.o", a.o)]
        if block.is_decoder:
            c = block.layer[1].EncDecAttention
            out += [("layer.1.EncDecAttention.q", c.q), ("layer.1.EncDecAttention.k", c.k),
                    ("layer.1.EncDecAttention.v", c.v), ("layer.1.EncDecAttention.o", c.o)]
        return out

    def mlp_linears(self, block):
        return []   # dense feed-forwards stay unquantized; MoE experts are the matrices below

    def moe(self, block, block_name):
        name, mlp = self.feed_forward(block)
        if not hasattr(mlp, "router"):
            return None
        name = f"{block_name}.{name}"
        experts = [mlp.experts[f"expert_{e}"] for e in range(mlp.experts.num_experts)]

        def matrix(kind):
            def set_(w, first=0):
                for i in range(w.shape[0]):
                    lin = getattr(experts[first + i], kind)
                    lin.weight.data.copy_(w[i].to(lin.weight.dtype))
            return ExpertMatrix(kind, lambda: torch.stack([getattr(ex, kind).weight.data for ex in experts]), set_,
                                [f"{name}.experts.expert_{e}.{kind}" for e in range(len(experts))])
        return MoEBlock(name, mlp, len(experts), [matrix("wi"), matrix("wo")], top_k=1)

    def router_weight(self, moe):
        return moe.module.router.classifier.weight.data

    def router_param_name(self, moe):
        return f"{moe.name}.router.classifier.weight"

    def neuron_input_weights(self, moe):
        return moe.matrices[0].get()

    def route(self, moe, x):
        """x: (T, hidden) -> (top-1 expert ids (T, 1), router probabilities (T, E))."""
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

    def attention_input(self, block, linear_name: str) -> str:
        """Which tokens an attention linear reads: cross-attention keys and values read the encoder's."""
        return "encoder" if linear_name in ("layer.1.EncDecAttention.k", "layer.1.EncDecAttention.v") else "block"

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


FAMILIES = [SwitchFamily, DecoderFamily]


def family_for(model: nn.Module):
    for fam in FAMILIES:
        if fam.matches(model):
            return fam(model)
    raise ValueError(f"{type(model).__name__} is not a supported MoE model: no layer holds an experts module of "
                     f"transformers' experts interface (gate_up_proj / down_proj, use_experts_implementation), "
                     f"and it is not a Switch Transformer")

"""One quantization pipeline for every MoE family.

Per block (true-sequential, as GPTQ does for LLaMA-style models):
  1. run the block on the calibration batches up to the MoE, collecting the Hessians
     of the attention inputs; GPTQ the attention linears at ``attn_bits``;
  2. run it again (attention now quantized) up to the MoE, routing every token with the
     block's own router: per-expert Hessians from exactly the tokens each expert gets,
     token counts, mean router probabilities;
  3. score and order the experts, give each its bits, GPTQ all experts of one matrix
     kind in one batched call;
  4. run the quantized block to produce the next block's inputs.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from quant import allocation
from quant.gptq import QUANTIZERS, output_error
from quant.packing import pack_matrix
from quant.quantizer import check_bits

from .loading import BlockLoader
from .sequential import HessianAccumulator, capture_block_inputs, input_hessian_hook, run_block


@dataclass
class QuantConfig:
    method: str = "gptq"                 # "gptq" | "rtn" (round-to-nearest baseline)
    mixed_type: str = "mixed"            # "mixed" | "uniform"
    order_type: str = "combined"
    zeta: float = 3.0
    avg_bits: float = 2.0
    high_bits: int = 3
    mid_bits: int | None = 2
    low_bits: int = 1
    level_counts: dict[int, int] | None = None   # explicit counts per level (overrides avg_bits)
    attn_bits: int | None = 4                    # None: attention stays unquantized
    groupsize: int = 128
    sym: bool = False
    act_order: bool = False
    percdamp: float = 0.01
    seed: int = 0
    min_expert_tokens: int = 16
    batch_size: int = 8
    expert_batch: int = 0                # experts per batched GPTQ call (0: all)
    router_reference: dict[str, torch.Tensor] | None = None   # MoE block name -> reference router weight
    on_experts: object = None            # optional callback(name, W, H, bits, result) (benchmarks' reference check)


@dataclass
class QuantReport:
    layers: list[dict] = field(default_factory=list)       # bit allocation per MoE block
    modules: list[dict] = field(default_factory=list)      # one row per quantized matrix
    starved: list[dict] = field(default_factory=list)      # experts that fell back to all-token Hessians
    packed: dict[str, torch.Tensor] = field(default_factory=dict)        # checkpoint tensor name -> tensor
    module_bits: dict[str, int | list[int]] = field(default_factory=dict)  # module path -> bits (per expert)
    module_shapes: dict[str, tuple[int, int]] = field(default_factory=dict)  # module path -> (rows, cols)
    kept: dict[str, torch.Tensor] = field(default_factory=dict)   # unquantized tensors of released blocks
    timings: dict[str, float] = field(default_factory=dict)       # phase -> seconds (see ``phase``)
    sink: object = None        # a checkpoint.ShardWriter: packed tensors go to disk instead of ``packed``

    def avg_expert_bits(self) -> float:
        bits = [b for layer in self.layers for b in layer["bits"]]
        return sum(bits) / len(bits) if bits else float("nan")


def level_counts_for(cfg: QuantConfig, num_experts: int) -> dict[int, int]:
    if cfg.level_counts is not None:
        if sum(cfg.level_counts.values()) != num_experts:
            raise ValueError(f"the per-level expert counts {cfg.level_counts} add up to "
                             f"{sum(cfg.level_counts.values())}, but the model has {num_experts} experts per layer")
        return dict(cfg.level_counts)
    if cfg.mixed_type == "uniform":
        if float(cfg.avg_bits) != int(cfg.avg_bits):
            raise ValueError(f"--mixed_type uniform needs an integer --avg_bits, got {cfg.avg_bits}")
        return {int(cfg.avg_bits): num_experts}
    return allocation.level_counts(num_experts, cfg.avg_bits, cfg.high_bits, cfg.low_bits, cfg.mid_bits)


def validate_config(cfg: QuantConfig) -> None:
    """Reject bad settings before any model is loaded."""
    if cfg.method not in QUANTIZERS:
        raise ValueError(f"unknown --method {cfg.method!r}: choose one of {', '.join(QUANTIZERS)}")
    if cfg.order_type not in allocation.ORDER_TYPES:
        raise ValueError(f"unknown --order_type {cfg.order_type!r}: choose one of {', '.join(allocation.ORDER_TYPES)}")
    if cfg.mixed_type not in ("mixed", "uniform"):
        raise ValueError(f"unknown --mixed_type {cfg.mixed_type!r}: choose mixed or uniform")
    if cfg.attn_bits is not None:
        check_bits(cfg.attn_bits)
    if cfg.level_counts is not None:
        for b in cfg.level_counts:
            check_bits(b)
    elif cfg.mixed_type == "uniform":
        level_counts_for(cfg, 8)
        check_bits(int(cfg.avg_bits))
    else:
        for b in (cfg.high_bits, cfg.low_bits) + ((cfg.mid_bits,) if cfg.mid_bits is not None else ()):
            check_bits(b)
        # range and spacing checks do not depend on the expert count: any count will do here
        allocation.level_counts(8, cfg.avg_bits, cfg.high_bits, cfg.low_bits, cfg.mid_bits)


def _log_row(row: dict) -> None:
    tqdm.write(f"  {row['name']:<48} {row['bits']:>6} {row['tokens']:>9} {row['rel_err']:>10.3e} {row['seconds']:>7.2f}")


@contextmanager
def phase(report: QuantReport, name: str, device):
    """Adds the wall time of the enclosed work (device synchronised) to report.timings[name]."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    sync()
    t0 = time.time()
    try:
        yield
    finally:
        sync()
        report.timings[name] = report.timings.get(name, 0.0) + time.time() - t0


def _sync_time(t: torch.Tensor) -> float:
    if t.is_cuda:
        torch.cuda.synchronize()
    return time.time()


def _record(report, name, codes, scale, zero, bits, stacked, shape):
    """Pack the codes of one matrix (or a stack of experts) into ``report``."""
    for i, b in enumerate(bits):
        prefix = f"{name}.{i}" if stacked else name
        for suffix, t in pack_matrix(codes[i], scale[i], zero[i], b).items():
            if report.sink is not None:
                report.sink.add(f"{prefix}.{suffix}", t.cpu())  # streamed to disk: host RAM stays flat
            else:
                report.packed[f"{prefix}.{suffix}"] = t.cpu()
    report.module_bits[name] = list(bits) if stacked else bits[0]
    report.module_shapes[name] = shape


def _log(report, name, bits, tokens, loss, seconds):
    for i, b in enumerate(bits):
        row = {"name": name if len(bits) == 1 else f"{name}[{i}]", "bits": b, "tokens": int(tokens[i]),
               "rel_err": float(loss[i]), "seconds": seconds / len(bits)}
        report.modules.append(row)
        _log_row(row)


def _gptq_experts(weight, hessian, bits, cfg):
    """GPTQ a stack of experts (E, R, C), each at its own bits, in batches of cfg.expert_batch."""
    step = cfg.expert_batch or weight.shape[0]
    parts = [QUANTIZERS[cfg.method](weight[i:i + step], hessian[i:i + step], bits[i:i + step], cfg.groupsize, cfg.sym,
                           cfg.percdamp, cfg.act_order) for i in range(0, weight.shape[0], step)]
    return {attr: torch.cat([getattr(p, attr) for p in parts]) for attr in ("codes", "scale", "zero", "weight", "loss")}


def _quantize_attention(block_name, block, family, inputs, kwargs, moe, cfg, report, device, act_device):
    groups = family.attention_groups(block)
    accs, handles = [], []
    for group in groups:
        first = group[0][1]
        acc = HessianAccumulator(first.in_features, device)
        accs.append(acc)
        handles.append(first.register_forward_pre_hook(input_hessian_hook(acc)))
    try:
        with phase(report, "hessian_attention", device):
            run_block(block, inputs, kwargs, device, act_device, stop_at=moe.module if moe else None)
    finally:
        for h in handles:
            h.remove()
    for group, acc in zip(groups, accs):
        # Linears sharing an input share H; GPTQ treats rows independently, so stacking
        # q/k/v row-wise and quantizing once is the same as three calls, in one loop.
        weights = [linear.weight.data.float() for _, linear in group]
        stacked = torch.cat(weights)[None]
        t0 = time.time()
        with phase(report, "gptq_attention", device):
            res = QUANTIZERS[cfg.method](stacked, acc.hessian(0)[None], [cfg.attn_bits], cfg.groupsize, cfg.sym,
                                cfg.percdamp, cfg.act_order)
        seconds = _sync_time(stacked) - t0
        row = 0
        for (lname, linear), w in zip(group, weights):
            rows = slice(row, row + w.shape[0])
            row += w.shape[0]
            deq = res.weight[0, rows]
            name = f"{block_name}.{lname}"
            with phase(report, "pack", device):
                _record(report, name, res.codes[0, rows][None], res.scale[0, rows][None], res.zero[0, rows][None],
                        [cfg.attn_bits], False, tuple(w.shape))
            err = output_error(w, deq, acc.hessian(0))
            _log(report, name, [cfg.attn_bits], [int(acc.n[0])], err[None], seconds * w.shape[0] / stacked.shape[1])
            linear.weight.data.copy_(deq.to(linear.weight.dtype))


def _collect_moe_stats(family, moe, block, inputs, kwargs, device, act_device, fallback: list[int] | None = None):
    """Per-expert Hessians for every expert matrix from its routed tokens (or, for the
    experts in ``fallback``, from all tokens), token counts and mean router probability."""
    E = moe.num_experts
    shapes = {m.name: m.get().shape for m in moe.matrices}
    accs = {name: HessianAccumulator(shape[2], device, E) for name, shape in shapes.items()}
    tokens = torch.zeros(E, dtype=torch.long)
    prob_sum = torch.zeros(E, dtype=torch.float64)
    n_tok = [0]

    def hook(module, args):
        x = args[0].reshape(-1, args[0].shape[-1])
        top, probs = family.route(moe, x)
        prob_sum.add_(probs.sum(0).double().cpu())
        n_tok[0] += x.shape[0]
        for e in range(E):
            if fallback is not None:
                if e not in fallback:
                    continue
                xe = x
            else:
                xe = x[(top == e).any(dim=-1)]
            tokens[e] += xe.shape[0]
            if xe.shape[0] == 0:
                continue
            for name, inp in family.expert_inputs(moe, e, xe).items():
                accs[name].add(inp, e)

    handle = moe.module.register_forward_pre_hook(hook)
    try:
        run_block(block, inputs, kwargs, device, act_device, stop_at=moe.module)
    finally:
        handle.remove()
    return accs, tokens, (prob_sum / max(n_tok[0], 1)).tolist()


def _quantize_moe(block_name, block, family, moe, inputs, kwargs, cfg, report, device, act_device):
    with phase(report, "hessian_experts", device):
        accs, tokens, routing_weight = _collect_moe_stats(family, moe, block, inputs, kwargs, device, act_device)
    starved = [e for e in range(moe.num_experts) if tokens[e] < cfg.min_expert_tokens]
    if starved:
        # Too few routed tokens for a usable Hessian: fall back to all the block's tokens
        # (the paper repo zeroes such an expert instead, destroying it).
        with phase(report, "hessian_experts", device):
            fb_accs, _, _ = _collect_moe_stats(family, moe, block, inputs, kwargs, device, act_device, fallback=starved)
        for name, acc in accs.items():
            for e in starved:
                acc.sum[e], acc.n[e] = fb_accs[name].sum[e], fb_accs[name].n[e]
        all_tokens = int(fb_accs[moe.matrices[0].name].n[starved[0]])
        del fb_accs
        for e in starved:
            report.starved.append({"layer": moe.name, "expert": e, "tokens": int(tokens[e])})
        tqdm.write(f"  {moe.name}: experts {starved} got fewer than {cfg.min_expert_tokens} calibration tokens "
                   f"({[int(tokens[e]) for e in starved]}); using Hessians from all {all_tokens} tokens")

    ref = (cfg.router_reference or {}).get(moe.name)
    scores = {
        "router_norm": allocation.router_norm(family.router_weight(moe), ref),
        "max_var": allocation.max_var(family.neuron_input_weights(moe)),
        "tokens": tokens.tolist(),
        "routing_weight": routing_weight,
    }
    order = allocation.expert_order(cfg.order_type, scores, cfg.zeta, cfg.seed + len(report.layers))
    bits = allocation.bits_per_expert(order, level_counts_for(cfg, moe.num_experts))
    report.layers.append({"name": moe.name, "expert_order": order, "bits": bits, "scores": scores,
                          "router_score": "norm_change" if ref is not None else "norm"})
    for mat in moe.matrices:
        W = mat.get().float()
        name = f"{moe.name}.experts.{mat.name}"
        t0 = time.time()
        with phase(report, "gptq_experts", device):
            H = accs[mat.name].hessian()
            res = _gptq_experts(W, H, bits, cfg)
            mat.set(res["weight"])
        if cfg.on_experts is not None:
            with phase(report, "callback", device):  # not quantization work: kept out of the other phases
                cfg.on_experts(name, W, H, bits, res)
        del H
        seconds = time.time() - t0
        with phase(report, "pack", device):
            if mat.linears is None:  # fused experts: one stacked entry, bits per expert
                _record(report, name, res["codes"], res["scale"], res["zero"], bits, True, tuple(W.shape[1:]))
            else:  # separate expert linears (Switch): each its own quantized linear
                for e, lin in enumerate(mat.linears):
                    _record(report, lin, res["codes"][e:e + 1], res["scale"][e:e + 1], res["zero"][e:e + 1],
                            [bits[e]], False, tuple(W.shape[1:]))
        _log(report, name, bits, tokens, res["loss"], seconds)


@torch.no_grad()
def quantize_model(model, family, windows: torch.Tensor, cfg: QuantConfig, device, act_device=None,
                   loader: BlockLoader | None = None, sink=None) -> QuantReport:
    """Quantizes ``model`` block by block (weights replaced by their dequantized values,
    or released when ``loader`` streams and does not keep blocks) and returns the
    report with the packed codes."""
    act_device = act_device or device
    loader = loader or BlockLoader(family, device)
    report = QuantReport(sink=sink)
    tqdm.write(f"  {'module':<48} {'bits':>6} {'tokens':>9} {'rel_err':>10} {'sec':>7}")
    inputs = None
    for stage, blocks in enumerate(family.stages(model)):   # decoder-only: one stage; T5: encoder, decoder
        with phase(report, "capture", device):
            inputs, kwargs = capture_block_inputs(model, family, windows, cfg.batch_size, device, act_device,
                                                  stage, inputs)
        for block_name, block in tqdm(blocks, desc=f"quantizing blocks (stage {stage})"):
            inputs = _quantize_block(block_name, block, family, inputs, kwargs, cfg, report, device, act_device,
                                     loader)
    return report


def _quantize_block(block_name, block, family, inputs, kwargs, cfg, report, device, act_device, loader):
    with phase(report, "load", device):
        ctx = loader.block(block_name, block)
        ctx.__enter__()
    moe = family.moe(block, block_name)
    if cfg.attn_bits is not None:
        _quantize_attention(block_name, block, family, inputs, kwargs, moe, cfg, report, device, act_device)
    if moe is not None:
        _quantize_moe(block_name, block, family, moe, inputs, kwargs, cfg, report, device, act_device)
    with phase(report, "output", device):
        outputs = run_block(block, inputs, kwargs, device, act_device, family=family)
    if not loader.keep:
        quantized = set(report.module_bits) | {f"{m}.weight" for m in report.module_bits}
        for name, t in block.state_dict().items():
            full = f"{block_name}.{name}"
            if full not in quantized:
                report.kept[full] = t.to("cpu", copy=True)
    with phase(report, "load", device):
        ctx.__exit__(None, None, None)
    return outputs

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

With several ranks (utils/distributed.py) each runs its share of the calibration batches and
quantizes its share of each block's matrices from the inputs of all batches; the results
travel to every rank, which then hold the same block again.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..config import ConfigError, QuantConfig
from ..quant import allocation, format
from ..quant.gptq import QUANTIZERS, dequantize_groups, output_error
from .distributed import Ranks
from .loading import BadWeights, BlockLoader
from .sequential import (HessianAccumulator, SharedInputHessians, batch_masks, capture_block_inputs, real_rows,
                         run_block)

Log = Callable[[str], None]


@dataclass
class QuantReport:
    """What a quantization did, as plain data: per MoE layer its allocation (expert order,
    bits, scores), per quantized matrix one row (bits, tokens, relative output error,
    seconds), the experts that fell back to all-token Hessians, and seconds per phase."""
    layers: list[dict] = field(default_factory=list)
    modules: list[dict] = field(default_factory=list)
    starved: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def avg_expert_bits(self) -> float:
        bits = [b for layer in self.layers for b in layer["bits"]]
        return sum(bits) / len(bits) if bits else float("nan")

    def avg_expert_stored_bits(self) -> float:
        """Bits per expert weight as stored: codes plus scales and zero points."""
        pairs = [(s * layer["weights_per_expert"], layer["weights_per_expert"])
                 for layer in self.layers for s in layer.get("stored_bits", [])]
        return sum(p[0] for p in pairs) / sum(p[1] for p in pairs) if pairs else float("nan")


@dataclass
class _Run:
    """What every step of one quantization needs."""
    family: object
    cfg: QuantConfig
    report: QuantReport
    device: torch.device
    act_device: torch.device
    sink: object = None                    # quant.format.PackedWriter: packed and unquantized tensors go here
    log: Log | None = None                 # per-module table rows and notes (None: silent)
    router_reference: dict | None = None   # MoE block name -> router weight before training
    on_experts: Callable | None = None     # (name, W, H, bits, result) after each experts GPTQ (benchmarks)
    ranks: Ranks = field(default_factory=Ranks)   # who does which part of the work
    fp_outputs: bool = False               # each block hands on the outputs of its unquantized weights

    def say(self, line: str) -> None:
        if self.log is not None:
            self.log(line)

    def hessians(self, linears: dict, current: dict, mask_key=lambda name: "block") -> SharedInputHessians:
        return SharedInputHessians(list(linears.items()), self.device, current, mask_key, self.ranks, self.act_device)


TABLE_HEADER = f"  {'module':<48} {'bits':>6} {'tokens':>9} {'rel_err':>10} {'sec':>7}"


def table_row(row: dict) -> str:
    tokens = "no tokens" if row["tokens"] == 0 else f"{row['tokens']:>9}"
    err = "-" if row["rel_err"] is None else f"{row['rel_err']:.3e}"
    return f"  {row['name']:<48} {row['bits']:>6} {tokens:>9} {err:>10} {row['seconds']:>7.2f}"


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


def _log(run: _Run, name, bits, tokens, loss, seconds):
    for i, b in enumerate(bits):
        # an expert that saw no token has no output error to measure (not an error of 0)
        row = {"name": name if len(bits) == 1 else f"{name}[{i}]", "bits": b, "tokens": int(tokens[i]),
               "rel_err": float(loss[i]) if int(tokens[i]) > 0 else None, "seconds": seconds / len(bits)}
        run.report.modules.append(row)
        run.say(table_row(row))


def _check_inputs(hessian: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(hessian).all()):
        raise BadWeights(f"the calibration inputs of {name} are not finite (NaN or inf): the layers before it "
                         f"produced them; look there for corrupt weights")


def _check_scales(scale: torch.Tensor, weight: torch.Tensor, name: str, bits: list[int]) -> None:
    """Scales are stored in float16: a group whose range does not fit is a clear error
    (it would otherwise turn into inf weights and a failed Cholesky a layer later)."""
    bad = ~torch.isfinite(scale)
    if bool(bad.any()):
        e, r, g = (int(i) for i in bad.nonzero()[0])
        w = weight[e, r]
        c = int(w.abs().argmax())
        raise BadWeights(f"{name}{f'[{e}]' if len(bits) > 1 else ''}: row {r} holds {float(w[c]):.4g} (column {c}); "
                         f"at {bits[e]} bits its group's quantization scale overflows float16, which the packed "
                         f"format stores: the checkpoint has a corrupt or extreme weight there")


def _gptq_experts(weight, hessian, bits, cfg: QuantConfig) -> dict:
    """GPTQ of a stack of experts (n, R, C) in one batched call, each at its own bits."""
    res = QUANTIZERS[cfg.method](weight, hessian, bits, cfg.groupsize, cfg.sym, cfg.percdamp, cfg.act_order,
                                 grid=cfg.grid)
    return {attr: getattr(res, attr) for attr in ("codes", "scale", "zero", "weight", "loss")}


def _on_owner(run: _Run, owner: int, work: Callable[[], dict]) -> dict:
    """``work()`` (a GPTQ result) on the rank ``owner``, its result on every rank. A BadWeights
    it raises is raised on every rank (none is left waiting for the result)."""
    res = None
    if run.ranks.rank == owner:
        try:
            res = work()
        except BadWeights as e:
            res = e
    return _share(run, res, owner)


def _share(run: _Run, res, src: int) -> dict:
    """Rank ``src``'s GPTQ result on every rank: codes, scales, zeros and losses travel; the
    weights are dequantized on arrival, as GPTQ dequantized them on ``src``."""
    if not run.ranks.distributed:
        return run.ranks.share(res, src)   # itself (or its exception raised)
    with phase(run.report, "share", run.device):
        travel = res if res is None or isinstance(res, BaseException) else \
            {k: v for k, v in res.items() if k != "weight"}
        got = run.ranks.share(travel, src)
        if run.ranks.rank == src:
            return res
        got["weight"] = dequantize_groups(got["codes"], got["scale"], got["zero"])
        return got


def _gptq_group(run: _Run, acc: HessianAccumulator, stacked: torch.Tensor, rows: list[int], bits: int, name: str,
                phase_name: str) -> dict:
    """GPTQ of linears that read one input, their rows stacked (GPTQ treats rows independently,
    so this equals one call per linear, in one loop); a relative output error per linear."""
    cfg = run.cfg
    H = acc.hessian(0)
    _check_inputs(H, name)
    with phase(run.report, f"gptq_{phase_name}", run.device):
        res = QUANTIZERS[cfg.method](stacked, H[None], [bits], cfg.groupsize, cfg.sym, cfg.percdamp, cfg.act_order,
                                     grid=cfg.grid)
    pairs = zip(stacked[0].split(rows), res.weight[0].split(rows))
    return {"codes": res.codes, "scale": res.scale, "zero": res.zero, "weight": res.weight,
            "loss": torch.stack([output_error(w, deq, H) for w, deq in pairs]), "tokens": acc.n[:1]}


def _quantize_linears(run: _Run, block_name, block, hessians, linears: dict, bits: int, phase_name: str) -> list[str]:
    """GPTQ of ``linears`` (name -> nn.Linear) at ``bits``, one call per group of linears that
    read the same input (on the group's rank); returns the quantized parameter names."""
    done = []
    for gid, (names, acc) in enumerate(zip(hessians.groups, hessians.accs)):
        group = [(n, linears[n]) for n in names]
        stacked = torch.cat([linear.weight.data.float() for _, linear in group])[None]
        rows = [linear.weight.shape[0] for _, linear in group]
        group_name = f"{block_name}." + "+".join(names)
        t0 = time.time()
        res = _on_owner(run, run.ranks.owner(gid),
                        lambda: _gptq_group(run, acc, stacked, rows, bits, group_name, phase_name))
        _check_scales(res["scale"], stacked, group_name, [bits])
        seconds = time.time() - t0
        first = 0
        for (lname, linear), n, loss in zip(group, rows, res["loss"]):
            part = slice(first, first + n)
            first += n
            name = f"{block_name}.{lname}"
            if run.sink is not None:
                with phase(run.report, "pack", run.device):
                    run.sink.add_linear(name, res["codes"][0, part], res["scale"][0, part], res["zero"][0, part],
                                        bits)
            _log(run, name, [bits], [int(res["tokens"])], loss[None], seconds * n / stacked.shape[1])
            linear.weight.data.copy_(res["weight"][0, part].to(linear.weight.dtype))
            done.append(f"{name}.weight")
    return done


def _quantize_attention(run: _Run, block_name, block, inputs, kwargs, masks) -> list[str]:
    """Pass 1: the linears before the feed-forward (attention), from their own inputs."""
    linears = dict(run.family.attention_linears(block))
    if not linears or run.cfg.attn_bits is None:
        return []
    current = {}
    hessians = run.hessians(linears, current, lambda name: run.family.attention_input(block, name))
    ff = run.family.feed_forward(block)
    with phase(run.report, "hessian_attention", run.device):
        try:
            run_block(block, inputs, kwargs, run.device, run.act_device, stop_at=ff[1] if ff else None,
                      before_batch=_pointing(current, masks, hessians))
        finally:
            hessians.remove()
        hessians.gather()
    return _quantize_linears(run, block_name, block, hessians, linears, run.cfg.attn_bits, "attention")


def _pointing(current: dict, masks: list | None, *hessians):
    """before_batch for run_block: ``current`` holds batch i's token masks while it runs."""
    def before_batch(i):
        current.clear()
        if masks is not None and masks[i] is not None:
            current.update(masks[i])
        for h in hessians:
            h.new_batch()
    return before_batch


# Routed rows an expert collects before they go into its Hessians in one product: one
# (tokens x hidden)^T (tokens x hidden) per batch was ~0.9 ms each on an H100 at DeepSeek-V3
# shapes (~500 rows per expert and batch, and a 7168^2 float32 sum read and written each
# time); 4096 rows make each product ~8x larger and the sums' traffic ~8x smaller.
ROWS_PER_UPDATE = 4096


class _ExpertStats:
    """What one pass records of a MoE block: per expert the tokens routed to it and their
    routing weights (all experts), and Hessians of every expert matrix from exactly the
    tokens routed to it, for the experts of ``chunk`` (those in ``fallback``: all tokens)."""

    def __init__(self, family, moe, device, chunk: range | None = None, fallback: set[int] = frozenset(),
                 keep: torch.device | None = None):
        self.family, self.moe, self.fallback = family, moe, fallback
        E = moe.num_experts
        self.chunk = range(E) if chunk is None else chunk
        self.keep, self.batches = keep, []   # keep: where the routed batches are kept for later chunks
        self.accs = {m.name: HessianAccumulator(m.get().shape[2], device, len(self.chunk)) for m in moe.matrices}
        self._waiting = [[] for _ in self.chunk]   # per expert of the chunk: routed rows not yet in its Hessians
        # Experts in ``fallback`` all read every token: the Hessian of a matrix that reads the
        # tokens themselves (gate/up) is the same for all of them, summed once here. (A random-
        # weight DeepSeek-V3 layer starves ~35 of 256 experts; one sum each was ~5 s on an H100.)
        self._fallback_rows = [i for i, e in enumerate(self.chunk) if e in fallback]
        self._all_tokens = HessianAccumulator(moe.matrices[0].get().shape[2], device) if self._fallback_rows else None
        self._reads_tokens: set[str] = set()   # matrices whose input is the routed tokens themselves
        self.tokens = torch.zeros(E, dtype=torch.long)
        self.weight_sum = torch.zeros(E, dtype=torch.float64)
        self.weight_sq_sum = torch.zeros(E, dtype=torch.float64)   # routing weights squared, routed tokens only
        self.n_tokens = 0

    def add(self, x: torch.Tensor, top: torch.Tensor, weights: torch.Tensor) -> None:
        """x (T, hidden) real tokens; top (T, k) their experts; weights (T, k) or (T, E)."""
        E = self.moe.num_experts
        if self.keep is not None:
            self.batches.append((x.to(self.keep), top.to(self.keep), weights.to(self.keep)))
        self.n_tokens += x.shape[0]
        if weights.shape[-1] == E and top.shape[-1] != E:   # full router probabilities
            self.weight_sum += weights.float().sum(0).double().cpu()
            routed = weights.gather(-1, top)
        else:                                               # the routing weights of the chosen experts
            self.weight_sum.index_add_(0, top.reshape(-1).cpu(), weights.reshape(-1).double().cpu())
            routed = weights
        self.weight_sq_sum.index_add_(0, top.reshape(-1).cpu(), routed.reshape(-1).double().cpu() ** 2)
        counts = torch.bincount(top.reshape(-1), minlength=E)[:E]
        self.tokens += counts.cpu()
        # the tokens of each expert, contiguous: one sort of the (token, slot) pairs by expert
        order = torch.argsort(top.reshape(-1), stable=True) // top.shape[-1]
        ends = torch.cumsum(counts, 0).tolist()
        if self._all_tokens is not None:
            self._all_tokens.add(x)
        for i, e in enumerate(self.chunk):
            xe = x if e in self.fallback else x[order[ends[e] - int(counts[e]):ends[e]]]
            if xe.shape[0]:
                self._waiting[i].append(xe)
                if sum(t.shape[0] for t in self._waiting[i]) >= ROWS_PER_UPDATE:
                    self._update(i)

    def _update(self, i: int) -> None:
        """The waiting rows of the chunk's i-th expert into its Hessians, in one product each.
        When this happens depends on that expert's own rows only, so its sums (and the
        checkpoint) are the same however the experts are split into chunks or ranks."""
        if self._waiting[i]:
            x = torch.cat(self._waiting[i]) if len(self._waiting[i]) > 1 else self._waiting[i][0]
            self._waiting[i] = []
            fallback = self.chunk[i] in self.fallback
            for name, inp in self.family.expert_inputs(self.moe, self.chunk[i], x).items():
                if fallback and inp is x:   # the all-token sum, shared (see __init__)
                    self._reads_tokens.add(name)
                else:
                    self.accs[name].add(inp, i)

    def close(self) -> "_ExpertStats":
        """Every waiting row into the Hessians: call once the pass is over, before using them."""
        for i in range(len(self.chunk)):
            self._update(i)
        for i in self._fallback_rows:
            for name in self._reads_tokens:
                self.accs[name].sum[i].copy_(self._all_tokens.sum[0])
                self.accs[name].n[i] = self._all_tokens.n[0]
        return self

    def replay(self, chunk: range, fallback: set[int]) -> "_ExpertStats":
        """The same routed batches, Hessians for another chunk of experts (no block run)."""
        stats = _ExpertStats(self.family, self.moe, next(iter(self.accs.values())).sum.device, chunk, fallback)
        for x, top, w in self.batches:
            stats.add(x.to(stats.accs[self.moe.matrices[0].name].sum.device), top.to(x.device), w.to(x.device))
        return stats.close()

    def routing_weight(self) -> list[float]:
        return (self.weight_sum / max(self.n_tokens, 1)).tolist()


def _collect_moe_stats(run: _Run, moe, block, inputs, kwargs, masks, chunk=None, fallback=frozenset(),
                       hessians=None, keep=None):
    """A pass of the block to its MoE recording, per batch, which real tokens go to which
    expert: at the experts module's input, as the model's own router sent them (experts-
    interface families; the experts' own computation is skipped), or by the family's routing
    at the MoE block's input (Switch). ``hessians``: the MLP's other linears (shared experts).
    Several ranks: each keeps its batches' routing, then every rank adds every batch's, in
    global batch order (Hessians of its own experts, token counts of all)."""
    stats = _ExpertStats(run.family, moe, run.device, chunk, fallback, keep)
    current = {}
    routed = []   # several ranks: this rank's (tokens, experts, weights) per batch

    def add(x, top, w):
        if run.ranks.distributed:   # copies: the forward may change its tensors in place afterwards
            routed.append(tuple(t.to(run.act_device, copy=True) for t in (x, top, w)))
        else:
            stats.add(x, top, w)

    before = _pointing(current, masks, *([hessians] if hessians else []))
    if moe.experts is not None:
        def record(hidden_states, top_k_index, top_k_weights, *args, **kw):
            x = hidden_states.reshape(-1, hidden_states.shape[-1])
            top = top_k_index.reshape(x.shape[0], -1)
            w = top_k_weights.reshape(top.shape)
            if "block" in current:
                keep = current["block"].reshape(-1).to(x.device)
                x, top, w = x[keep], top[keep], w[keep]
            add(x, top, w)
            return torch.zeros_like(hidden_states)
        moe.experts.forward = record   # this pass only needs the routing
        try:
            run_block(block, inputs, kwargs, run.device, run.act_device, stop_after=moe.module, before_batch=before)
        finally:
            del moe.experts.forward
    else:
        def hook(module, args):
            x = real_rows(args[0], current.get("block"))
            top, probs = run.family.route(moe, x)
            add(x, top, probs)
        handle = moe.module.register_forward_pre_hook(hook)
        try:
            run_block(block, inputs, kwargs, run.device, run.act_device, stop_at=moe.module, before_batch=before)
        finally:
            handle.remove()
    for x, top, w in run.ranks.in_batch_order(routed) if routed else ():
        stats.add(x, top, w)
    return stats.close()


def expert_chunk_size(moe, cfg: QuantConfig, device: torch.device) -> int:
    """Experts quantized at once: ``cfg.expert_batch``, or (0) as many as the free GPU memory
    holds (their Hessians plus GPTQ's working copies), all on the CPU. A DeepSeek-V3 layer
    (256 experts of 7168 x 2048) does not fit an 80 GB GPU at once."""
    E = moe.num_experts
    if cfg.expert_batch:
        return min(cfg.expert_batch, E)
    if device.type != "cuda":
        return E
    per_expert = sum(2 * m.get().shape[2] ** 2 * 4 + 4 * m.get().shape[1] * m.get().shape[2] * 4
                     for m in moe.matrices)
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, min(E, int(0.6 * free) // per_expert))


def _chunks(experts: range, size: int) -> list[range]:
    return [range(s, min(s + size, experts.stop)) for s in range(experts.start, experts.stop, size)]


def _quantize_feed_forward(run: _Run, block_name, block, inputs, kwargs, masks) -> list[str]:
    """Pass 2: the MoE's experts (each at its own width) and its shared experts, or a dense MLP."""
    cfg, family, report = run.cfg, run.family, run.report
    moe = family.moe(block, block_name)
    mlp = dict(family.mlp_linears(block))
    bits = cfg.shared_bits if moe is not None else cfg.dense_bits
    current = {}
    hessians = run.hessians(mlp, current) if mlp and bits is not None else None
    done = []
    if moe is None:
        if hessians is not None:
            with phase(report, "hessian_mlp", run.device):
                try:
                    run_block(block, inputs, kwargs, run.device, run.act_device,
                              stop_after=family.feed_forward(block)[1], before_batch=_pointing(current, masks, hessians))
                finally:
                    hessians.remove()
                hessians.gather()
            done += _quantize_linears(run, block_name, block, hessians, mlp, bits, "mlp")
        return done
    own = run.ranks.experts(moe.num_experts)
    with phase(report, "hessian_experts", run.device):
        size = run.ranks.agree_min(expert_chunk_size(moe, cfg, run.device))
        if size < len(own):
            run.say(f"  {moe.name}: {moe.num_experts} experts quantized in chunks of {size}")
        # more than one chunk, or several ranks: the routed batches are kept (where the
        # activations live) and replayed for the later chunks, instead of running the block
        # again for each (with several ranks that pass would need all of them)
        try:
            stats = _collect_moe_stats(run, moe, block, inputs, kwargs, masks, _chunks(own, size)[0],
                                       hessians=hessians,
                                       keep=run.act_device if size < len(own) or run.ranks.distributed else None)
        finally:
            if hessians is not None:
                hessians.remove()
        if hessians is not None:
            hessians.gather()
    done += _quantize_experts(run, block, moe, inputs, kwargs, masks, stats, size)
    if hessians is not None:
        done += _quantize_linears(run, block_name, block, hessians, mlp, bits, "mlp")
    return done


def _quantize_experts(run: _Run, block, moe, inputs, kwargs, masks, stats: _ExpertStats, size: int) -> list[str]:
    """Scores, order and bits of one MoE block's experts from the first pass's counts, then
    GPTQ of every expert matrix, ``size`` experts at a time (Hessians of later chunks from the
    routed batches kept, or one more pass). Several ranks: each quantizes its own range of
    experts, one chunk per round, and the round's results go to every rank."""
    cfg, family, report = run.cfg, run.family, run.report
    tokens, E = stats.tokens, moe.num_experts
    starved = {e for e in range(E) if tokens[e] < cfg.min_expert_tokens}
    if starved:
        # Too few routed tokens for a usable Hessian: those experts use all the block's tokens
        # (the paper repo zeroes such an expert instead, destroying it).
        for e in sorted(starved):
            report.starved.append({"layer": moe.name, "expert": e, "tokens": int(tokens[e])})
        run.say(f"  {moe.name}: experts {sorted(starved)} got fewer than {cfg.min_expert_tokens} calibration tokens "
                f"({[int(tokens[e]) for e in sorted(starved)]}); using Hessians from all {stats.n_tokens} tokens")
    ref = (run.router_reference or {}).get(moe.name)
    scores = {
        "router_norm": allocation.router_norm(family.router_weight(moe), ref),
        "max_var": allocation.max_var(family.neuron_input_weights(moe)),
        "tokens": tokens.tolist(),
        "routing_weight": stats.routing_weight(),
    }
    counts = cfg.counts_for(E)
    widths = [b for b, n in counts.items() if n > 0]
    rounds = lambda: _expert_rounds(run, moe, block, inputs, kwargs, masks, stats, starved, size)
    if cfg.order_type not in allocation.COST_ORDERS:
        order = allocation.expert_order(cfg.order_type, scores, cfg.zeta, cfg.seed + len(report.layers))
        bits = allocation.bits_per_expert(order, counts)
    elif len(widths) == 1:   # one width: nothing to choose
        order, bits = list(range(E)), widths * E
    else:
        costs = _predicted_costs(run, moe, rounds(), stats, widths, scores) if cfg.order_type == "sensitivity" \
            else _measured_costs(cfg.sensitivity_file, moe.name, widths, E)
        scores["cost"] = {str(b): costs[b] for b in widths}
        bits = allocation.assign_levels(costs, counts, maximize=cfg.order_type == "anti_oracle")
        order = allocation.order_from_bits(bits, costs)
    report.layers.append({"name": moe.name, "expert_order": order, "bits": bits, "scores": scores,
                          "router_score": "norm_change" if ref is not None else "norm"})
    results = {mat.name: {"seconds": 0.0, "loss": {}, "shape": tuple(mat.get().shape[1:])} for mat in moe.matrices}
    for chunks, chunk_stats in rounds():
        _gptq_round(run, moe, chunks, bits, chunk_stats, results)
    done = []
    for mat in moe.matrices:
        name = f"{moe.experts_path or moe.name + '.experts'}.{mat.name}"
        done += [name] if mat.linears is None else [f"{lin}.weight" for lin in mat.linears]
        r = results[mat.name]
        _log(run, name, bits, tokens, torch.cat([r["loss"][s] for s in sorted(r["loss"])]), r["seconds"])
    shapes = [results[mat.name]["shape"] for mat in moe.matrices]
    weights = sum(r * c for r, c in shapes)
    report.layers[-1].update(weights_per_expert=weights, stored_bits=[
        sum(format.stored_bits(r, c, b, cfg.groupsize) for r, c in shapes) / weights for b in bits])
    return done


def _expert_rounds(run: _Run, moe, block, inputs, kwargs, masks, first: _ExpertStats, starved: set[int],
                   size: int):
    """Yields per round the chunks of every rank (by rank; None: no chunk this round) and the
    stats holding this rank's chunk's Hessians: the first pass holds the first chunk's; later
    chunks (and starved experts, whose Hessians take all tokens) replay the first pass's routed
    batches or run the block again (one process only: several ranks always keep the batches)."""
    plan = [_chunks(run.ranks.experts(moe.num_experts, r), size) for r in range(run.ranks.size)]   # per rank
    for j in range(max(len(chunks) for chunks in plan)):
        chunks = [c[j] if j < len(c) else None for c in plan]
        mine, stats = chunks[run.ranks.rank], first
        if mine is not None and (j > 0 or starved & set(mine)):
            with phase(run.report, "hessian_experts", run.device):
                stats = first.replay(mine, starved & set(mine)) if first.batches else \
                    _collect_moe_stats(run, moe, block, inputs, kwargs, masks, mine, starved & set(mine))
        yield chunks, stats


def _predicted_costs(run: _Run, moe, rounds, stats: _ExpertStats, widths: list[int], scores: dict
                     ) -> dict[int, list[float]]:
    """The sensitivity order's costs (allocation.predicted_cost): GPTQ of every expert at each
    width, keeping only its relative output error (nothing is written to the model). Each rank
    measures its own experts; the values then go to every rank (all must choose the same bits)."""
    E = moe.num_experts
    rel = torch.zeros(len(widths), E, dtype=torch.float64)
    energy = torch.zeros(E, dtype=torch.float64)
    failed = None
    for chunks, chunk_stats in rounds:
        mine = chunks[run.ranks.rank]
        for mat in moe.matrices if mine is not None and failed is None else ():
            W = mat.get()[mine.start:mine.stop].float()
            H = chunk_stats.accs[mat.name].hessian()
            with phase(run.report, "gptq_sensitivity", run.device):
                try:
                    _check_inputs(H, f"{moe.experts_path or moe.name + '.experts'}.{mat.name}")
                    for i, b in enumerate(widths):
                        rel[i, mine.start:mine.stop] += _gptq_experts(W, H, [b] * len(mine), run.cfg)["loss"].cpu()
                except BadWeights as e:
                    failed = e
            if mat is moe.matrices[-1]:   # the expert's output: E||y||^2 = tr(W H W^T) on its tokens
                energy[mine.start:mine.stop] = ((W @ H) * W).sum(dim=(-1, -2)).cpu()
    for src in range(run.ranks.size):
        own = run.ranks.experts(E, src)
        payload = (failed or {"rel": rel[:, own.start:own.stop].contiguous(), "energy": energy[own.start:own.stop]}) \
            if src == run.ranks.rank else None
        got = run.ranks.share(payload, src)
        rel[:, own.start:own.stop], energy[own.start:own.stop] = got["rel"].cpu(), got["energy"].cpu()
    rel_by_width = {b: rel[i].tolist() for i, b in enumerate(widths)}
    weight_sq = (stats.weight_sq_sum / max(stats.n_tokens, 1)).tolist()
    scores.update(gptq_error={str(b): v for b, v in rel_by_width.items()}, output_energy=energy.tolist(),
                  routing_weight_sq=weight_sq)
    return allocation.predicted_cost(rel_by_width, weight_sq, energy.tolist())


def _measured_costs(path: str, layer: str, widths: list[int], num_experts: int) -> dict[int, list[float]]:
    """oracle / anti_oracle: the loss increase measured with only that expert quantized
    (``d_loss`` in expert_sensitivity.py's file), per width."""
    import json
    with open(path) as f:
        experts = [x for x in json.load(f)["experts"] if x["layer"] == layer]
    if sorted(x["expert"] for x in experts) != list(range(num_experts)):
        raise ConfigError(f"--sensitivity_file {path} has no measurement for every expert of {layer}: "
                          f"measure this model with expert_sensitivity.py")
    experts.sort(key=lambda x: x["expert"])
    return {b: [x["by_width"][str(b)]["d_loss"] for x in experts] for b in widths}


def _gptq_round(run: _Run, moe, chunks: list[range | None], bits: list[int], stats: _ExpertStats,
                results: dict) -> None:
    """GPTQ of this rank's chunk of experts (Hessians in ``stats``), each at its own width;
    then every rank's chunk of the round (``chunks``, by rank) into the model and the sink."""
    cfg, report = run.cfg, run.report
    mine = chunks[run.ranks.rank]
    for mat in moe.matrices:
        name = f"{moe.experts_path or moe.name + '.experts'}.{mat.name}"
        t0 = time.time()
        res = None
        if mine is not None:
            W = mat.get()[mine.start:mine.stop].float()
            with phase(report, "gptq_experts", run.device):
                H = stats.accs[mat.name].hessian()
                try:
                    _check_inputs(H, name)
                    res = _gptq_experts(W, H, bits[mine.start:mine.stop], cfg)
                except BadWeights as e:
                    res = e
            if run.on_experts is not None and isinstance(res, dict):
                with phase(report, "callback", run.device):  # not quantization work: kept out of the other phases
                    run.on_experts(name, W, H, bits[mine.start:mine.stop], res, mine.start)
            del H
        for src, chunk in enumerate(chunks):
            if chunk is None:
                continue
            got = _share(run, res if src == run.ranks.rank else None, src)
            chunk_bits = bits[chunk.start:chunk.stop]
            _check_scales(got["scale"], mat.get()[chunk.start:chunk.stop], name, chunk_bits)
            mat.set(got["weight"], chunk.start)
            if run.sink is not None:
                with phase(report, "pack", run.device):
                    if mat.linears is None:  # fused experts: one entry, bits per expert
                        run.sink.add_experts(name, got["codes"], got["scale"], got["zero"], chunk_bits, chunk.start,
                                             bits)
                    else:  # separate expert linears (Switch): each its own quantized linear
                        for i, e in enumerate(chunk):
                            run.sink.add_linear(mat.linears[e], got["codes"][i], got["scale"][i], got["zero"][i],
                                                bits[e])
            results[mat.name]["loss"][chunk.start] = got["loss"].cpu()
        results[mat.name]["seconds"] += time.time() - t0


@torch.no_grad()
def quantize_model(model, family, windows, cfg: QuantConfig, device, act_device=None,
                   loader: BlockLoader | None = None, sink=None, *, router_reference: dict | None = None,
                   on_experts: Callable | None = None, log: Log | None = None,
                   ranks: Ranks | None = None, fp_outputs: bool = False) -> QuantReport:
    """Quantizes ``model`` block by block: weights are replaced by their dequantized values
    (or released when ``loader`` streams and does not keep blocks); packed and unquantized
    tensors go to ``sink`` (a quant.format.PackedWriter) as they are made. ``ranks``: the
    processes sharing the work (utils/distributed.py; each calls this with its own, the
    sink on rank 0 only); rank 0 logs.

    ``fp_outputs``: every block gets its unquantized weights back once quantized, and hands
    on the outputs of those, so each block is calibrated on the unquantized model's inputs
    and the model ends unchanged (what was quantized reaches the caller through
    ``on_experts``): expert_sensitivity.py quantizes one expert at a time this way."""
    act_device = act_device or device
    ranks = ranks or Ranks()
    run = _Run(family, cfg, QuantReport(), torch.device(device), torch.device(act_device), sink,
               log if ranks.main else None, router_reference, on_experts, ranks, fp_outputs)
    num_batches = len(range(0, family.num_windows(windows), cfg.batch_size))
    ranks.check_split([moe.num_experts for name, block in family.blocks(model)
                       if (moe := family.moe(block, name)) is not None], num_batches, cfg.batch_size)
    loader = loader or BlockLoader(family, device)
    run.say(TABLE_HEADER)
    inputs = None
    for stage, blocks in enumerate(family.stages(model)):   # decoder-only: one stage; T5: encoder, decoder
        batches = ranks.batches(num_batches)
        with phase(run.report, "capture", device):
            inputs, kwargs = capture_block_inputs(model, family, windows, cfg.batch_size, device, act_device,
                                                  stage, inputs, batches)
        masks = batch_masks(family, windows, cfg.batch_size, stage)
        masks = [masks[b] for b in batches]
        for block_name, block in tqdm(blocks, desc=f"quantizing blocks (stage {stage})",
                                      disable=None if ranks.main else True):
            inputs = _quantize_block(run, loader, block_name, block, inputs, kwargs, masks)
    if sink is not None:
        _write_rest(model, family, sink)
    return run.report


def _quantize_block(run: _Run, loader, block_name, block, inputs, kwargs, masks):
    with phase(run.report, "load", run.device):
        ctx = loader.block(block_name, block)
        ctx.__enter__()
    unquantized = {k: v.clone() for k, v in block.state_dict().items()} if run.fp_outputs else None
    quantized = _quantize_attention(run, block_name, block, inputs, kwargs, masks)
    quantized += _quantize_feed_forward(run, block_name, block, inputs, kwargs, masks)
    if unquantized is not None:
        block.load_state_dict(unquantized)
    with phase(run.report, "output", run.device):
        outputs = run_block(block, inputs, kwargs, run.device, run.act_device, family=run.family)
    if run.sink is not None:  # the block's unquantized tensors (norms, routers, biases)
        done = set(quantized)
        for name, t in block.state_dict().items():
            if f"{block_name}.{name}" not in done:
                run.sink.add_tensor(f"{block_name}.{name}", t)
    with phase(run.report, "load", run.device):
        ctx.__exit__(None, None, None)
    return outputs


def _write_rest(model, family, sink) -> None:
    """Every tensor outside the blocks (embeddings, final norm, head), tied copies once."""
    prefixes = tuple(f"{name}." for name, _ in family.blocks(model))
    seen = set()
    for name, t in model.state_dict().items():
        if name.startswith(prefixes) or t.device.type == "meta":
            continue
        key = (t.data_ptr(), tuple(t.shape))
        if t.numel() and key in seen:
            continue  # tied weight (e.g. lm_head = embed_tokens): transformers re-ties on load
        seen.add(key)
        sink.add_tensor(name, t)

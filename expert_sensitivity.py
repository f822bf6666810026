#!/usr/bin/env python
"""Per-expert sensitivity, measured: for every MoE layer and expert of a model, that expert
alone is quantized (GPTQ at each of --widths; every other weight unquantized) and the model
is scored on held-out data. Then the pre-registered analysis (utils/sensitivity.py).

    python expert_sensitivity.py --model runs/mixtral-cpu-s{0,1,2}/trained \\
        --router_reference runs/mixtral-cpu-s{0,1,2}/init --dataset ../shared/data/python-docs \\
        --out results/sensitivity-cpu/mixtral
    python expert_sensitivity.py --task seq2seq --model runs/switch-cpu-s{0,1}/finetuned \\
        --router_reference runs/switch-cpu-s{0,1}/pretrained --dataset runs/switch-cpu-s0/pairs --out ...

Quantization is the pipeline's (utils/pipeline.py, ``fp_outputs``): each block calibrated on
the unquantized model's inputs, every expert's Hessian from the tokens its router sends it
(random windows of the train split, --nsamples x --seqlen, seed 0, as reproduce_tables.py).

Held-out data, never calibrated on: causal, the first --eval_windows windows of --seqlen
tokens of the dataset's valid.txt (else its test split); seq2seq, the last --eval_samples
pairs of the test split (reproduce_tables.py evaluates the first ones). Per expert and width,
differences from the unquantized model:

- ``d_loss``: mean token loss (causal: next-token loss; seq2seq: teacher-forced target loss);
- ``d_acc``: top-1 accuracy of the same predictions;
- ``d_loss_routed``: mean loss change at the positions the expert is routed (causal: the
  position whose next token is predicted; seq2seq: decoder experts only);
- ``damage_per_routed_token``: the loss change summed over all held-out tokens, divided by
  the expert's routed held-out tokens (what each routed token costs, wherever the damage lands);
- ``d_loss_rare``: mean loss change on rare target tokens: those whose count in the train
  split (seq2seq: the train targets) is below the median count of the held-out targets;
- seq2seq: ``d_exact_match``, exact match of greedy generations with the targets.

With every expert: ``router_norm`` (trained), ``router_norm_change`` (minus the
--router_reference's), ``tokens`` (calibration tokens routed), ``routed`` (held-out), the mean
``routing_weight``, ``max_var`` and ``gptq_error`` (relative output error per width, summed
over its matrices).

Output in --out: ``sensitivity-<name>.json`` per model (resumable: a model with its file is
not measured again), ``analysis.json``, ``analysis.md`` and ``sensitivity_vs_router_change.png``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

from moeq.config import ConfigError, QuantConfig


def model_name(path: str) -> str:
    """runs/mixtral-cpu-s0/trained -> mixtral-cpu-s0 (the run folder names the model)."""
    path = os.path.abspath(path.rstrip("/"))
    base = os.path.basename(path)
    return os.path.basename(os.path.dirname(path)) if base in ("trained", "finetuned") else base


def experts_name(moe, mat) -> str:
    """The name the pipeline's on_experts gives a stack of expert matrices."""
    return f"{moe.experts_path or moe.name + '.experts'}.{mat.name}"


# ---- quantized candidates --------------------------------------------------------------

def quantized_experts(model, family, calib, widths: list[int], a) -> tuple[dict, object]:
    """Every expert of every MoE layer GPTQ-quantized at each of ``widths`` (attention, shared
    experts and dense MLPs untouched), each block calibrated on the unquantized model's inputs;
    the model is left unchanged. Those inputs, and so the Hessians, do not depend on the width:
    one pipeline pass collects them (and quantizes at the first width), GPTQ at the other
    widths runs on the very same stacks and Hessians. Returns ({bits: ({experts name: (E, R, C)
    dequantized weights}, {experts name: (E,) relative output errors})}, the pipeline's report)."""
    from moeq.utils.pipeline import _check_scales, _gptq_experts, quantize_model
    cfg = QuantConfig(mixed_type="uniform", avg_bits=widths[0], attn_bits=None, shared_bits=None, dense_bits=None,
                      groupsize=a.groupsize, grid=a.quant_grid, batch_size=a.batch_size,
                      min_expert_tokens=a.min_expert_tokens)
    parts = {b: ({}, {}) for b in widths}   # bits -> (weights, errors), each name -> [(first expert, tensor)]

    def keep(name, W, H, chunk_bits, res, first):
        n = W.shape[0]
        for b in widths:
            if b != widths[0]:
                res = _gptq_experts(W, H, [b] * n, cfg)
                _check_scales(res["scale"], W, name, [b] * n)
            weights, errors = parts[b]
            weights.setdefault(name, []).append((first, res["weight"].cpu()))
            errors.setdefault(name, []).append((first, res["loss"].cpu()[:n]))

    report = quantize_model(model, family, calib, cfg, torch.device(a.device), on_experts=keep, fp_outputs=True)
    stack = lambda parts: torch.cat([t for _, t in sorted(parts, key=lambda p: p[0])])
    return {b: ({k: stack(v) for k, v in weights.items()}, {k: stack(v) for k, v in errors.items()})
            for b, (weights, errors) in parts.items()}, report


# ---- held-out scores --------------------------------------------------------------------

def routing_recorder(family, moe, sink: list):
    """A hook appending each forward's top experts per token, (tokens, k), as the model routes
    (experts-interface families: what the router hands the experts; Switch: top-1 of its router)."""
    if moe.experts is not None:
        def hook(module, args, kwargs):
            top = kwargs["top_k_index"] if "top_k_index" in kwargs else args[1]
            sink.append(top.reshape(-1, top.shape[-1]).cpu())
        return moe.experts.register_forward_pre_hook(hook, with_kwargs=True)

    def hook(module, args):
        x = args[0]
        sink.append(family.route(moe, x.reshape(-1, x.shape[-1]))[0].cpu())
    return moe.module.register_forward_pre_hook(hook)


def routed_mask(tops: list[torch.Tensor], shape: tuple, num_experts: int) -> torch.Tensor:
    """(E, *shape) bool: token routed to expert e, from the per-batch (tokens, k) records."""
    top = torch.cat(tops)
    if top.shape[0] != math.prod(shape):
        raise RuntimeError(f"recorded routing for {top.shape[0]} tokens, expected {math.prod(shape)}")
    top = top.reshape(*shape, -1)
    return torch.stack([(top == e).any(-1) for e in range(num_experts)])


def rare_mask(targets: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Target tokens whose train count is below the median count of the held-out targets."""
    freq = counts[targets.clamp(min=0)].float()
    valid = targets >= 0
    return valid & (freq < freq[valid].median())


class CausalHeldOut:
    """Next-token scores on fixed windows, run from a given block on: every block's inputs of
    the unquantized model are kept, so an expert of block l costs blocks l.. only."""

    def __init__(self, model, family, windows, train_counts, a):
        from moeq.utils.sequential import capture_block_inputs, run_block
        self.model, self.family, self.windows, self.a = model, family, windows, a
        self.device = torch.device(a.device)
        self.blocks = family.blocks(model)
        inputs, self.kwargs = capture_block_inputs(model, family, windows, a.batch_size, self.device, self.device)
        moes = [moe for n, b in self.blocks if (moe := family.moe(b, n)) is not None]
        tops = {moe.name: [] for moe in moes}
        hooks = [routing_recorder(family, moe, tops[moe.name]) for moe in moes]
        self.block_inputs = []
        try:
            for name, block in self.blocks:
                self.block_inputs.append(inputs)
                inputs = run_block(block, inputs, self.kwargs, self.device, self.device, family=family)
        finally:
            for h in hooks:
                h.remove()
        self.targets = windows[:, 1:]
        # the position that predicts token t+1 is the routed one: each window's last position predicts nothing
        self.routed = {moe.name: routed_mask(tops[moe.name], tuple(windows.shape), moe.num_experts)[:, :, :-1]
                       for moe in moes}
        self.rare = rare_mask(self.targets, train_counts)
        self.base = self.token_scores(0)

    def token_scores(self, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(nll, correct), each (windows, seqlen - 1), running blocks ``start``.. on."""
        from moeq.utils.sequential import run_block
        h = self.block_inputs[start]
        for name, block in self.blocks[start:]:
            h = run_block(block, h, self.kwargs, self.device, self.device, family=self.family)
        nll, correct = [], []
        for i, x in enumerate(h):
            logits = self.family.head(self.model, x.to(self.device)).float()[:, :-1]
            tgt = self.targets[i * self.a.batch_size:(i + 1) * self.a.batch_size].to(self.device)
            nll.append(F.cross_entropy(logits.transpose(1, 2), tgt, reduction="none").cpu())
            correct.append((logits.argmax(-1) == tgt).cpu())
        return torch.cat(nll).double(), torch.cat(correct)

    def summary(self, scores) -> dict:
        nll, correct = scores
        return {"loss": float(nll.mean()), "acc": float(correct.float().mean()),
                "loss_rare": float(nll[self.rare].mean()), "tokens": int(nll.numel()),
                "rare_tokens": int(self.rare.sum())}

    def deltas(self, scores, layer: str, expert: int) -> dict:
        (nll, correct), (nll0, correct0) = scores, self.base
        d, routed = nll - nll0, self.routed[layer][expert]
        n = int(routed.sum())
        return {"d_loss": float(d.mean()), "d_acc": float(correct.float().mean() - correct0.float().mean()),
                "d_loss_routed": float(d[routed].mean()) if n else None,
                "damage_per_routed_token": float(d.sum() / n) if n else None,
                "d_loss_rare": float(d[self.rare].mean()), "routed": n}


class PairsHeldOut:
    """Teacher-forced target scores and greedy generations on fixed (source, target) pairs
    (the whole model runs for every score: an encoder expert reaches the decoder through
    cross-attention)."""

    def __init__(self, model, family, tokenizer, pairs, train_counts, a):
        from moeq.utils.data import _padded
        self.model, self.tok, self.a, self.device = model, tokenizer, a, torch.device(a.device)
        if self.device.type == "cuda":   # Switch experts without a host sync per expert (the same math)
            from moeq.utils.switch_experts import batched_switch_experts
            batched_switch_experts(model)
        eos = tokenizer.eos_token_id
        src = [tokenizer(s, add_special_tokens=False, truncation=True, max_length=a.src_len)["input_ids"] or [eos]
               for s, _ in pairs]
        # targets as the testbed trains them: the title's tokens, then </s>
        tgt = [tokenizer(t, add_special_tokens=False, truncation=True, max_length=a.tgt_len - 1)["input_ids"] + [eos]
               for _, t in pairs]
        self.src, self.src_mask = _padded(src, tokenizer.pad_token_id)
        labels, self.tgt_mask = _padded(tgt, 0)
        self.labels = labels.masked_fill(~self.tgt_mask, -100)
        self.texts = [tokenizer.decode(t[:-1], skip_special_tokens=True).strip() for t in tgt]
        moes = [(n, moe) for n, b in family.blocks(model) if (moe := family.moe(b, n)) is not None]
        tops = {moe.name: [] for _, moe in moes}
        hooks = [routing_recorder(family, moe, tops[moe.name]) for _, moe in moes]
        try:
            self.teacher_forced()   # routing as the model reads the pairs (generation routes other positions)
        finally:
            for h in hooks:
                h.remove()
        self.base = self.token_scores()
        self.routed = {}
        for n, moe in moes:   # encoder experts are routed source tokens, decoder experts target positions
            mask = self.src_mask if n.startswith("encoder.") else self.tgt_mask
            self.routed[moe.name] = routed_mask(tops[moe.name], tuple(mask.shape), moe.num_experts) & mask
        self.decoder = {moe.name: not n.startswith("encoder.") for n, moe in moes}
        self.rare = rare_mask(self.labels, train_counts)

    def _batches(self):
        bs = self.a.batch_size
        for i in range(0, self.src.shape[0], bs):
            yield (t[i:i + bs].to(self.device) for t in (self.src, self.src_mask, self.labels))

    def teacher_forced(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(nll, correct) at every target position of every pair (0 / False at padding)."""
        nll, correct = [], []
        for src, mask, labels in self._batches():
            logits = self.model(input_ids=src, attention_mask=mask.long(), labels=labels).logits.float()
            nll.append(F.cross_entropy(logits.transpose(1, 2), labels, reduction="none", ignore_index=-100).cpu())
            correct.append((logits.argmax(-1) == labels).cpu())
        return torch.cat(nll).double(), torch.cat(correct)

    def exact_match(self) -> torch.Tensor:
        """Per pair: the greedy generation equals the target title."""
        generated = []
        for src, mask, _ in self._batches():
            gen = self.model.generate(input_ids=src, attention_mask=mask.long(), max_new_tokens=self.a.tgt_len,
                                      do_sample=False, num_beams=1)
            generated += [self.tok.decode(g, skip_special_tokens=True).strip() for g in gen]
        return torch.tensor([g == t for g, t in zip(generated, self.texts)])

    def token_scores(self, start: int = 0):
        """(nll, correct, exact): the whole model runs whatever expert changed."""
        return (*self.teacher_forced(), self.exact_match())

    def summary(self, scores) -> dict:
        nll, correct, exact = scores
        m = self.tgt_mask
        return {"loss": float(nll[m].mean()), "acc": float(correct[m].float().mean()),
                "loss_rare": float(nll[self.rare].mean()), "exact_match": float(exact.float().mean()),
                "tokens": int(m.sum()), "rare_tokens": int(self.rare.sum()), "pairs": int(m.shape[0])}

    def deltas(self, scores, layer: str, expert: int) -> dict:
        (nll, correct, exact), (nll0, correct0, exact0) = scores, self.base
        m, routed = self.tgt_mask, self.routed[layer][expert]
        d = (nll - nll0)[m]
        n = int(routed.sum())
        out = {"d_loss": float(d.mean()), "d_acc": float(correct[m].float().mean() - correct0[m].float().mean()),
               "d_loss_routed": float((nll - nll0)[routed].mean()) if n and self.decoder[layer] else None,
               "damage_per_routed_token": float(d.sum() / n) if n else None,
               "d_loss_rare": float((nll - nll0)[self.rare].mean()), "routed": n,
               "d_exact_match": float(exact.float().mean() - exact0.float().mean())}
        return out


# ---- one model ---------------------------------------------------------------------------

def heldout_data(tokenizer, a):
    """(calibration, held-out, train token counts): the same calibration sample as the
    pipeline's (utils/tasks.py), held-out data it never sees."""
    from moeq.utils import data as text_data
    vocab = len(tokenizer)
    if a.task == "causal":
        text = text_data.load_text(a.dataset)
        ids = text_data.tokenize(tokenizer, text.train)
        calib = text_data.calibration_windows(ids, a.nsamples, a.seqlen, a.calib_seed)
        valid = os.path.join(a.dataset, "valid.txt")
        held = text_data._read(valid) if os.path.isfile(valid) else text.test
        windows = text_data.eval_windows(text_data.tokenize(tokenizer, held), a.seqlen)[: a.eval_windows or None]
        source = valid if os.path.isfile(valid) else f"test split of {a.dataset}"
        return calib, windows, torch.bincount(ids, minlength=vocab), f"{windows.shape[0]} windows of {source}"
    pairs = text_data.load_pairs(a.dataset)
    calib = text_data.pair_windows(tokenizer, pairs.train, a.nsamples, a.src_len, a.tgt_len, a.calib_seed)
    targets = torch.tensor([i for _, t in pairs.train for i in tokenizer(t, add_special_tokens=False)["input_ids"]])
    held = pairs.test[-a.eval_samples:]
    return calib, held, torch.bincount(targets, minlength=vocab), f"last {len(held)} test pairs of {pairs.source}"


def swap_in(moe, expert: int, weights: dict) -> list:
    """Writes ``expert``'s quantized matrices into the model; returns what to write back."""
    old = []
    for mat in moe.matrices:
        old.append(mat.get()[expert].clone())
        mat.set(weights[experts_name(moe, mat)][expert][None], expert)
    return old


def measure(path: str, reference: str | None, a) -> dict:
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    from moeq.quant import allocation
    from moeq.utils.families import family_for
    from moeq.utils.loading import router_reference_weights
    from moeq.utils.timing import Stages
    stages = Stages()
    with stages("data"):
        cls = AutoModelForCausalLM if a.task == "causal" else AutoModelForSeq2SeqLM
        model = cls.from_pretrained(path, dtype=torch.float32).eval().to(a.device)
        tokenizer = AutoTokenizer.from_pretrained(path)
        family = family_for(model)
        calib, held, counts, held_info = heldout_data(tokenizer, a)
        ref = router_reference_weights(reference, model, family) if reference else {}
    with stages("quantize"):
        candidates, report = quantized_experts(model, family, calib, a.widths, a)
    for phase_name, seconds in report.timings.items():   # callback: GPTQ at the other widths
        print(f"stage quantize {phase_name}: {seconds:.1f} s")
    with stages("score"):
        t0 = time.time()
        scorer = CausalHeldOut(model, family, held, counts, a) if a.task == "causal" else \
            PairsHeldOut(model, family, tokenizer, held, counts, a)
        print(f"  held-out data scored unquantized ({time.time() - t0:.1f} s)", flush=True)
        experts = []
        for index, (name, block) in enumerate(family.blocks(model)):
            moe = family.moe(block, name)
            if moe is None:
                continue
            scores = dict(next(x for x in report.layers if x["name"] == moe.name)["scores"])
            scores["router_norm"] = allocation.router_norm(family.router_weight(moe))
            scores["router_norm_change"] = allocation.router_norm(family.router_weight(moe), ref[moe.name]) \
                if moe.name in ref else None
            experts += [expert_record(moe, index, e, scores, candidates, scorer, a) for e in range(moe.num_experts)]
            print(f"  {moe.name}: {moe.num_experts} experts x {len(a.widths)} widths scored "
                  f"({time.time() - t0:.0f}s)", flush=True)
    from moeq.utils.tables import device_name
    return {"model": path, "name": model_name(path), "router_reference": reference, "task": a.task,
            "widths": a.widths, "base": scorer.summary(scorer.base), "heldout": held_info,
            "calibration": {"dataset": a.dataset, "nsamples": a.nsamples, "seed": a.calib_seed,
                            **({"seqlen": a.seqlen} if a.task == "causal" else
                               {"src_len": a.src_len, "tgt_len": a.tgt_len})},
            "quantization": {"groupsize": a.groupsize, "grid": a.quant_grid, "method": "gptq",
                             "everything else": "unquantized"},
            "device": device_name(a.device), "threads": torch.get_num_threads(), "seconds": stages.seconds,
            "experts": experts}


def expert_record(moe, index: int, e: int, scores: dict, candidates: dict, scorer, a) -> dict:
    """Expert ``e`` of ``moe`` (block ``index``): its scores (the layer's, by expert), and per
    width the held-out deltas with only it quantized (written into the model, scored, written
    back)."""
    change = scores["router_norm_change"]
    rec = {"layer": moe.name, "block": index, "expert": e, "router_norm": scores["router_norm"][e],
           "router_norm_change": change[e] if change else None, "tokens": scores["tokens"][e],
           "routing_weight": scores["routing_weight"][e], "max_var": scores["max_var"][e],
           "gptq_error": {}, "by_width": {}}
    for b in a.widths:
        weights, errors = candidates[b]
        rec["gptq_error"][str(b)] = sum(float(errors[experts_name(moe, m)][e]) for m in moe.matrices)
        old = swap_in(moe, e, weights)
        try:
            rec["by_width"][str(b)] = scorer.deltas(scorer.token_scores(index), moe.name, e)
        finally:
            for mat, w in zip(moe.matrices, old):
                mat.set(w[None], e)
    rec["routed"] = rec["by_width"][str(a.widths[0])].pop("routed")
    for b in a.widths[1:]:
        rec["by_width"][str(b)].pop("routed")
    return rec


# ---- command line ------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", nargs="+", required=True, help="checkpoints (e.g. training seeds of one regime)")
    ap.add_argument("--router_reference", nargs="*", default=None, help="each model's checkpoint before training / "
                    "fine-tuning (same order): router-norm change")
    ap.add_argument("--task", choices=["causal", "seq2seq"], default="causal")
    ap.add_argument("--dataset", required=True, help="causal: text directory (train.txt, valid.txt, test.txt); "
                    "seq2seq: directory with train.jsonl / test.jsonl")
    ap.add_argument("--out", required=True, help="results directory")
    ap.add_argument("--widths", type=int, nargs="+", default=[1, 2, 3], help="bits each expert is measured at")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--src_len", type=int, default=256)
    ap.add_argument("--tgt_len", type=int, default=32)
    ap.add_argument("--calib_seed", type=int, default=0)
    ap.add_argument("--eval_windows", type=int, default=64, help="causal: held-out windows (0: all)")
    ap.add_argument("--eval_samples", type=int, default=128, help="seq2seq: held-out pairs (the last of the test split)")
    ap.add_argument("--groupsize", type=int, default=128)
    ap.add_argument("--quant_grid", default="search", choices=["search", "minmax"])
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--min_expert_tokens", type=int, default=16)
    ap.add_argument("--primary_width", type=int, default=2, help="the width of the pre-registered tests")
    ap.add_argument("--title", default=None, help="the regime's name in the analysis (default: --out's name)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--report_only", action="store_true", help="only the analysis, from the files in --out")
    a = ap.parse_args(argv)
    try:
        return _main(a, "python expert_sensitivity.py " + " ".join(sys.argv[1:] if argv is None else argv))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _main(a, command: str) -> int:
    from moeq.quant.format import write_json
    from moeq.utils import sensitivity
    refs = a.router_reference or [None] * len(a.model)
    if len(refs) != len(a.model):
        raise ConfigError(f"--router_reference got {len(refs)} paths for {len(a.model)} models: one per model")
    if a.primary_width not in a.widths:
        raise ConfigError(f"--primary_width {a.primary_width} is not among --widths {a.widths}")
    if a.task == "seq2seq" and a.tgt_len < 2:
        raise ConfigError("--tgt_len must be at least 2 (title tokens + </s>)")
    os.makedirs(a.out, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = False   # loss changes of one expert at 3 bits are small
    files = []
    for path, ref in zip(a.model, refs):
        out = os.path.join(a.out, f"sensitivity-{model_name(path)}.json")
        if not os.path.isfile(out):
            if a.report_only:
                raise ConfigError(f"--report_only: {out} is missing")
            print(f"measuring {path} -> {out}", flush=True)
            with torch.no_grad():
                result = measure(path, ref, a)
            result["command"] = command
            write_json(result, out)
        with open(out) as f:
            files.append(json.load(f))
    title = a.title or os.path.basename(os.path.abspath(a.out))
    result = sensitivity.analyse(files, a.primary_width)
    result["command"] = command
    write_json(result, os.path.join(a.out, "analysis.json"))
    md = sensitivity.markdown(result, title, command)
    with open(os.path.join(a.out, "analysis.md"), "w") as f:
        f.write(md)
    sensitivity.plot(files, result, os.path.join(a.out, "sensitivity_vs_router_change.png"), title)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

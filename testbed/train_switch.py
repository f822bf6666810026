#!/usr/bin/env python
"""Train a small Switch Transformer pair (pretrained -> fine-tuned) for quantize_switch.py.

Phase 1 pretrains with T5 span corruption on random windows of the text; phase 2
fine-tunes on a seq2seq task cut from the same reStructuredText: a section's body ->
its title. The router rows move between the two checkpoints, which is the quantity
quantize_switch.py ranks experts by (--reference_model).

    python testbed/train_switch.py --data ../shared/data/python-docs --out runs/switch-s0 --seed 0 --preset cpu

writes OUT/init (random init), OUT/pretrained, OUT/finetuned (transformers checkpoints
with the tokenizer), OUT/pairs/{train,test}.jsonl, OUT/loss_curve.json, OUT/train_info.json.
Then, e.g.:

    python quantize_switch.py --model OUT/finetuned --reference_model OUT/pretrained --dataset OUT/pairs \\
      --avg_bits 2.5 --high_bit_level 3 --low_bit_level 2 --groupsize 32 --src_len 128 --tgt_len 8 --eval --eval_fp

(titles are short: calibration takes only pairs with at least --tgt_len target tokens, and
--eval scores titles cut to --tgt_len tokens; 8 keeps about half of the ~4000 train pairs.)
"""
from __future__ import annotations

import argparse
import json
import os
import string
import sys
import time
from types import SimpleNamespace

import torch

from moeq.testbed.common import (device_name, make_tokenizer, random_windows, save_model, seed_everything, train,
                                 write_json)
from moeq.utils.switch_experts import batched_switch_experts
from moeq.utils.timing import Stages

NUM_SENTINELS = 32  # T5's <extra_id_i>: one per corrupted span, so at most this many spans per window
NUM_EXPERTS = 8
AUX_COEF, Z_COEF = 0.01, 0.001  # load balancing (Switch paper) and router z-loss (ST-MoE), per MoE layer

# Sizes and schedules. cpu: ~3-6 min on 2 CPU cores; gpu: a few minutes on one H100. A GPU step
# of this model costs its launches more than its arithmetic (benchmarks/probe_switch_train.py),
# so the gpu preset takes its tokens in fewer, larger batches: 600 x 128 windows, then 300 x 64
# pairs (stop 22 trained 1200 x 64 and 600 x 32: 346 s for two models side by side).
PRESETS = {
    "smoke": dict(d_model=32, d_ff=64, d_kv=8, heads=4, layers=2, vocab=512, tok_bytes=200_000, train_bytes=400_000,
                  train_pairs=512, pretrain_steps=30, pretrain_lr=3e-3, pretrain_batch=8, pretrain_len=64,
                  finetune_steps=10, finetune_lr=1e-3, finetune_batch=8, src_len=64, tgt_len=16,
                  val_windows=8, val_pairs=16, log_every=5, eval_every=0),
    "cpu": dict(d_model=128, d_ff=256, d_kv=32, heads=4, layers=4, vocab=2048, tok_bytes=2_000_000, train_bytes=0,
                train_pairs=0, pretrain_steps=400, pretrain_lr=3e-3, pretrain_batch=16, pretrain_len=128,
                finetune_steps=400, finetune_lr=2e-3, finetune_batch=16, src_len=160, tgt_len=24,
                val_windows=64, val_pairs=128, log_every=25, eval_every=100),
    "gpu": dict(d_model=384, d_ff=1536, d_kv=64, heads=6, layers=6, vocab=8192, tok_bytes=4_000_000, train_bytes=0,
                train_pairs=0, pretrain_steps=600, pretrain_lr=1.5e-3, pretrain_batch=128, pretrain_len=256,
                finetune_steps=300, finetune_lr=1e-3, finetune_batch=64, src_len=256, tgt_len=32,
                val_windows=256, val_pairs=215, log_every=50, eval_every=150),
}
OVERRIDABLE = ("pretrain_steps", "pretrain_lr", "pretrain_batch", "pretrain_len", "finetune_steps", "finetune_lr",
               "finetune_batch", "src_len", "tgt_len", "log_every", "eval_every")


# ---- data -----------------------------------------------------------------------------

def load_splits(path: str, train_bytes: int) -> SimpleNamespace:
    """train/test through utils.data.load_text; valid.txt read directly (held-out loss)."""
    from moeq.utils.data import load_text
    if not os.path.isdir(path):
        raise SystemExit(f"error: --data {path}: no such directory: pass a directory with train.txt, valid.txt "
                         f"and test.txt, e.g. --data ../shared/data/python-docs")
    try:
        text = load_text(path)
    except FileNotFoundError as e:
        raise SystemExit(f"error: --data {path}: {e}")
    valid_path = os.path.join(path, "valid.txt")
    if os.path.isfile(valid_path):
        with open(valid_path, encoding="utf-8") as f:
            valid = f.read()
    else:  # held-out loss then comes from the test split; no text of it is trained on either way
        print(f"note: {valid_path} not found: held-out losses use the test split")
        valid = text.test
    # Pretraining can use a prefix of the train split (smoke: keeps tokenizing cheap);
    # title pairs always come from the whole split.
    pretrain = text.train[:train_bytes] if train_bytes else text.train
    return SimpleNamespace(train=text.train, pretrain=pretrain, valid=valid, test=text.test, source=text.source)


def is_adornment(line: str) -> bool:
    """An rst section under/overline: one punctuation char repeated (3+ times, so '::' or
    '--' in prose do not count); spaces inside (simple-table borders) disqualify it."""
    s = line.rstrip()
    return len(s) >= 3 and s[0] in string.punctuation and s == s[0] * len(s)


def find_titles(lines: list[str]) -> list[tuple[int, int, str]]:
    """rst section titles as (first line of the heading, first line of the body, title).
    A title is an unindented line after a blank line (or the start, or another heading),
    underlined by an adornment at least as long; or any line between an overline and an
    equal underline. Shorter underlines, table borders and transitions are not titles."""
    out, i = [], 0
    while i + 1 < len(lines):
        line, below = lines[i], lines[i + 1]
        if is_adornment(line) and i + 2 < len(lines) and below.strip() and lines[i + 2].rstrip() == line.rstrip() \
                and len(line.rstrip()) >= len(below.strip()):
            out.append((i, i + 3, below.strip()))
            i += 3
        elif line.strip() and not line[0].isspace() and not is_adornment(line) and is_adornment(below) \
                and len(below.rstrip()) >= len(line.rstrip()) \
                and (i == 0 or not lines[i - 1].strip() or (out and out[-1][1] == i)):
            out.append((i, i + 2, line.strip()))
            i += 2
        else:
            i += 1
    return out


def title_pairs(text: str, max_chars: int = 1000) -> list[tuple[str, str]]:
    """(section body, title) pairs: the body runs to the next heading, whitespace collapsed,
    cut to max_chars; sections with an empty body (a title right above a subtitle) are skipped."""
    lines = text.split("\n")
    heads = find_titles(lines)
    pairs = []
    for k, (_, body, title) in enumerate(heads):
        end = heads[k + 1][0] if k + 1 < len(heads) else len(lines)
        source = " ".join(" ".join(lines[body:end]).split())[:max_chars]
        if source and title:
            pairs.append((source, title))
    return pairs


def write_jsonl(pairs, path: str) -> None:
    tmp = f"{path}.partial-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for source, target in pairs:
            f.write(json.dumps({"source": source, "target": target}) + "\n")
    os.replace(tmp, path)


def tokenize(tok, text: str) -> torch.Tensor:
    from moeq.utils.data import tokenize as stream
    return stream(tok, text)


# ---- span corruption (phase 1) --------------------------------------------------------

def segment(n: int, parts: int, g: torch.Generator) -> list[int]:
    """n items cut at random into `parts` non-empty runs (T5's _random_segmentation)."""
    cuts = sorted((torch.randperm(n - 1, generator=g)[: parts - 1] + 1).tolist())
    bounds = [0] + cuts + [n]
    return [b - a for a, b in zip(bounds, bounds[1:])]


def span_corrupt(ids: list[int], sentinels: list[int], eos: int, g: torch.Generator,
                 density: float = 0.15, mean_span: float = 3.0) -> tuple[list[int], list[int]]:
    """T5 span corruption of one window: `density` of the tokens, in spans of mean length
    `mean_span`, each replaced in the source by a sentinel; the target lists each sentinel
    followed by the span it hides, then </s>. Both lengths depend on len(ids) alone, so a
    batch of equal windows needs no padding."""
    n = len(ids)
    num_noise = max(1, round(n * density))
    num_spans = max(1, min(round(num_noise / mean_span), len(sentinels), n - num_noise))
    noise, keep = segment(num_noise, num_spans, g), segment(n - num_noise, num_spans, g)
    src, tgt, pos = [], [], 0
    for i in range(num_spans):  # keep, noise, keep, noise, ...: T5 starts with kept tokens
        src += ids[pos:pos + keep[i]] + [sentinels[i]]
        pos += keep[i]
        tgt += [sentinels[i]] + ids[pos:pos + noise[i]]
        pos += noise[i]
    return src, tgt + [eos]


def corrupted_batch(windows: torch.Tensor, sentinels, eos, g):
    pairs = [span_corrupt(w.tolist(), sentinels, eos, g) for w in windows]
    src = torch.tensor([s for s, _ in pairs])
    return src, torch.ones_like(src), torch.tensor([t for _, t in pairs])


def pretrain_batches(ids, batch, seqlen, seed, sentinels, eos):
    g = torch.Generator().manual_seed(seed + 1)
    for windows in random_windows(ids, batch, seqlen, seed):
        yield corrupted_batch(windows, sentinels, eos, g)


# ---- pairs (phase 2) ------------------------------------------------------------------

def encode_pairs(tok, pairs, src_len: int, tgt_len: int) -> list[tuple[list[int], list[int]]]:
    """Token ids; the target ends with </s> so that greedy generation learns to stop."""
    src = tok([s for s, _ in pairs], add_special_tokens=False, truncation=True, max_length=src_len)["input_ids"]
    tgt = tok([t for _, t in pairs], add_special_tokens=False, truncation=True, max_length=tgt_len - 1)["input_ids"]
    return [(s, t + [tok.eos_token_id]) for s, t in zip(src, tgt)]


def collate(examples, pad: int):
    """Right-padded (source, source mask, labels); padded label positions are -100 (ignored:
    pad is </s>, so padding cannot be told from the real end by its id)."""
    src = torch.full((len(examples), max(len(s) for s, _ in examples)), pad)
    labels = torch.full((len(examples), max(len(t) for _, t in examples)), -100)
    for i, (s, t) in enumerate(examples):
        src[i, :len(s)] = torch.tensor(s)
        labels[i, :len(t)] = torch.tensor(t)
    mask = (torch.arange(src.shape[1])[None] < torch.tensor([len(s) for s, _ in examples])[:, None]).long()
    return src, mask, labels


def pair_batches(examples, batch: int, seed: int, pad: int):
    """Endless shuffled epochs of the training pairs, seeded; the last partial batch is dropped."""
    g = torch.Generator().manual_seed(seed + 2)
    batch = min(batch, len(examples))
    while True:
        order = torch.randperm(len(examples), generator=g).tolist()
        for i in range(0, len(order) - batch + 1, batch):
            yield collate([examples[j] for j in order[i:i + batch]], pad)


# ---- model, losses --------------------------------------------------------------------

def model_config(p, tok):
    from transformers import SwitchTransformersConfig

    # Capacity per expert and sequence: twice the even share of the longest sequence,
    # so few tokens are dropped (calibration in quantize_switch.py routes with no cut).
    capacity = 2 * max(p.src_len, p.pretrain_len) // NUM_EXPERTS
    # MoE in every 2nd block (1, 3, ...). The config derives the sparse step from the number of
    # sparse layers; both are given so that the saved config.json agrees with itself.
    sparse = max(1, p.layers // 2)
    return SwitchTransformersConfig(
        vocab_size=len(tok), d_model=p.d_model, d_ff=p.d_ff, d_kv=p.d_kv, num_heads=p.heads, num_layers=p.layers,
        num_decoder_layers=p.layers, num_experts=NUM_EXPERTS, num_sparse_encoder_layers=sparse,
        num_sparse_decoder_layers=sparse, encoder_sparse_step=2, decoder_sparse_step=2,
        expert_capacity=capacity, dropout_rate=0.0, router_aux_loss_coef=AUX_COEF, router_z_loss_coef=Z_COEF,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id)


@torch.no_grad()
def init_routers(model, d_model: int) -> None:
    """Router rows ~ N(0, 0.1 / d_model), the Switch paper's reduced init scale. transformers'
    init (std 1) saturates the router softmax at the start, so the load-balancing loss gets no
    gradient and routing collapses onto a few experts (which then get no calibration tokens)."""
    for name, w in model.named_parameters():
        if name.endswith("router.classifier.weight"):
            w.normal_(0.0, (0.1 / d_model) ** 0.5)


def router_taps(model) -> dict[str, torch.Tensor]:
    """Forward hooks keeping each router's last logits (..., E) by router name: the output of
    its ``classifier``. The router losses are computed from them here rather than by
    transformers' output_router_logits, which pools all layers of a stack into one balancing
    loss (layers collapsing onto complementary experts satisfy it) and whose plumbing differs
    across 5.x versions; so do the router's own outputs (5.17 returns the top probability
    where 5.23 returns the logits), the classifier's output does not."""
    taps = {}
    for name, module in model.named_modules():
        if name.endswith("mlp.router"):
            module.classifier.register_forward_hook(lambda m, args, out, name=name: taps.__setitem__(name, out))
    return taps


def router_losses(taps, src_mask, tgt_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """Switch's load-balancing loss E * sum_i f_i P_i (1 when balanced) and the z-loss
    mean(logsumexp^2), each per MoE layer over real (unpadded) tokens, summed over layers."""
    aux = z = 0.0
    for name, logits in taps.items():
        mask = (src_mask if name.startswith("encoder.") else tgt_mask).reshape(-1, 1).float()
        logits = logits.float().reshape(-1, logits.shape[-1])
        n, E = mask.sum(), logits.shape[-1]
        dispatched = torch.nn.functional.one_hot(logits.argmax(-1), E) * mask   # f_i: share of tokens
        probs = logits.softmax(-1) * mask                                         # P_i: mean probability
        aux = aux + E * (dispatched.sum(0) / n * probs.sum(0) / n).sum()
        z = z + (torch.logsumexp(logits, -1, keepdim=True) ** 2 * mask).sum() / n
    return aux, z


def make_train_loss(taps):
    def loss_fn(model, batch):
        """Target cross entropy + router losses, as Switch trains."""
        src, mask, labels = (t.to(model.device) for t in batch)
        ce = model(input_ids=src, attention_mask=mask, labels=labels).loss
        aux, z = router_losses(taps, mask, labels != -100)
        return ce + AUX_COEF * aux + Z_COEF * z
    return loss_fn


@torch.no_grad()
def heldout_loss(model, batches) -> float:
    """Token-weighted target cross entropy (no router losses) over fixed batches."""
    total, count, dev, was_training = 0.0, 0, model.device, model.training
    model.eval()
    for src, mask, labels in batches:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            loss = model(input_ids=src.to(dev), attention_mask=mask.to(dev), labels=labels.to(dev)).loss
        n = int((labels != -100).sum())
        total += loss.float().item() * n
        count += n
    model.train(was_training)
    return total / count


def router_rows(model) -> dict[str, torch.Tensor]:
    """Router weights by MoE block name (the names quantize_switch.py prints)."""
    suffix = ".router.classifier.weight"
    return {n[: -len(suffix)]: p.detach().float().cpu().clone() for n, p in model.named_parameters()
            if n.endswith(suffix)}


def router_norm_change(before: dict, after: dict) -> dict[str, list[float]]:
    """Relative change of each expert's router-row l2 norm, per sparse layer."""
    return {name: ((after[name].norm(dim=1) - w.norm(dim=1)) / w.norm(dim=1)).tolist() for name, w in before.items()}


# ---- main -----------------------------------------------------------------------------

def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="directory with train.txt / valid.txt / test.txt (rst text)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--preset", default="cpu", choices=list(PRESETS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default). 1: at these "
                    "sizes a second thread gains little, and with another job on a 2-core machine 2 threads "
                    "ran up to 10x slower (spinning)")
    for k in OVERRIDABLE:
        ap.add_argument(f"--{k}", type=type(PRESETS["cpu"][k]), default=None, help="overrides the preset")
    return ap.parse_args(argv)


def hparams(a) -> SimpleNamespace:
    p = dict(PRESETS[a.preset])
    p.update({k: getattr(a, k) for k in OVERRIDABLE if getattr(a, k) is not None})
    if p["pretrain_steps"] < 1 or p["finetune_steps"] < 1:
        raise SystemExit("error: --pretrain_steps and --finetune_steps must be at least 1 (both checkpoints "
                         "must differ for the router-norm change)")
    if p["tgt_len"] < 2:
        raise SystemExit("error: --tgt_len must be at least 2 (title tokens + </s>)")
    return SimpleNamespace(**p)


def main(argv=None) -> int:
    a = parse_args(argv)
    p = hparams(a)
    command = " ".join(sys.argv if argv is None else [os.path.relpath(__file__)] + list(argv))
    t_start = time.time()
    if a.threads:
        torch.set_num_threads(a.threads)
    seed_everything(a.seed)
    stages = Stages()

    with stages("data"):   # text, title pairs, the BPE, token streams, held-out batches
        text = load_splits(a.data, p.train_bytes)
        pairs = {"train": title_pairs(text.train), "valid": title_pairs(text.valid), "test": title_pairs(text.test)}
        if not pairs["train"] or not pairs["test"]:
            raise SystemExit(f"error: --data {a.data}: found {len(pairs['train'])} train / {len(pairs['test'])} "
                             f"test rst section titles: pass reStructuredText with section titles (e.g. python-docs)")
        os.makedirs(os.path.join(a.out, "pairs"), exist_ok=True)
        for split in ("train", "test"):
            write_jsonl(pairs[split], os.path.join(a.out, "pairs", f"{split}.jsonl"))
        tok = make_tokenizer(text.train[: p.tok_bytes], p.vocab,
                             extra_special=[f"<extra_id_{i}>" for i in range(NUM_SENTINELS)])
        sentinels = tok.convert_tokens_to_ids([f"<extra_id_{i}>" for i in range(NUM_SENTINELS)])
        eos, pad = tok.eos_token_id, tok.pad_token_id
        ids = tokenize(tok, text.pretrain)
        # Fixed held-out batches (seed-independent, so runs of different seeds compare), from a
        # prefix of the valid split ~20x longer than they need (bytes per token < 4).
        g_val = torch.Generator().manual_seed(1234)
        val_ids = tokenize(tok, text.valid[: 80 * p.val_windows * p.pretrain_len])
        val_windows = next(random_windows(val_ids, p.val_windows, p.pretrain_len, 1234))
        val_pre = [corrupted_batch(val_windows[i:i + 16], sentinels, eos, g_val) for i in range(0, p.val_windows, 16)]
        train_ex = encode_pairs(tok, pairs["train"][: p.train_pairs or None], p.src_len, p.tgt_len)
        val_ex = encode_pairs(tok, (pairs["valid"] or pairs["test"])[: p.val_pairs], p.src_len, p.tgt_len)
        val_ft = [collate(val_ex[i:i + 16], pad) for i in range(0, len(val_ex), 16)]
    print(f"data: {ids.numel()} pretraining tokens, tokenizer {len(tok)}, title pairs "
          + ", ".join(f"{k} {len(v)}" for k, v in pairs.items()))

    # phase 0: the random init
    with stages("init"):
        from transformers import SwitchTransformersForConditionalGeneration
        cfg = model_config(p, tok)
        seed_everything(a.seed)  # the init depends on the seed alone, not on what ran before
        model = SwitchTransformersForConditionalGeneration(cfg)
        init_routers(model, p.d_model)
        model.to(a.device)
        if torch.device(a.device).type == "cuda":   # the CPU trains with transformers' loop, as it always did
            batched_switch_experts(model)
        train_loss = make_train_loss(router_taps(model))
        save_model(model, tok, os.path.join(a.out, "init"))
    print(f"model: {sum(t.numel() for t in model.parameters()) / 1e6:.2f}M parameters, d_model {p.d_model}, "
          f"{p.layers}+{p.layers} layers, {NUM_EXPERTS} experts every 2nd layer; device {device_name(a.device)}")

    # phase 1: span-corruption pretraining
    losses = {"pretrain": {"val_before": heldout_loss(model, val_pre)}}
    with stages("pretrain"):
        curve_pre = train(model, pretrain_batches(ids, p.pretrain_batch, p.pretrain_len, a.seed, sentinels, eos),
                          train_loss, p.pretrain_steps, p.pretrain_lr, a.device,
                          eval_fn=lambda m: heldout_loss(m, val_pre), eval_every=p.eval_every,
                          log_every=p.log_every, desc="pretrain")
    save_model(model, tok, os.path.join(a.out, "pretrained"))
    before = router_rows(model)

    # phase 2: fine-tuning on title generation. No weight decay: it would shrink every
    # router row alike and blur the per-expert norm change this testbed is for.
    losses["finetune"] = {"val_before": heldout_loss(model, val_ft)}
    with stages("finetune"):
        curve_ft = train(model, pair_batches(train_ex, p.finetune_batch, a.seed, pad), train_loss,
                         p.finetune_steps, p.finetune_lr, a.device, eval_fn=lambda m: heldout_loss(m, val_ft),
                         eval_every=p.eval_every, log_every=p.log_every, desc="finetune", weight_decay=0.0)
    save_model(model, tok, os.path.join(a.out, "finetuned"))
    seconds = {k: stages.seconds[k] for k in ("data", "pretrain", "finetune")}
    seconds["total"] = time.time() - t_start

    change = router_norm_change(before, router_rows(model))
    if all(c == 0 for v in change.values() for c in v):
        raise RuntimeError("fine-tuning left every router row's norm unchanged: the pair is useless for "
                           "--reference_model")
    for phase, curve in (("pretrain", curve_pre), ("finetune", curve_ft)):
        losses[phase].update(first_train=curve[0]["train_loss"], last_train=curve[-1]["train_loss"],
                             val_after=curve[-1]["val_loss"])
    write_json({"pretrain": curve_pre, "finetune": curve_ft}, os.path.join(a.out, "loss_curve.json"))
    write_json({"command": command, "preset": a.preset, "seed": a.seed, "device": device_name(a.device),
                "hparams": vars(p), "model_config": cfg.to_diff_dict(), "tokenizer_size": len(tok),
                "pretrain_tokens": ids.numel(), "pairs": {k: len(v) for k, v in pairs.items()},
                "seconds": seconds, "losses": losses, "router_norm_change": change, "data": text.source},
               os.path.join(a.out, "train_info.json"))

    print("router-norm change, pretrained -> finetuned (relative, per expert):")
    for name, v in change.items():
        print(f"  {name:30s} " + " ".join(f"{c:+.4f}" for c in v)
              + f"   mean |change| {sum(abs(c) for c in v) / len(v):.4f}")
    for phase in ("pretrain", "finetune"):
        l = losses[phase]
        print(f"{phase}: {seconds[phase]:.0f}s, train loss {l['first_train']:.3f} -> {l['last_train']:.3f}, "
              f"held-out loss {l['val_before']:.3f} -> {l['val_after']:.3f}")
    print(f"saved {a.out}/{{init,pretrained,finetuned}}, {a.out}/pairs/{{train,test}}.jsonl "
          f"({len(pairs['train'])} / {len(pairs['test'])} pairs), loss_curve.json, train_info.json "
          f"({seconds['total']:.0f}s total)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Train a small Mixtral-architecture MoE language model: the testbed for the paper's tables.

    python testbed/train_mixtral.py --data ../shared/data/python-docs --out runs/mixtral-s0 --seed 0 --preset gpu

Unlike a downloaded Mixtral, the router's initial weights are known here, so the
paper's quantity -- how much each expert's router row changed in training -- can be
measured: ``OUT/init`` is the model at initialisation (pass it as
``--router_reference``), ``OUT/trained`` the trained one. Also written:
``loss_curve.json`` (training loss, held-out loss on the valid split), ``train_info.json``
(config, command, device, seconds, router-norm change per layer) and, when matplotlib
is installed, ``loss_curve.png``.

``--data``: a directory with train.txt (and valid.txt / test.txt), e.g. the Python docs
of ../shared/data; or a hub dataset name understood by utils.data (online default).
The byte-level BPE tokenizer is trained on the train split. Same seed, same device:
same weights.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from moeq.testbed.common import (causal_lm_loss, device_name, make_tokenizer, random_windows, save_model,
                                 seed_everything, train, write_json)
from moeq.utils.timing import Stages

# Sizes: gpu ~ 50M parameters (8 experts x 6 layers), minutes on one H100; cpu ~ 4M,
# minutes on 2 cores; smoke: seconds, for tests.
PRESETS = {
    "gpu": dict(hidden=384, intermediate=768, layers=6, heads=6, kv_heads=2, vocab=8192, seqlen=512, batch=64,
                steps=2000, lr=1.5e-3),
    "cpu": dict(hidden=128, intermediate=256, layers=4, heads=4, kv_heads=2, vocab=4096, seqlen=256, batch=16,
                steps=400, lr=2e-3),
    # demo: the model demo.py ships with (models/demo-moe): ~1M parameters, bf16 on disk ~2 MB
    "demo": dict(hidden=64, intermediate=128, layers=4, heads=4, kv_heads=2, vocab=1024, seqlen=256, batch=16,
                 steps=1500, lr=3e-3),
    "smoke": dict(hidden=32, intermediate=64, layers=2, heads=2, kv_heads=1, vocab=320, seqlen=64, batch=8,
                  steps=30, lr=3e-3, train_bytes=300_000),
}


def build_model(p: dict, vocab_size: int, experts: int, top_k: int, aux_coef: float):
    from transformers import MixtralConfig, MixtralForCausalLM
    cfg = MixtralConfig(vocab_size=vocab_size, hidden_size=p["hidden"], intermediate_size=p["intermediate"],
                        num_hidden_layers=p["layers"], num_attention_heads=p["heads"],
                        num_key_value_heads=p["kv_heads"], num_local_experts=experts, num_experts_per_tok=top_k,
                        max_position_embeddings=max(2048, p["seqlen"]), sliding_window=None,
                        tie_word_embeddings=False, output_router_logits=aux_coef > 0, router_aux_loss_coef=aux_coef,
                        bos_token_id=0, eos_token_id=1, pad_token_id=1, dtype="float32")
    return MixtralForCausalLM(cfg)


def router_norm_change(init_state: dict, trained_model) -> list[dict]:
    """Per MoE layer: each expert's router-row l2 norm at init and after training."""
    out = []
    for i, layer in enumerate(trained_model.model.layers):
        n0 = init_state[f"model.layers.{i}.mlp.gate.weight"].float().norm(dim=1)
        n1 = layer.mlp.gate.weight.float().norm(dim=1)
        out.append({"layer": i, "init_norm": n0.tolist(), "trained_norm": n1.tolist(),
                    "change": (n1 - n0).tolist()})
    return out


def read_splits(data: str):
    """train / valid text: a local directory (train.txt, valid.txt or test.txt) or a hub name."""
    from moeq.utils import data as text_data
    if os.path.isdir(data):
        def read(name):
            path = os.path.join(data, name)
            return open(path, encoding="utf-8").read() if os.path.isfile(path) else None
        train_text = read("train.txt")
        valid_text = read("valid.txt") or read("test.txt")
        if train_text is None or valid_text is None:
            raise SystemExit(f"error: --data {data} needs train.txt and valid.txt (or test.txt): "
                             f"pass e.g. ../shared/data/python-docs")
        return train_text, valid_text
    if os.path.exists(data) or data not in text_data.HUB_DATASETS:
        raise SystemExit(f"error: --data {data}: not a directory with train.txt/valid.txt, nor one of "
                         f"{', '.join(text_data.HUB_DATASETS)}")
    splits = text_data.load_text(data)
    return splits.train, splits.test


def plot_curve(curve: list[dict], path: str, title: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in curve], [r["train_loss"] for r in curve], label="train")
    val = [r for r in curve if "val_loss" in r]
    ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="valid")
    ax.set_xlabel("step"), ax.set_ylabel("loss (nats/token)"), ax.set_title(title), ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="wikitext2", help="directory with train.txt + valid.txt, or a hub name")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="gpu")
    for k in ("hidden", "intermediate", "layers", "vocab", "seqlen", "batch", "steps"):
        ap.add_argument(f"--{k}", type=int, default=None, help=f"override the preset's {k}")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--train_bytes", type=int, default=None, help="use only the first N bytes of the train split")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top_k", type=int, default=2)
    ap.add_argument("--aux_loss_coef", type=float, default=0.01, help="router load-balancing loss weight")
    ap.add_argument("--eval_windows", type=int, default=64, help="held-out windows for the valid loss")
    ap.add_argument("--eval_every", type=int, default=0, help="steps between held-out evaluations (0: 10 per run)")
    ap.add_argument("--tokenizer_bytes", type=int, default=4 << 20, help="train text the BPE is trained on")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--overwrite", action="store_true")
    a = ap.parse_args(argv)
    p = dict(PRESETS[a.preset])
    p.update({k: getattr(a, k) for k in list(p) if getattr(a, k, None) is not None})
    if os.path.exists(os.path.join(a.out, "trained")) and not a.overwrite:
        raise SystemExit(f"error: {a.out}/trained exists: pass --overwrite or another --out")
    t_start = time.time()
    stages = Stages()
    with stages("data"):   # the BPE and the token streams
        train_text, valid_text = read_splits(a.data)
        if p.get("train_bytes"):
            train_text = train_text[: p["train_bytes"]]
        seed_everything(a.seed)
        tok = make_tokenizer(train_text[: a.tokenizer_bytes], p["vocab"])
        from moeq.utils.data import tokenize
        train_ids, valid_ids = tokenize(tok, train_text), tokenize(tok, valid_text)
        n_val = min(a.eval_windows, valid_ids.numel() // p["seqlen"])
        valid = valid_ids[: n_val * p["seqlen"]].view(n_val, p["seqlen"])
    print(f"tokenizer: {len(tok)} tokens; train {train_ids.numel():,} tokens, valid {valid.numel():,} tokens")

    with stages("init"):
        seed_everything(a.seed)
        model = build_model(p, len(tok), a.experts, a.top_k, a.aux_loss_coef)
        n_params = sum(t.numel() for t in model.parameters())
        print(f"model: {n_params / 1e6:.2f}M parameters ({p['layers']} layers, {a.experts} experts, "
              f"top-{a.top_k}, hidden {p['hidden']}); device {device_name(a.device)}")
        os.makedirs(a.out, exist_ok=True)
        # Saved checkpoints do not ask for router logits: with them, transformers adds the
        # aux loss to .loss, which would then not be the language-model loss.
        model.config.output_router_logits = False
        save_model(model, tok, os.path.join(a.out, "init"))
        model.config.output_router_logits = a.aux_loss_coef > 0
        init_state = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("mlp.gate.weight")}

    def lm_loss(m, batch):
        ids = batch.to(a.device)
        return m(input_ids=ids, labels=ids).loss   # includes the router aux loss (output_router_logits)

    with stages("train"):
        curve = train(model, random_windows(train_ids, p["batch"], p["seqlen"], a.seed), lm_loss, p["steps"],
                      p["lr"], a.device, eval_fn=lambda m: causal_lm_loss(m, valid, a.device),
                      eval_every=a.eval_every or max(1, p["steps"] // 10), log_every=max(1, p["steps"] // 50),
                      desc="train mixtral")
    train_s = stages.seconds["train"]
    with stages("save"):
        model.to("cpu")
        model.config.output_router_logits = False
        save_model(model, tok, os.path.join(a.out, "trained"))

    change = router_norm_change(init_state, model)
    write_json(curve, os.path.join(a.out, "loss_curve.json"))
    plotted = plot_curve(curve, os.path.join(a.out, "loss_curve.png"), f"{a.preset} Mixtral testbed, seed {a.seed}")
    info = {"command": "python testbed/train_mixtral.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "preset": a.preset, "sizes": p, "experts": a.experts, "top_k": a.top_k, "aux_loss_coef": a.aux_loss_coef,
            "seed": a.seed, "device": device_name(a.device), "parameters": n_params, "data": os.path.abspath(a.data)
            if os.path.isdir(a.data) else a.data, "tokenizer_vocab": len(tok), "train_tokens": int(train_ids.numel()),
            "train_seconds": train_s, "total_seconds": time.time() - t_start, "stage_seconds": stages.seconds,
            "final_train_loss": curve[-1]["train_loss"], "final_val_loss": curve[-1].get("val_loss"),
            "router_norm_change": change}
    write_json(info, os.path.join(a.out, "train_info.json"))
    print(f"trained {p['steps']} steps in {train_s:.1f}s: train loss {curve[0]['train_loss']:.3f} -> "
          f"{curve[-1]['train_loss']:.3f}, valid loss {curve[-1].get('val_loss', float('nan')):.3f}")
    for row in change:
        rel = [c / n for c, n in zip(row["change"], row["init_norm"])]
        print(f"  layer {row['layer']}: router-norm change per expert " + " ".join(f"{r:+.2f}" for r in rel))
    print(f"saved {a.out}/init (router reference) and {a.out}/trained; loss curve in {a.out}/loss_curve.json"
          + (" and loss_curve.png" if plotted else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Tiny MoE checkpoints built offline from a transformers config, for tests and demos.

    python -m moeq.utils.tiny --out tiny-mixtral [--text data/python-docs/train.txt]

writes a randomly initialised Mixtral-architecture model and a byte-level BPE
tokenizer trained on the given text (first 2 MB)."""
from __future__ import annotations

import argparse
import os

import torch


def train_tokenizer(text: str, vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>")


def tiny_mixtral_config(vocab_size: int, **overrides):
    from transformers import MixtralConfig
    cfg = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
               max_position_embeddings=512, sliding_window=None, tie_word_embeddings=False,
               bos_token_id=0, eos_token_id=1, pad_token_id=1)
    cfg.update(overrides)
    return MixtralConfig(**cfg)


def build_tiny_mixtral(out: str, text: str, seed: int = 0, vocab_size: int = 512, **overrides) -> str:
    from transformers import MixtralForCausalLM
    tok = train_tokenizer(text[: 2 << 20], vocab_size)
    torch.manual_seed(seed)
    model = MixtralForCausalLM(tiny_mixtral_config(len(tok), **overrides)).eval()
    # Give experts distinct router norms and weight spreads, as trained models have.
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            g = torch.Generator().manual_seed(seed * 100 + i)
            E = layer.mlp.gate.weight.shape[0]
            layer.mlp.gate.weight.mul_(torch.linspace(0.5, 2.0, E)[torch.randperm(E, generator=g)][:, None])
            layer.mlp.experts.gate_up_proj.mul_(torch.linspace(0.5, 1.5, E)[torch.randperm(E, generator=g)][:, None, None])
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def default_text_path() -> str:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(here, "data", "python-docs", "train.txt")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--text", default=default_text_path(), help="text to train the tokenizer on")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, default=8)
    a = ap.parse_args()
    if not os.path.isfile(a.text):
        raise SystemExit(f"error: tokenizer text {a.text} not found: pass --text FILE")
    with open(a.text, encoding="utf-8") as f:
        text = f.read(2 << 20)
    build_tiny_mixtral(a.out, text, a.seed, num_hidden_layers=a.layers, num_local_experts=a.experts)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()

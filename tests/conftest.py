import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout (the installed moeq, editable)
# Real text (slices shipped in the repository, see data/README.md); $MOEQ_DATA for others.
DATA = os.environ.get("MOEQ_DATA") or os.path.join(ROOT, "data")

torch.set_num_threads(2)


def read(path, nbytes=None):
    with open(path, encoding="utf-8") as f:
        return f.read(nbytes) if nbytes else f.read()


@pytest.fixture(scope="session")
def small_text_dir(tmp_path_factory):
    """Real text, cut small: train from Python docs train, test from WikiText-2 test."""
    d = tmp_path_factory.mktemp("text")
    (d / "train.txt").write_text(read(os.path.join(DATA, "python-docs", "train.txt"), 200_000))
    (d / "test.txt").write_text(read(os.path.join(DATA, "wikitext-2", "test.txt"), 30_000))
    return str(d)


@pytest.fixture(scope="session")
def tokenizer(small_text_dir):
    from moeq.utils.tiny import train_tokenizer
    return train_tokenizer(read(os.path.join(small_text_dir, "train.txt")), 384)


@pytest.fixture(scope="session")
def tiny_mixtral_dir(tmp_path_factory, small_text_dir):
    from moeq.utils.tiny import build_tiny_mixtral
    d = str(tmp_path_factory.mktemp("tiny_mixtral"))
    return build_tiny_mixtral(d, read(os.path.join(small_text_dir, "train.txt")), seed=0, vocab_size=384)


def load_tiny(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def pack(model, family, windows, cfg, out_dir, tokenizer=None, max_shard_size=1 << 30, **kw):
    """Quantize ``model`` in memory (fake-quantized weights stay in it) and write its packed
    checkpoint to ``out_dir``; returns (report, sizes)."""
    from moeq.quant.format import ShardWriter
    from moeq.utils.pipeline import quantize_model
    os.makedirs(out_dir, exist_ok=True)
    writer = ShardWriter(str(out_dir), cfg.groupsize, cfg.sym, max_shard_size)
    report = quantize_model(model, family, windows, cfg, torch.device("cpu"), sink=writer, **kw)
    sizes = writer.finish(model.config.to_dict())
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))
    return report, sizes

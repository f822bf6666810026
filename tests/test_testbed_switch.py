"""testbed/train_switch.py: the smoke preset end to end, determinism, rst title pairs, and
the pair it writes going through quantize_switch.py."""
import json
import os
import subprocess
import sys

import pytest
import torch

from moeq.testbed import train_switch

from conftest import DATA, ROOT

DOCS = os.path.join(DATA, "python-docs")
# Fewer steps where only the weights' identity matters.
SHORT = ["--preset", "smoke", "--pretrain_steps", "3", "--finetune_steps", "2"]


def run_smoke(out, *extra, seed=0):
    # One thread: as fast for this size, and much faster when other jobs share the cores.
    threads = torch.get_num_threads()
    argv = ["--data", DOCS, "--out", str(out), "--seed", str(seed), "--device", "cpu", "--threads", "1", *extra]
    try:
        assert train_switch.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def weights(path):
    from safetensors.torch import load_file
    return load_file(os.path.join(path, "model.safetensors"))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    return run_smoke(tmp_path_factory.mktemp("switch") / "s0", "--preset", "smoke")


def test_smoke_run_writes_checkpoints_pairs_and_curves(smoke):
    from transformers import AutoModelForSeq2SeqLM
    for name in ("init", "pretrained", "finetuned"):
        assert os.path.isfile(smoke / name / "model.safetensors") and os.path.isfile(smoke / name / "tokenizer.json")
    for split in ("train", "test"):
        recs = [json.loads(l) for l in (smoke / "pairs" / f"{split}.jsonl").read_text().splitlines()]
        assert len(recs) > 50 and all(r["source"] and r["target"] for r in recs)
    curve = json.loads((smoke / "loss_curve.json").read_text())
    assert curve["pretrain"][-1]["train_loss"] < curve["pretrain"][0]["train_loss"]
    assert "val_loss" in curve["pretrain"][-1] and "val_loss" in curve["finetune"][-1]
    info = json.loads((smoke / "train_info.json").read_text())
    assert info["preset"] == "smoke" and info["pairs"]["train"] > 0 and "--preset smoke" in info["command"]
    assert len(info["router_norm_change"]) == 2  # encoder.block.1, decoder.block.1
    assert any(c != 0 for v in info["router_norm_change"].values() for c in v)

    model = AutoModelForSeq2SeqLM.from_pretrained(smoke / "finetuned")
    assert type(model).__name__ == "SwitchTransformersForConditionalGeneration"
    assert model.config.decoder_start_token_id == model.config.pad_token_id
    init, pre, ft = (weights(smoke / n) for n in ("init", "pretrained", "finetuned"))
    key = "encoder.block.1.layer.1.mlp.router.classifier.weight"
    assert not torch.equal(init[key], pre[key]) and not torch.equal(pre[key], ft[key])


def test_same_seed_same_weights_other_seed_differs(tmp_path):
    a = weights(run_smoke(tmp_path / "a", *SHORT) / "finetuned")
    b = weights(run_smoke(tmp_path / "b", *SHORT) / "finetuned")
    c = weights(run_smoke(tmp_path / "c", *SHORT, seed=1) / "finetuned")
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


RST = """\
=========
Top title
=========

Intro text of the
top section.

First section
=============

Body one.

+-------+-------+
| a     | b     |
+-------+-------+

=====  =====
col 1  col 2
=====  =====

Too short
-----

still the first section.

Second section
--------------
  Body two, indented.

----------

Empty one
---------
Sub title
~~~~~~~~~~
Text of sub.
"""


def test_title_pairs_from_rst():
    assert train_switch.title_pairs(RST) == [
        ("Intro text of the top section.", "Top title"),
        ("Body one. +-------+-------+ | a | b | +-------+-------+ ===== ===== col 1 col 2 ===== ===== "
         "Too short ----- still the first section.", "First section"),
        ("Body two, indented. ----------", "Second section"),
        ("Text of sub.", "Sub title"),
    ]
    assert train_switch.title_pairs(RST, max_chars=9)[1] == ("Body one.", "First section")


def test_missing_data_dir_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="--data"):
        train_switch.main(["--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--preset", "smoke"])


def test_quantize_switch_cli_on_the_trained_pair(smoke, tmp_path):
    alloc = tmp_path / "bit_allocation.json"
    cmd = [sys.executable, os.path.join(ROOT, "quantize_switch.py"), "--model", str(smoke / "finetuned"),
           "--reference_model", str(smoke / "pretrained"), "--dataset", str(smoke / "pairs"), "--avg_bits", "2.5",
           "--high_bit_level", "3", "--low_bit_level", "2", "--groupsize", "32", "--nsamples", "8", "--src_len", "32",
           "--tgt_len", "2", "--min_expert_tokens", "1", "--batch_size", "8", "--allocation_path", str(alloc)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    layers = json.loads(alloc.read_text())["layers"]
    assert [l["name"] for l in layers] == ["encoder.block.1.layer.1.mlp", "decoder.block.1.layer.2.mlp"]
    assert all(l["router_score"] == "norm_change" and sorted(l["bits"]) == [2] * 4 + [3] * 4 for l in layers)


def test_batched_pair_scores_equal_one_pair_at_a_time(smoke):
    """The grid's seq2seq evaluation batches its pairs on CUDA (utils/tasks._pair_batches): the
    same loss, token count and decoded texts as scoring one pair at a time (the CPU's way)."""
    from types import SimpleNamespace

    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from moeq.utils import data
    from moeq.utils.tasks import _pair_batches, _pairs_one_by_one
    model = AutoModelForSeq2SeqLM.from_pretrained(smoke / "finetuned").eval()
    tok = AutoTokenizer.from_pretrained(smoke / "finetuned")
    pairs = data.load_pairs(str(smoke / "pairs")).test[8:19]   # sources of 96-400 tokens, a last short batch
    config = SimpleNamespace(src_len=400, tgt_len=8, quant=SimpleNamespace(batch_size=4))
    with torch.no_grad():
        nll, count, texts = _pairs_one_by_one(config, pairs, model, tok, "cpu")
        batched = _pair_batches(config, pairs, model, tok, "cpu")
    assert batched[1] == count > len(pairs) and batched[2] == texts
    assert batched[0] == pytest.approx(nll, rel=1e-5)

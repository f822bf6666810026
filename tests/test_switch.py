import json
import os

import torch

from moeq.config import QuantConfig
from moeq.utils import data
from moeq.utils.families import SwitchFamily, family_for

from conftest import pack


def tiny_switch(vocab, seed=0):
    from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration
    torch.manual_seed(seed)
    cfg = SwitchTransformersConfig(vocab_size=vocab, d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=4,
                                   num_decoder_layers=4, num_experts=8, expert_capacity=64, encoder_sparse_step=2,
                                   decoder_sparse_step=2, decoder_start_token_id=0, pad_token_id=0)
    return SwitchTransformersForConditionalGeneration(cfg).eval()


def seq2seq_calib(tokenizer, text_dir, n=8, src_len=64, tgt_len=32):
    ids = data.tokenize(tokenizer, data.load_text(text_dir).train)
    windows = data.calibration_windows(ids, n, src_len + tgt_len, seed=0)
    return data.Pairs(windows[:, :src_len], windows[:, src_len:])   # continue the text: source -> target


def test_switch_encoder_and_decoder_moe_quantized_and_packed(tokenizer, small_text_dir, tmp_path):
    from transformers import AutoModelForSeq2SeqLM
    model = tiny_switch(len(tokenizer))
    fam = family_for(model)
    assert isinstance(fam, SwitchFamily)
    # the reference ("pre-trained") routers: a known per-expert scaling of the fine-tuned ones
    factors = torch.tensor([1.3, 0.7, 1.0, 0.5, 1.6, 0.9, 1.1, 0.8])
    moes = [fam.moe(b, n) for n, b in fam.blocks(model) if fam.moe(b, n) is not None]
    assert [m.name for m in moes] == ["encoder.block.1.layer.1.mlp", "encoder.block.3.layer.1.mlp",
                                      "decoder.block.1.layer.2.mlp", "decoder.block.3.layer.2.mlp"]
    reference = {m.name: fam.router_weight(m) * factors[:, None] for m in moes}
    cfg = QuantConfig(order_type="router", avg_bits=2.5, high_bits=3, mid_bits=None, low_bits=2,
                      level_counts={3: 4, 2: 4}, attn_bits=4, groupsize=32, batch_size=4, min_expert_tokens=1)
    out = str(tmp_path / "packed")
    report, _ = pack(model, fam, seq2seq_calib(tokenizer, small_text_dir), cfg, out, router_reference=reference)
    modules = json.load(open(os.path.join(out, "config.json")))["quantization_config"]["modules"]

    assert [l["name"] for l in report.layers] == [m.name for m in moes]
    for m, layer in zip(moes, report.layers):
        norms = fam.router_weight(m).norm(dim=1)
        assert layer["expert_order"] == torch.argsort(norms - norms * factors, stable=True).tolist()
        for e, b in enumerate(layer["bits"]):
            for kind in ("wi", "wo"):
                assert modules[f"{m.name}.experts.expert_{e}.{kind}"]["bits"] == b
        assert sorted(layer["bits"]) == [2] * 4 + [3] * 4
    assert modules["decoder.block.2.layer.1.EncDecAttention.k"]["bits"] == 4
    assert not any(name.startswith("encoder.block.0.layer.1") for name in modules)  # dense FF stays fp

    packed = AutoModelForSeq2SeqLM.from_pretrained(out, dtype=torch.float32)
    src = torch.randint(1, len(tokenizer), (2, 40))
    tgt = torch.randint(1, len(tokenizer), (2, 12))
    with torch.no_grad():
        ref = model(input_ids=src, decoder_input_ids=tgt).logits
        got = packed(input_ids=src, decoder_input_ids=tgt).logits
    assert torch.allclose(ref, got, rtol=0, atol=1e-5), (ref - got).abs().max()


def make_switch_dirs(tmp_path, tokenizer, text_dir):
    """A "fine-tuned" tiny Switch and its "pretrained" reference (router rows scaled by
    known factors), and a jsonl of source/target pairs cut from real text."""
    import json
    model = tiny_switch(len(tokenizer))
    ft, ref = tmp_path / "finetuned", tmp_path / "pretrained"
    model.save_pretrained(ft)
    tokenizer.save_pretrained(ft)
    factors = torch.tensor([1.3, 0.7, 1.0, 0.5, 1.6, 0.9, 1.1, 0.8])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("router.classifier.weight"):
                p.mul_(factors[:, None])
    model.save_pretrained(ref)
    text = open(os.path.join(text_dir, "train.txt"), encoding="utf-8").read()
    paras = [p for p in text.split("\n\n") if len(p) > 400]
    with open(tmp_path / "pairs.jsonl", "w") as f:
        for p in paras[:60]:
            f.write(json.dumps({"source": p[:300], "target": p[300:400]}) + "\n")
    return str(ft), str(ref), str(tmp_path / "pairs.jsonl"), factors


def test_quantize_switch_cli_and_lm_eval_seq2seq(tokenizer, small_text_dir, tmp_path):
    import json
    import subprocess
    import sys

    from conftest import ROOT
    ft, ref, pairs, factors = make_switch_dirs(tmp_path, tokenizer, small_text_dir)
    out = tmp_path / "switch"
    cmd = [sys.executable, os.path.join(ROOT, "quantize_switch.py"), "--model", ft, "--reference_model", ref,
           "--order_type", "combined", "--zeta", "3.0", "--high_bit_level", "3", "--low_bit_level", "2",
           "--num_high_bit_experts", "4", "--num_low_bit_experts", "4", "--dataset", pairs, "--groupsize", "32",
           "--nsamples", "8", "--src_len", "32", "--tgt_len", "8", "--min_expert_tokens", "1", "--eval",
           "--eval_samples", "4", "--pack", "--save", "--saving_path", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert lines[-1].startswith("rouge pairs: rouge1 ") and lines[-2].startswith("eval loss pairs: ")
    alloc = json.loads((out / "bit_allocation.json").read_text())
    assert len(alloc["layers"]) == 4 and alloc["avg_bits"] == 2.5
    for layer in alloc["layers"]:
        assert layer["router_score"] == "norm_change" and sorted(layer["bits"]) == [2] * 4 + [3] * 4

    # lm-eval, seq2seq backend, on the packed checkpoint
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    with open(task_dir / "pairs.jsonl", "w") as f:
        for line in open(pairs).readlines()[:6]:
            rec = json.loads(line)
            f.write(json.dumps({"question": rec["source"][:120], "choices": [rec["target"][:40], "no", "yes"],
                                "label": 0}) + "\n")
    (task_dir / "s2s_mc.yaml").write_text("\n".join([
        "task: s2s_mc", "dataset_path: json", "dataset_kwargs:", "  data_files:",
        f"    test: {task_dir / 'pairs.jsonl'}", "test_split: test", "output_type: multiple_choice",
        "doc_to_text: '{{question}}'", "doc_to_choice: '{{choices}}'", "doc_to_target: label",
        "metric_list:", "  - metric: acc", ""]))
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--tasks", "s2s_mc", "--include_path",
                        str(task_dir), "--model_args", f"pretrained={out},quantized=True,backend=seq2seq,dtype=float32",
                        "--device", "cpu", "--batch_size", "2"], capture_output=True, text=True, env=env,
                       cwd=str(tmp_path), timeout=600)
    assert r.returncode == 0 and "s2s_mc" in r.stdout, r.stderr[-3000:]


def test_switch_bad_inputs(tokenizer, small_text_dir, tiny_mixtral_dir, tmp_path):
    import subprocess
    import sys

    from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

    from conftest import ROOT
    ft, ref, pairs, _ = make_switch_dirs(tmp_path, tokenizer, small_text_dir)
    four = tmp_path / "four_experts"
    cfg = SwitchTransformersConfig(vocab_size=len(tokenizer), d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=4,
                                   num_decoder_layers=4, num_experts=4, encoder_sparse_step=2, decoder_sparse_step=2)
    SwitchTransformersForConditionalGeneration(cfg).save_pretrained(four)
    base = [sys.executable, os.path.join(ROOT, "quantize_switch.py"), "--dataset", pairs, "--groupsize", "32",
            "--nsamples", "4", "--src_len", "16", "--tgt_len", "4", "--allocation_path", str(tmp_path / "a.json")]
    for model, extra, expect in ((ft, ["--reference_model", str(four)], "same architecture"),
                                 (tiny_mixtral_dir, [], "quantize_mixtral.py"),
                                 (ft, ["--num_high_bit_experts", "4", "--num_low_bit_experts", "3"], "add up to 7")):
        r = subprocess.run(base + ["--model", model] + extra, capture_output=True, text=True, timeout=600)
        assert r.returncode == 2, r.stderr[-2000:]
        err = [l for l in r.stderr.splitlines() if l.startswith("error:")]
        assert len(err) == 1 and expect in err[0], r.stderr[-2000:]


def test_short_pairs_are_padded_and_the_padding_left_out(tokenizer, small_text_dir):
    """Pairs of every length calibrate: padded in batches, and the padding counts nowhere.
    The same pairs one per batch (no padding at all) route the same tokens to the same
    experts and give the same expert and attention Hessians."""
    from moeq.utils.pipeline import QuantReport, _collect_moe_stats, _pointing, _Run, quantize_model
    from moeq.utils.sequential import (HessianAccumulator, batch_masks, capture_block_inputs, input_hessian_hook,
                                       run_block)
    text = open(os.path.join(small_text_dir, "train.txt"), encoding="utf-8").read()
    sentences = [s.strip() for s in text.split(".") if 20 < len(s.strip()) < 300][:12]
    pairs = [(s, s.split()[0]) for s in sentences]   # short targets, sources of every length
    calib = data.pair_windows(tokenizer, pairs, 12, 256, 64, seed=0)
    assert len(set(calib.src_mask.sum(1).tolist())) > 1 and not bool(calib.tgt_mask.all())   # really padded
    model = tiny_switch(len(tokenizer))
    fam = family_for(model)
    cpu = torch.device("cpu")
    (b0_name, b0), (b1_name, b1) = fam.stages(model)[0][:2]
    moe = fam.moe(b1, b1_name)
    stats = []
    for batch_size in (4, 1):
        inputs, kwargs = capture_block_inputs(model, fam, calib, batch_size, cpu, cpu)
        masks = batch_masks(fam, calib, batch_size, 0)
        current = {}
        acc = HessianAccumulator(64, cpu)
        q = b0.layer[0].SelfAttention.q
        handle = q.register_forward_pre_hook(input_hessian_hook(acc, current, "block"))
        hidden = run_block(b0, inputs, kwargs, cpu, cpu, family=fam, before_batch=_pointing(current, masks))
        handle.remove()
        got = _collect_moe_stats(_Run(fam, QuantConfig(), QuantReport(), cpu, cpu), moe, b1, hidden, kwargs, masks)
        stats.append((acc, got.accs, got.tokens))
    (a4, e4, t4), (a1, e1, t1) = stats
    assert t4.tolist() == t1.tolist() and int(t4.sum()) == int(calib.src_mask.sum())   # top-1: one per real token
    assert int(a4.n[0]) == int(a1.n[0]) == int(calib.src_mask.sum())
    assert torch.allclose(a4.hessian(0), a1.hessian(0), rtol=1e-4, atol=1e-6)
    for kind in ("wi", "wo"):
        assert torch.equal(e4[kind].n, e1[kind].n)
        assert torch.allclose(e4[kind].hessian(), e1[kind].hessian(), rtol=1e-4, atol=1e-6), kind
    # and the whole pipeline on the padded batches: the decoder's experts count target tokens only
    report = quantize_model(model, fam, calib, QuantConfig(level_counts={3: 4, 2: 4}, groupsize=32, batch_size=4,
                                                           min_expert_tokens=1), cpu)
    assert sum(report.layers[0]["scores"]["tokens"]) == int(calib.src_mask.sum())
    assert sum(report.layers[-1]["scores"]["tokens"]) == int(calib.tgt_mask.sum())

"""Every decoder-only MoE family of transformers 5 whose experts use its experts interface
goes through the one pipeline: a tiny model of each, built from its config and trained a
few steps (so that routers are not uniform), saved in the hub layout (one tensor per
expert), quantized at 2.0 average bits with levels 3/2/1, packed, and loaded with
``from_pretrained``: the same logits as the fake-quantized model."""
import json
import os
import sys

import pytest
import torch

from moeq import QuantConfig, RunConfig, quantize

BASE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256, tie_word_embeddings=False)
FAMILIES = {
    "mixtral": dict(intermediate_size=64, num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(intermediate_size=128, moe_intermediate_size=64, shared_expert_intermediate_size=64,
                      num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1),
    "qwen3_moe": dict(intermediate_size=128, moe_intermediate_size=64, num_experts=8, num_experts_per_tok=2,
                      head_dim=16),
    "olmoe": dict(intermediate_size=64, num_experts=8, num_experts_per_tok=2),
    "deepseek_v2": dict(intermediate_size=128, moe_intermediate_size=64, n_routed_experts=8, n_shared_experts=1,
                        num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1, num_hidden_layers=3,
                        num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=8,
                        qk_nope_head_dim=8, v_head_dim=16, topk_method="group_limited_greedy"),
    "deepseek_v3": dict(intermediate_size=128, moe_intermediate_size=64, n_routed_experts=8, n_shared_experts=1,
                        num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1, num_hidden_layers=3,
                        num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=8,
                        qk_nope_head_dim=8, v_head_dim=16),
    "phimoe": dict(intermediate_size=64, num_local_experts=8, num_experts_per_tok=2),
    "gpt_oss": dict(intermediate_size=64, num_local_experts=8, num_experts_per_tok=2, head_dim=16,
                    layer_types=["sliding_attention", "full_attention"], sliding_window=32),
    "granitemoe": dict(intermediate_size=64, num_local_experts=8, num_experts_per_tok=2, logits_scaling=4.0),
}


def tiny_model(model_type, vocab_size, seed=0):
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.for_model(model_type, vocab_size=vocab_size, **{**BASE, **FAMILIES[model_type]},
                               bos_token_id=0, eos_token_id=1, pad_token_id=1)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def train_few_steps(model, ids: torch.Tensor, steps=12, seqlen=64, batch=8):
    """Enough AdamW steps on real text that the routers prefer some experts."""
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, ids.numel() - seqlen - 1, (batch,), generator=g)
        x = torch.stack([ids[s:s + seqlen] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def text_ids(tokenizer, small_text_dir):
    from moeq.utils import data
    return data.tokenize(tokenizer, data.load_text(small_text_dir).train)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer, text_ids):
    """model type -> checkpoint directory (hub layout, as save_pretrained writes it)."""
    cache = {}

    def get(model_type):
        if model_type not in cache:
            d = str(tmp_path_factory.mktemp(model_type))
            model = train_few_steps(tiny_model(model_type, len(tokenizer)), text_ids)
            for name, buf in model.named_buffers():   # DeepSeek-V3's routing bias is learned outside gradients:
                if name.endswith("e_score_correction_bias"):   # non-zero here, so a loader that skips buffers shows
                    buf.copy_(torch.linspace(-0.5, 0.5, buf.numel()))
            model.save_pretrained(d)
            tokenizer.save_pretrained(d)
            cache[model_type] = d
        return cache[model_type]
    return get


def run(model_dir, out, small_text_dir):
    return quantize(RunConfig(model=model_dir, dataset=small_text_dir, nsamples=16, seqlen=64, device="cpu",
                              quant=QuantConfig(avg_bits=2.0, high_bits=3, mid_bits=2, low_bits=1, groupsize=32,
                                                batch_size=4, min_expert_tokens=4),
                              saving_path=str(out), keep_model=True, verbose=False))


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_family_quantizes_packs_and_loads(model_type, trained, small_text_dir, tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM
    result = run(trained(model_type), tmp_path / "ckpt", small_text_dir)
    alloc = json.loads((tmp_path / "ckpt" / "bit_allocation.json").read_text())
    assert alloc["avg_bits"] == 2.0 and result.avg_bits == 2.0
    n_moe = len(alloc["layers"])
    assert n_moe == (2 if model_type.startswith("deepseek") else 2)
    for layer in alloc["layers"]:
        assert sorted(layer["bits"]) == [1, 1, 2, 2, 2, 2, 3, 3]
        assert len(set(layer["scores"]["tokens"])) > 1      # routing is not uniform
        assert sum(layer["scores"]["tokens"]) == 16 * 64 * 2  # top-2 of every calibration token
    names = [row["name"] for row in alloc["modules"]]
    if model_type in ("qwen2_moe", "deepseek_v2", "deepseek_v3"):       # shared experts: their own width
        shared = [row for row in alloc["modules"] if "shared_expert" in row["name"]]
        assert shared and all(row["bits"] == 4 for row in shared)
    if model_type.startswith("deepseek"):                               # the first layer is dense
        dense = [row for row in alloc["modules"] if row["name"].startswith("model.layers.0.mlp.")]
        assert {r["name"].split(".")[-1] for r in dense} == {"gate_proj", "up_proj", "down_proj"}
        assert all(row["bits"] == 4 for row in dense)
    assert any(".self_attn." in n for n in names)
    # every tensor left unquantized (norms, routers, embeddings, buffers such as DeepSeek-V3's
    # routing bias) is in the packed checkpoint exactly as in the source
    from safetensors.torch import load_file
    source = load_file(os.path.join(trained(model_type), "model.safetensors"))
    written = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    common = [k for k in source if k in written and source[k].shape == written[k].shape]
    assert any("norm" in k for k in common)
    for k in common:
        assert torch.equal(source[k].to(written[k].dtype), written[k]), k
    # the reported bits per expert weight as stored are the expert tensors' bytes on disk
    experts = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]["modules"]
    experts = {k: v for k, v in experts.items() if isinstance(v["bits"], list)}
    stored = sum(written[k + suffix].nbytes * 8 for k in experts for suffix in ("", "_scale", "_zero")) \
        / sum(len(v["bits"]) * v["shape"][0] * v["shape"][1] for v in experts.values())
    assert abs(alloc["stored_bits_per_expert_weight"] - stored) < 1e-9, (alloc["stored_bits_per_expert_weight"], stored)
    assert alloc["stored_bits_per_expert_weight"] > 2.0
    packed = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ckpt"), dtype=torch.float32)
    assert type(packed.model.layers[-1].mlp.experts if hasattr(packed.model.layers[-1], "mlp")
                else packed.model.layers[-1].block_sparse_moe.experts).__name__ == "QuantExperts"
    ids = torch.randint(2, len(tokenizer), (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, got = result.model(ids).logits, packed(ids).logits
    assert torch.allclose(ref, got, rtol=0, atol=1e-4), (ref - got).abs().max()


def test_an_unknown_model_fails_at_once_in_one_line(tokenizer, tmp_path, small_text_dir, capsys):
    from transformers import MistralConfig, MistralForCausalLM

    from moeq import cli
    MistralForCausalLM(MistralConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                     num_hidden_layers=1, num_attention_heads=4,
                                     num_key_value_heads=2)).save_pretrained(tmp_path / "dense")
    tokenizer.save_pretrained(tmp_path / "dense")
    capsys.readouterr()
    assert cli.main("causal", "", ["--model", str(tmp_path / "dense"), "--dataset", small_text_dir]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no layer holds an experts module of transformers' experts interface" in err[0]


@pytest.mark.parametrize("model_type", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_lm_eval_cli_on_the_family(model_type, trained, small_text_dir, tmp_path):
    from test_packed import in_process_reference, read_lm_eval_results, run_lm_eval_cli, write_tasks
    result = run(trained(model_type), tmp_path / "ckpt", small_text_dir)
    tasks = write_tasks(tmp_path)
    r = run_lm_eval_cli(sys.executable, str(tmp_path / "ckpt"), tasks, tmp_path / "results", ",quantized=True")
    assert r.returncode == 0, r.stderr[-3000:]
    cli_results = read_lm_eval_results(tmp_path / "results")
    ref = in_process_reference(result.model, str(tmp_path / "ckpt"), tasks)
    for task, metric in (("moeq_ppl", "word_perplexity,none"), ("moeq_mc", "acc,none")):
        assert cli_results[task][metric] == pytest.approx(ref[task][metric], rel=1e-4), (task, metric)
    assert os.path.isfile(tmp_path / "ckpt" / "results.json")

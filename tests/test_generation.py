"""moeq.inference.greedy_generate: the static-cache greedy loop gives generate()'s tokens, for a
float32 tiny Mixtral and for the same model packed (experts at mixed widths,
dequantize backend on the CPU). The CUDA-graph replay of the decode step runs on the GPU only
(benchmarks/bench_experts_kernel.py --generate compares its tokens with generate()'s there)."""
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from moeq.inference import greedy_generate
from moeq.utils.synthetic import random_packed_experts


def tiny_mixtral():
    config = AutoConfig.for_model("mixtral", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                  num_experts_per_tok=2, vocab_size=300, sliding_window=None)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def same_as_generate(model, batch, prompt, new):
    ids = torch.randint(0, 300, (batch, prompt), generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=299)
    steps = []
    got = greedy_generate(model, ids, new, step_ms=steps)
    assert got.shape == (batch, prompt + new)
    assert torch.equal(got, ref)
    assert len(steps) == new - 1 and all(ms > 0 for ms in steps)   # each decode step after the first token


def test_greedy_generate_matches_generate():
    model = tiny_mixtral()
    for batch, prompt, new in ((1, 5, 12), (3, 7, 9), (2, 4, 1)):
        same_as_generate(model, batch, prompt, new)


def test_greedy_generate_packed_model():
    model = tiny_mixtral()
    for i, layer in enumerate(model.model.layers):
        old = layer.mlp.experts
        packed = random_packed_experts(old, model.config, {"gate_up_proj": (192, 64), "down_proj": (64, 96)},
                                       [3, 2, 1, 4], 32, device="cpu", seed=i, bias_dtype=torch.float32)
        packed.config = model.config
        layer.mlp.experts = packed
    same_as_generate(model, 2, 6, 10)


def test_greedy_generate_bad_input():
    model = tiny_mixtral()
    ids = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_generate(model, ids, 0)
    with pytest.raises(ValueError, match="CUDA"):
        greedy_generate(model, ids, 2, cuda_graph=True)

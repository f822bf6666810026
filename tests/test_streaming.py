
import torch
from safetensors.torch import save_file

from moeq.config import QuantConfig
from moeq.quant.format import MemoryWriter
from moeq.utils import data
from moeq.utils.families import family_for
from moeq.utils.loading import BlockLoader, TensorSource, load_skeleton
from moeq.utils.pipeline import quantize_model

from conftest import load_tiny


def test_legacy_and_fused_mixtral_names(tiny_mixtral_dir, tmp_path):
    """transformers 5 saves Mixtral (like the hub's Mixtral-8x7B) with per-expert
    block_sparse_moe.experts.{e}.w1/w2/w3 names; the streaming reader must fuse them
    exactly as transformers' loader does, and also read checkpoints saved fused."""
    model = load_tiny(tiny_mixtral_dir)
    fam = family_for(model)
    legacy = TensorSource(tiny_mixtral_dir)
    assert "model.layers.1.block_sparse_moe.experts.0.w1.weight" in legacy
    fused = {n: p.detach().clone() for n, p in model.named_parameters()}
    save_file(fused, tmp_path / "model.safetensors")
    native = TensorSource(str(tmp_path))
    for name in ("model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj",
                 "model.layers.0.mlp.gate.weight", "model.layers.0.self_attn.q_proj.weight"):
        assert torch.equal(fam.read_tensor(legacy, name), fused[name])
        assert torch.equal(fam.read_tensor(native, name), fused[name])


def test_streamed_quantization_equals_in_memory_and_releases_blocks(tiny_mixtral_dir, tokenizer, small_text_dir):
    text = data.load_text(small_text_dir)
    windows = data.calibration_windows(data.tokenize(tokenizer, text.train), 8, 64, seed=0)
    cfg = QuantConfig(avg_bits=2.0, attn_bits=4, groupsize=32, batch_size=4)
    cpu = torch.device("cpu")
    in_memory = MemoryWriter(cfg.groupsize, cfg.sym)
    quantize_model(load_tiny(tiny_mixtral_dir), family_for(load_tiny(tiny_mixtral_dir)), windows, cfg, cpu,
                   sink=in_memory)

    model = load_skeleton(tiny_mixtral_dir, torch.float32, "sdpa")
    fam = family_for(model)
    loader = BlockLoader(fam, cpu, TensorSource(tiny_mixtral_dir), torch.float32, keep=False)
    loader.materialize_rest(model)
    streamed = MemoryWriter(cfg.groupsize, cfg.sym)
    quantize_model(model, fam, windows, cfg, cpu, loader=loader, sink=streamed)
    assert streamed.tensors.keys() == in_memory.tensors.keys()
    for k in in_memory.tensors:
        assert torch.equal(streamed.tensors[k], in_memory.tensors[k]), k
    assert streamed.modules == in_memory.modules
    # blocks were released after use; their norms and routers went to the sink first
    assert all(p.device.type == "meta" for _, b in fam.blocks(model) for p in b.parameters())
    assert "model.layers.1.mlp.gate.weight" in streamed.tensors
    assert "model.layers.1.post_attention_layernorm.weight" in streamed.tensors
    assert "model.layers.1.mlp.experts.down_proj" in streamed.tensors  # packed, under the parameter's name

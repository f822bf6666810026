import os

import torch

from utils import checkpoint, data
from utils.families import SwitchFamily, family_for
from utils.pipeline import QuantConfig, quantize_model


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
    return windows[:, :src_len], windows[:, src_len:]   # continue the text: source -> target


def test_switch_encoder_and_decoder_moe_quantized_and_packed(tokenizer, small_text_dir, tmp_path):
    from inference import load_quantized_model
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
                      level_counts={3: 4, 2: 4}, attn_bits=4, groupsize=32, batch_size=4, router_reference=reference,
                      min_expert_tokens=1)
    report = quantize_model(model, fam, seq2seq_calib(tokenizer, small_text_dir), cfg, torch.device("cpu"))

    assert [l["name"] for l in report.layers] == [m.name for m in moes]
    for m, layer in zip(moes, report.layers):
        norms = fam.router_weight(m).norm(dim=1)
        assert layer["expert_order"] == torch.argsort(norms - norms * factors, stable=True).tolist()
        for e, b in enumerate(layer["bits"]):
            for kind in ("wi", "wo"):
                assert report.module_bits[f"{m.name}.experts.expert_{e}.{kind}"] == b
        assert sorted(layer["bits"]) == [2] * 4 + [3] * 4
    assert report.module_bits["decoder.block.2.layer.1.EncDecAttention.k"] == 4
    assert "encoder.block.0.layer.1.mlp.wi.weight" not in report.module_bits  # dense FF stays fp

    out = str(tmp_path / "packed")
    os.makedirs(out)
    checkpoint.save_packed(model, report, out, 32, False)
    packed = load_quantized_model(out, dtype=torch.float32, model_class=AutoModelForSeq2SeqLM)
    src = torch.randint(1, len(tokenizer), (2, 40))
    tgt = torch.randint(1, len(tokenizer), (2, 12))
    with torch.no_grad():
        ref = model(input_ids=src, decoder_input_ids=tgt).logits
        got = packed(input_ids=src, decoder_input_ids=tgt).logits
    assert torch.allclose(ref, got, rtol=0, atol=1e-5), (ref - got).abs().max()

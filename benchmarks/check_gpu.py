#!/usr/bin/env python
"""GPU-only correctness checks (CI has no GPU; run through the device tool):
1. GPTQ with the CUDA-graph column loop == the eager loop, bit for bit;
2. the Triton dequantization kernel == the eager unpacking, bit for bit;
3. a tiny Mixtral quantized on CUDA: packed model logits == fake-quantized logits.
    python benchmarks/check_gpu.py
"""
import tempfile

import torch
from transformers import AutoModelForCausalLM

import moeq.quant.gptq as gptq
from moeq.config import QuantConfig
from moeq.inference import load_quantized_model
from moeq.quant.format import ShardWriter
from moeq.quant.packing import dequantize_packed, pack_codes, unpack_codes
from moeq.quant.triton_dequant import dequantize_triton
from moeq.utils.families import family_for
from moeq.utils.pipeline import quantize_model
from moeq.utils.tiny import build_tiny_mixtral

dev = torch.device("cuda")
torch.manual_seed(0)
X = torch.randn(4096, 512, device=dev) @ torch.randn(512, 512, device=dev) * 0.1
H = (X.T @ X / 4096).expand(4, 512, 512).contiguous()
W = torch.randn(4, 256, 512, device=dev)
gptq.USE_CUDA_GRAPHS = True
a = gptq.gptq_quantize(W, H, [3, 2, 1, 4], groupsize=128)
gptq.USE_CUDA_GRAPHS = False
b = gptq.gptq_quantize(W, H, [3, 2, 1, 4], groupsize=128)
assert torch.equal(a.codes, b.codes) and torch.equal(a.weight, b.weight), "graph != eager"
print("1. GPTQ CUDA graph == eager: ok; losses", [round(float(x), 5) for x in a.loss])

for bits in (1, 2, 3, 4, 8):
    rows, cols, gs = 4096, 14336, 128
    groups = cols // gs
    q = pack_codes(torch.randint(0, 2 ** bits, (rows, cols), device=dev), bits)
    scales = (torch.rand(rows, groups, device=dev) + 0.1).half()
    zeros = torch.randn(rows, groups, device=dev).half() if bits == 1 else \
        pack_codes(torch.randint(0, 2 ** bits, (rows, groups), device=dev), bits)
    zero = zeros.float() if bits == 1 else unpack_codes(zeros, bits, groups).float()
    ref = dequantize_packed(q, scales, zero, bits, cols, torch.float16)
    got = dequantize_triton(q, scales, zero, bits, cols, torch.float16)
    assert torch.equal(ref, got), bits
    t = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
    t[0].record(); [dequantize_packed(q, scales, zero, bits, cols, torch.float16) for _ in range(10)]; t[1].record()
    t[2].record(); [dequantize_triton(q, scales, zero, bits, cols, torch.float16) for _ in range(10)]; t[3].record()
    torch.cuda.synchronize()
    print(f"2. dequant {bits}-bit {rows}x{cols}: triton == eager; eager {t[0].elapsed_time(t[1]) / 10:.3f} ms, "
          f"triton {t[2].elapsed_time(t[3]) / 10:.3f} ms")

d = tempfile.mkdtemp()
build_tiny_mixtral(d, "def f(x):\n    return x + 1\n" * 2000, vocab_size=300, hidden_size=256, intermediate_size=512)
model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
vocab = model.config.vocab_size
windows = torch.randint(0, vocab, (8, 128))
out = tempfile.mkdtemp()
writer = ShardWriter(out, 128, False, 1 << 30)
quantize_model(model, family_for(model), windows, QuantConfig(groupsize=128, batch_size=4), dev, sink=writer)
writer.finish(model.config.to_dict())
packed = load_quantized_model(out, device_map="cuda", dtype=torch.float32)
model.to(dev)
ids = torch.randint(0, vocab, (2, 64), device=dev)
with torch.no_grad():
    diff = (model(ids).logits - packed(ids).logits).abs().max().item()
assert diff < 1e-4, diff
print(f"3. tiny Mixtral on CUDA: packed vs fake-quant logits max |diff| {diff:.2e}: ok")

"""The grouped path (quant/grouped_experts.py: every expert dequantized in one launch, then grouped
GEMMs), run by Triton's interpreter on the CPU, against the reference (each routed expert
dequantized, then matmuls): the stacked weights equal the reference's bit for bit, for every width
mixed in one layer, read as bytes and as int32 words; the outputs match with torch's grouped GEMM and with one matmul
per expert, float32 and float16, SwiGLU (Mixtral; torch's, and the one-launch kernel) and a family's own gating with
biases (GPT-OSS), an expert
that gets no token, and a layer the fused kernels do not take (rows not whole words)."""
import os
import subprocess
import sys

from conftest import ROOT

SCRIPT = r"""
import torch
from moeq.utils.synthetic import random_family_experts
from moeq.quant.modules import dequantize_experts_forward, set_experts_backend
from moeq.quant import grouped_experts as gx

E = 8
gen = torch.Generator().manual_seed(0)

def routing(T, dtype):
    logits = torch.randn(T, E, generator=gen)
    logits[:, 6] = -1e9                                   # expert 6 never routed to
    w, idx = torch.topk(logits.softmax(-1), 2, dim=-1)
    return idx, w.to(dtype)

cases = [("mixtral", 64, 96, [3, 3, 2, 2, 2, 2, 1, 1], 32), ("gpt_oss", 64, 96, [8, 4, 3, 2, 1, 8, 4, 3], 32),
         ("mixtral", 80, 48, [4, 8, 3, 1, 2, 3, 4, 2], 16),   # hidden 80, group 16: no int32 words
         ("mixtral", 256, 128, [3, 3, 2, 2, 2, 2, 1, 1], 128)]  # a K tile of 128 codes in one group
for family, H, I, bits, gs in cases:
    m = random_family_experts(family, H, I, bits, gs)
    assert m.fused_applies() == (H % 32 == 0)
    # the one-launch dequantization writes what the reference dequantizes, expert by expert
    counts = torch.ones(E, dtype=torch.int32); counts[6] = 0
    for kind in (m.gate_kind, "down_proj"):
        for dtype in (torch.float32, torch.float16):
            for words in (False, True) if H % 32 == 0 else (False,):   # bytes, and int32 words where rows are
                # the byte kernel at its default tiles (1 row a program) once, where the forward reads
                # bytes (hidden 80), else at tiles of 16 rows: the interpreter's time goes with programs
                tiles = None if words or (H % 32 and dtype == torch.float16) else (16, 64, 8)
                stack = gx.dequantize_stack(m.packed(kind), counts, dtype, words=words, tiles=tiles)
                for e in range(E):
                    if e != 6:
                        assert torch.equal(stack[e], m.weight(kind, e, dtype)), (family, kind, e, dtype, words)
    for T, dtype in ((5, torch.float16), (300, torch.float32)):
        md = m.to(dtype)
        x = torch.randn(T, H, generator=gen).to(dtype)
        idx, w = routing(T, dtype)
        ref = dequantize_experts_forward(md, x, idx, w)
        # torch's grouped GEMM with the one-launch SwiGLU where the family's gating is SwiGLU; one
        # matmul per expert with the module's own activation (not at hidden 80: the same loop as the
        # other cases', and each forward there runs the slow 1-row byte programs in the interpreter)
        for fused_mm, swiglu in ((True, md._silu_gate()), (False, False))[:1 if H % 32 else 2]:
            got = gx.grouped_experts(x, idx, w, md.packed(md.gate_kind), md.packed("down_proj"),
                                     activation=md._activate, swiglu=swiglu, fused_mm=fused_mm)
            assert got.dtype == dtype and got.shape == ref.shape
            err = ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
            assert err < (1e-5 if dtype == torch.float32 else 2e-2), (family, bits, T, dtype, fused_mm, swiglu, err)
        if T == 300:                                        # through the experts interface
            set_experts_backend(md, "grouped")
            got = md(x, idx, w)
            assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-5
            set_experts_backend(md, "auto")
print("ok")
"""


def test_grouped_experts_match_reference():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout[-2000:] + r.stderr[-3000:]

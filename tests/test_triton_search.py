"""The grid search's fused group-error kernel, run by Triton's interpreter on the CPU, against
the eager group_error: strided weights, per-matrix and shared column weights, no column
weights, every width, the binary code, and weights exactly half-way between two codes (equal
errors bit for bit there: the division is the IEEE one)."""
import os
import subprocess
import sys

from conftest import ROOT

SCRIPT = r"""
import torch
from moeq.quant import quantizer
from moeq.quant.triton_search import group_error_triton
g = torch.Generator().manual_seed(0)
for B, R, G in ((3, 17, 16), (2, 5, 40), (1, 9, 128)):
    big = torch.randn(B, R, G + 7, generator=g)
    w = big[:, :, 3:3 + G]                        # strided, as GPTQ's block columns are
    bits = torch.tensor([1, 2, 3, 4, 8][:B] if B > 1 else [2])
    maxq = (2.0 ** bits.float() - 1).view(-1, 1, 1)
    scale, zero = quantizer._affine(*quantizer._range(w, False), maxq, False)
    for colw in (None, torch.rand(B, 1, G, generator=g) + 0.1, torch.rand(1, 1, G, generator=g) + 0.1):
        ref = quantizer._group_error_eager(w, scale, zero, maxq, colw)
        got = group_error_triton(w, scale, zero, maxq, colw)
        assert got.shape == ref.shape and torch.allclose(got, ref, rtol=2e-6, atol=0), (B, R, G, (got - ref).abs().max())
    one = torch.ones(())
    bs, bz = quantizer.binary_params(w)
    assert torch.allclose(group_error_triton(w, bs, bz, one), quantizer._group_error_eager(w, bs, bz, one), rtol=2e-6)
# w / s + z exactly k + 1/2
s = torch.full((1, 4, 1), 0.5)
z = torch.zeros(1, 4, 1)
w = torch.tensor([[0.25, 0.75, 1.25, 1.75]]).repeat(1, 4, 1)
maxq = torch.full((1, 1, 1), 7.0)
ref = quantizer._group_error_eager(w, s, z, maxq)
got = group_error_triton(w, s, z, maxq)
assert torch.equal(got, ref), (got, ref)
print("ok")
"""


def test_fused_group_error_matches_eager():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]

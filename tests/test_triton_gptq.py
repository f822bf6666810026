"""GPTQ's fused column kernel, run by Triton's interpreter on the CPU, against the eager column
loop it replaces: the same codes, scales, zeros and errors for whole blocks (group parameters,
sub-blocks, lazy updates), for widths 1..8 mixed in one batch and group sizes that make
sub-blocks of 32, 16 and 40 columns."""
import os
import subprocess
import sys

from conftest import ROOT

SCRIPT = r"""
import torch
from moeq.quant import gptq
g = torch.Generator().manual_seed(0)
for bs, gs, widths in ((128, 32, [1, 2, 3, 4, 8]), (64, 16, [2, 3]), (80, 40, [1, 2])):
    B, R = len(widths), 19
    w = torch.randn(B, R, bs, generator=g)
    x = torch.randn(B, 3 * bs, bs, generator=g)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(x.mT @ x / (3 * bs))), upper=True)
    bits_t = torch.tensor(widths)
    maxq = (2.0 ** bits_t.float() - 1).view(-1, 1)
    out = {}
    for fused in (False, True):
        runner = gptq._BlockRunner(B, R, bs, gs, bits_t, maxq, False, "search", torch.device("cpu"), torch.float32,
                                   graphs=False, fused=fused)
        out[fused] = [t.clone() for t in runner(w, hinv)]
    (q0, e0, s0, z0), (q1, e1, s1, z1) = out[False], out[True]
    assert torch.equal(q0, q1), (bs, gs, (q0 != q1).sum())
    assert torch.equal(s0, s1) and torch.equal(z0, z1), (bs, gs)
    assert torch.allclose(e0, e1, rtol=1e-5, atol=1e-6), (bs, gs, (e0 - e1).abs().max())
print("ok")
"""


def test_fused_column_loop_matches_eager():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]

"""The GPU dequantization kernel, run by Triton's interpreter on the CPU, must agree bit
for bit with the eager reference for every bit width and ragged shapes."""
import os
import subprocess
import sys

from conftest import ROOT

SCRIPT = r"""
import torch
from moeq.quant.packing import pack_codes, dequantize_packed, unpack_codes
from moeq.quant.triton_dequant import dequantize_triton
torch.manual_seed(0)
for bits in (1, 2, 3, 4, 8):
    for rows, cols, gs in ((5, 48, 16), (17, 40, 40), (3, 264, 8)):
        groups = cols // gs
        q = pack_codes(torch.randint(0, 2 ** bits, (rows, cols)), bits)
        scales = (torch.rand(rows, groups) + 0.1).half()
        if bits == 1:
            zeros = torch.randn(rows, groups).half(); zero = zeros.float()
        else:
            zeros = pack_codes(torch.randint(0, 2 ** bits, (rows, groups)), bits)
            zero = unpack_codes(zeros, bits, groups).float()
        for dtype in (torch.float32, torch.float16):
            ref = dequantize_packed(q, scales, zero, bits, cols, dtype)
            got = dequantize_triton(q, scales, zero, bits, cols, dtype)
            assert torch.equal(ref, got), (bits, rows, cols, gs, dtype)
print("ok")
"""


def test_triton_kernel_matches_eager_dequantization():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]

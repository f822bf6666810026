#!/usr/bin/env python
"""One mixed Mixtral-8x7B-shaped layer at T = 1 through the decode kernel, for Nsight Compute:

    ncu --kernel-name regex:_gemv --launch-skip 4 --launch-count 2 --section SpeedOfLight \
        --section Occupancy --section LaunchStats --section WarpStateStats python benchmarks/ncu_gemv.py
"""
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_experts_kernel import MIXED, SHAPES, packed_layer, routing  # noqa: E402

from moeq.quant import triton_experts as tx  # noqa: E402

shape = sys.argv[1] if len(sys.argv) > 1 else "mixtral8x7b"
model_type, H, I, E, k = SHAPES[shape]
m = packed_layer(model_type, H, I, E, k, (MIXED * (E // 8 + 1))[:E])
gen = torch.Generator(device="cuda").manual_seed(5)
x = torch.randn(1, H, device="cuda", generator=gen).to(torch.bfloat16)
idx, w = routing(1, E, k, torch.bfloat16, gen)
print("experts", idx.tolist(), "bits", [m.layouts["down_proj"].bits[e] for e in idx.flatten().tolist()])
for _ in range(3):
    tx.fused_experts(x, idx, w, m.packed("gate_up_proj"), m.packed("down_proj"), gated=True, fuse_silu=True)
torch.cuda.synchronize()

"""The fused mixed-bit experts kernels (quant/triton_experts.py), run by Triton's
interpreter on the CPU, against the reference path (dequantize each routed expert, then
matmuls): every width alone and mixed in one layer, 1 to 1500 tokens (the decode kernel and
the tensor-core kernel, their tiles, split-K), an expert that gets no token, SwiGLU fused in
the kernel (Mixtral) and a family's own gating with biases (GPT-OSS), float32 and float16
(the interpreter's bfloat16 tl.dot is wrong in Triton 3.9, so bfloat16 is checked on the GPU
by benchmarks/bench_experts_kernel.py --check), group sizes smaller than a K tile (32) and
a multiple of it (128); layers whose rows are not whole words go to the dequantize path; and
a quantized linear through the same kernels."""
import os
import subprocess
import sys

from conftest import ROOT

SCRIPT = r"""
import torch
from transformers import MixtralConfig, GptOssConfig
from transformers.models.mixtral.modeling_mixtral import MixtralExperts
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
from moeq.utils.synthetic import random_family_experts, random_packed_experts
from moeq.quant.modules import dequantize_experts_forward, set_experts_backend, QuantExperts
from moeq.quant import triton_experts as tx

H, I, E, GS = 64, 96, 8, 32

def make(family, bits):
    return random_family_experts(family, H, I, bits, GS)

def routing(T, gen, dtype):
    logits = torch.randn(T, E, generator=gen)
    logits[:, 7] = -1e9                                   # expert 7 never routed to
    w, idx = torch.topk(logits.softmax(-1), 2, dim=-1)
    return idx, w.to(dtype)

gen = torch.Generator().manual_seed(0)
cases = [("mixtral", [b] * E) for b in (1, 2, 3, 4, 8)] + [("mixtral", [3, 3, 2, 2, 2, 2, 1, 1]),
         ("gpt_oss", [8, 4, 3, 2, 1, 8, 4, 3])]
seen_kernels = set()
for family, bits in cases:
    m = make(family, bits)
    assert m._silu_gate() == (family == "mixtral")
    set_experts_backend(m, "fused")
    # 1500 tokens (128-token tiles) for the two layers that mix widths: every width runs there
    for T in (1, 3, 40, 1500) if len(set(bits)) > 1 else (1, 3, 40):
        for dtype in ((torch.float32, torch.float16) if T <= 40 else (torch.float32,)):
            x = torch.randn(T, H, generator=gen).to(dtype)
            idx, w = routing(T, gen, dtype)
            ref = dequantize_experts_forward(m.to(dtype), x, idx, w)
            got = m(x, idx, w)                            # through the experts interface
            assert got.dtype == dtype and got.shape == ref.shape
            err = ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
            assert err < (1e-5 if dtype == torch.float32 else 2e-2), (family, bits, T, dtype, err)
            seen_kernels.add((tx.choose_kernel(T, 2, E), tx.choose_mma_tiles(T, 2, E).block_m))
# both kernels ran: decode (T 1, 3) and tensor cores at 16 and 128 tokens per tile (T 40, 1500)
assert {"gemv", "mma"} == {k for k, _ in seen_kernels} and {16, 128} <= {bm for k, bm in seen_kernels if k == "mma"}

# explicit tiles: several M tiles per expert, split-K on both launches' shapes
m = make("mixtral", [4, 2, 1, 3, 8, 2, 2, 1]).to(torch.float32)
x = torch.randn(70, H, generator=gen); idx, w = routing(70, gen, torch.float32)
ref = dequantize_experts_forward(m, x, idx, w)
for tiles in ((tx.Tiles(16, 32, 128), tx.Tiles(16, 16, 128)), (tx.Tiles(32, 64, 64), tx.Tiles(64, 32, 32))):
    got = tx.fused_experts(x, idx, w, m.packed("gate_up_proj"), m.packed("down_proj"), gated=True, fuse_silu=True,
                           kernel="mma", tiles=tiles)
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-5, tiles

# group size a multiple of the K tile (128: one scale and zero point per row and tile) and the down
# projection split over K (3 tiles of 128, each span's partial sums added after it)
config = MixtralConfig(hidden_size=128, intermediate_size=384, num_local_experts=E)
with torch.device("meta"):
    template = MixtralExperts(config)


def check_tiles(experts, hidden: int, T: int, tiles, label) -> None:
    # the fused kernel with these tiles against the dequantize reference, in float32 and float16
    for dtype in (torch.float32, torch.float16):
        x = torch.randn(T, hidden, generator=gen).to(dtype); idx, w = routing(T, gen, dtype)
        ref = dequantize_experts_forward(experts.to(dtype), x, idx, w)
        got = tx.fused_experts(x, idx, w, experts.packed("gate_up_proj"), experts.packed("down_proj"), gated=True,
                               fuse_silu=True, kernel="mma" if tiles else None, tiles=tiles)
        err = ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
        assert err < (1e-5 if dtype == torch.float32 else 2e-2), (label, T, dtype, err)


for bits in ([3, 3, 2, 2, 2, 2, 1, 1], [8, 4, 8, 4, 8, 4, 8, 4]):
    big = random_packed_experts(template, config, {"gate_up_proj": (768, 128), "down_proj": (128, 384)}, bits, 128)
    for T, tiles in ((1, None), (40, None), (3, (tx.Tiles(16, 64, 128), tx.Tiles(16, 64, 128, split_k=3))),
                     (1, (tx.Tiles(16, 32, 128), tx.Tiles(16, 64, 128, split_k=3)))):
        check_tiles(big, 128, T, tiles, ("one group", bits))

# the gate/up launch split over K (3 tiles of 128): float32 partial sums, SwiGLU (or the family's
# gating) applied after it
config = MixtralConfig(hidden_size=384, intermediate_size=128, num_local_experts=E)
with torch.device("meta"):
    template = MixtralExperts(config)
wide = random_packed_experts(template, config, {"gate_up_proj": (256, 384), "down_proj": (384, 128)},
                             [3, 3, 2, 2, 2, 2, 1, 1], 128)
for T, tiles in ((1, (tx.Tiles(16, 32, 128, split_k=3), tx.Tiles(16, 64, 128))),
                 (3, (tx.Tiles(16, 32, 128, split_k=2), tx.Tiles(16, 64, 128, split_k=2)))):
    check_tiles(wide, 384, T, tiles, "split gate/up")

# the decode kernel (one program per routed slot, codes read as int32 words) forced at several T
# (each expert then read once per token), with its tiles: row tiles, word columns (a tile wider than
# a row, masked), K split on both launches (gate/up then in float32, gating after it); SwiGLU fused
# (Mixtral) and a family's own gating with biases (GPT-OSS); float32 and float16
for family, bits in (("mixtral", [3, 3, 2, 2, 2, 2, 1, 1]), ("gpt_oss", [8, 4, 3, 2, 1, 8, 4, 3])):
    g = make(family, bits)
    up, down = g.packed(g.gate_kind), g.packed("down_proj")
    assert up.words is not None and down.words is not None
    for T, gt in ((1, None), (12, None), (3, (tx.GemvTiles(16, 4, 2, 1), tx.GemvTiles(32, 8, 3, 2))),
                  (2, (tx.GemvTiles(64, 16, 1, 4), tx.GemvTiles(16, 2, 2, 1)))):
        for dtype in (torch.float32, torch.float16) if gt is None else (torch.float32,):
            gd = g.to(dtype)
            x = torch.randn(T, H, generator=gen).to(dtype); idx, w = routing(T, gen, dtype)
            ref = dequantize_experts_forward(gd, x, idx, w)
            got = tx.fused_experts(x, idx, w, gd.packed(gd.gate_kind), gd.packed("down_proj"), gated=True,
                                   fuse_silu=gd._silu_gate(), activation=gd._apply_gate, kernel="gemv", gemv_tiles=gt)
            err = ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
            assert got.dtype == dtype and err < (1e-5 if dtype == torch.float32 else 2e-2), (family, bits, T, gt, err)

# the decode kernel's codes are subnormal floats times activations lifted by 2^(64 - bit): exact for
# activations of any magnitude a layer sees (here 1e-6 to 3e4, float32)
g = make("mixtral", [3, 3, 2, 2, 2, 2, 1, 1])
for scale in (1e-6, 3e4):
    x = torch.randn(2, H, generator=gen) * scale; idx, w = routing(2, gen, torch.float32)
    ref = dequantize_experts_forward(g, x, idx, w)
    got = tx.fused_experts(x, idx, w, g.packed("gate_up_proj"), g.packed("down_proj"), gated=True, fuse_silu=True,
                           kernel="gemv")
    assert torch.isfinite(got).all() and ((got - ref).abs().max() / ref.abs().max()).item() < 1e-5, scale

# the tensor-core kernel at a few tokens per expert (T 9: 18 slots over 7 experts), with the family's own
# gating and biases (GPT-OSS) and explicit tiles (K split on both launches, gate/up then in float32,
# gating after it; K tiles of 32 and 64 inside and across the 3-bit units)
for family, bits, T, tiles in (("mixtral", [3, 3, 2, 2, 2, 2, 1, 1], 9, None),
                               ("gpt_oss", [8, 4, 3, 2, 1, 8, 4, 3], 20, None),
                               ("gpt_oss", [8, 8, 4, 4, 3, 3, 1, 2], 9,
                                (tx.Tiles(16, 32, 32, 2), tx.Tiles(16, 16, 64, 3)))):
    g = make(family, bits)
    assert tx.choose_kernel(T, 2, E) == "mma"
    for dtype in (torch.float32, torch.float16):
        gd = g.to(dtype)
        x = torch.randn(T, H, generator=gen).to(dtype); idx, w = routing(T, gen, dtype)
        ref = dequantize_experts_forward(gd, x, idx, w)
        got = tx.fused_experts(x, idx, w, gd.packed(gd.gate_kind), gd.packed("down_proj"), gated=True,
                               fuse_silu=gd._silu_gate(), activation=gd._apply_gate, tiles=tiles)
        err = ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
        assert got.dtype == dtype and err < (1e-5 if dtype == torch.float32 else 2e-2), (family, bits, T, tiles, err)

# where rows are not whole words (hidden 80) or a word would span two groups (group size 16), the
# fused kernels do not apply: "auto" runs the dequantize path, "fused" is a one-line error
import pytest
config16 = MixtralConfig(hidden_size=80, intermediate_size=96, num_local_experts=E)
with torch.device("meta"):
    template16 = MixtralExperts(config16)
odd = random_packed_experts(template16, config16, {"gate_up_proj": (192, 80), "down_proj": (80, 96)},
                            [3, 3, 2, 2, 2, 2, 1, 1], 16)
assert odd.packed("gate_up_proj").words is None and odd.packed("down_proj").words is None
assert not odd.fused_applies()
with pytest.raises(ValueError, match="multiples of 32"):
    set_experts_backend(odd, "fused")
x = torch.randn(1, 80, generator=gen); idx, w = routing(1, gen, torch.float32)
assert torch.equal(odd(x, idx, w), dequantize_experts_forward(odd, x, idx, w))

# a token routed nowhere real changes nothing else: all-zero output rows stay zero
idx, w = routing(4, gen, torch.float32)
out = tx.fused_experts(torch.zeros(4, H), idx[:4], w[:4], m.packed("gate_up_proj"), m.packed("down_proj"),
                       gated=True, fuse_silu=True)
assert torch.equal(out, torch.zeros(4, H))

# a quantized linear goes through the same kernel as one expert that every token uses
from moeq.quant.format import linear_tensors
from moeq.quant.modules import QuantLinear
for bits in (1, 2, 3, 4, 8):
    lin = QuantLinear(96, 40, bits, 32, bias=True, dtype=torch.float32, device="cpu")
    zero = torch.rand(40, 3, generator=gen) if bits == 1 else torch.randint(0, 2 ** bits, (40, 3), generator=gen).float()
    state = linear_tensors(torch.randint(0, 2 ** bits, (40, 96), generator=gen), torch.rand(40, 3, generator=gen) * 0.1,
                           zero, bits)
    lin.load_state_dict({**state, "bias": torch.randn(40, generator=gen)}, assign=True)
    assert lin.packed().words is not None       # up to 16 tokens through the decode kernel, more the tensor cores
    for shape in ((1, 96), (2, 7, 96), (300, 96)):
        x = torch.randn(*shape, generator=gen)
        lin.backend = "dequantize"; ref = lin(x)
        lin.backend = "fused"; got = lin(x)
        assert got.shape == ref.shape and ((got - ref).abs().max() / ref.abs().max()).item() < 1e-5, (bits, shape)
print("ok")
"""


def test_fused_experts_kernel_matches_reference():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout[-2000:] + r.stderr[-3000:]


def test_backend_choice():
    """auto: the reference on CPU; an unknown backend is a one-line error naming the choices."""
    import pytest
    import torch
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    from moeq.quant.modules import set_experts_backend
    from moeq.utils.synthetic import random_packed_experts
    config = MixtralConfig(hidden_size=32, intermediate_size=64, num_local_experts=4)
    with torch.device("meta"):
        template = MixtralExperts(config)
    m = random_packed_experts(template, config, {"gate_up_proj": (128, 32), "down_proj": (32, 64)}, [2, 3, 1, 4], 32)
    assert m.backend == "auto" and m.fused_applies()
    with pytest.raises(ValueError, match="auto, fused, grouped, dequantize"):
        set_experts_backend(m, "fast")
    assert set_experts_backend(m, "dequantize") == 1 and m.backend == "dequantize"


def test_gemv_tiles_choice():
    """The decode kernel splits K until there are about programs_per_sm programs per SM: a
    Qwen3-shaped gate/up launch at one token (8 slots, 192 programs) in two, a Mixtral-shaped one
    (2 slots, 448 programs) not at all; the down projection to ~8 programs per SM."""
    from moeq.quant import triton_experts as tx
    qwen_up = tx.choose_gemv_tiles(8, 768, 2048, 132, programs_per_sm=2)
    assert (qwen_up.block_n, qwen_up.num_warps, qwen_up.split_k) == (32, 2, 2)
    assert tx.choose_gemv_tiles(2, 14336, 4096, 132, programs_per_sm=2).split_k == 1
    down = tx.choose_gemv_tiles(2, 4096, 14336, 132, programs_per_sm=8)
    assert (down.block_n, down.split_k) == (32, 5)


def test_auto_backend_choice():
    """auto on a GPU: fused up to 128 routed tokens per expert, grouped above, except where the grouped
    path's dequantized experts would pass the memory cap (DeepSeek-V3's 256 experts: 15 GB of bf16
    gate/up), where the fused kernels (or, if they do not take the layer, the per-expert loop) run."""
    from moeq.quant.modules import GROUPED_MAX_STACK_BYTES, auto_backend

    mixtral = 8 * 2 * 14336 * 4096 * 2
    deepseek = 256 * 2 * 2048 * 7168 * 2
    assert mixtral <= GROUPED_MAX_STACK_BYTES < deepseek
    choose = lambda T, k, E, stack, fused=True: auto_backend(T, k, E, stack, gpu=True, fused_applies=fused)  # noqa
    assert auto_backend(4096, 2, 8, mixtral, gpu=False, fused_applies=True) == "dequantize"
    assert choose(512, 2, 8, mixtral) == "fused"              # 128 a expert
    assert choose(513, 2, 8, mixtral) == "grouped"
    assert choose(8192, 8, 256, deepseek) == "fused"          # 256 a expert, but 15 GB to dequantize
    assert choose(8192, 8, 256, deepseek, fused=False) == "dequantize"
    assert choose(16, 2, 8, mixtral, fused=False) == "grouped"

#!/usr/bin/env python
"""The fused mixed-bit experts kernel on the GPU: agreement with the reference, then speed.

    python benchmarks/bench_experts_kernel.py --check --layer mixtral8x7b qwen3-30b-a3b --generate --json_out F

1. ``--check``: on small shapes, bf16 and fp16, the fused kernels (quant/triton_experts.py)
   against the reference path (each routed expert dequantized, then matmuls): every width
   alone and 3/3/2/2/2/2/1/1 in one layer, T = 1 .. 4096 tokens, an expert that gets no
   token, Mixtral-style (SwiGLU fused) and GPT-OSS-style (own gating, biases) experts, and a
   packed linear; the grouped backend (one dequantization launch, grouped GEMMs) the same. Prints the largest relative difference per case; exits 1 on a failure.
2. ``--layer SHAPE ...``: one MoE layer of the real shape (random weights; random top-k
   routing over all experts), T tokens in: bf16 experts with each implementation
   transformers offers (grouped_mm, batched_mm, eager) against the packed layer at
   3/3/2/2/2/2/1/1 (the first 8 experts' pattern repeated for more experts), uniform 1, 2, 3
   and 4 bits, fused and dequantize backends (and grouped from T = 64); median of CUDA-event timings after a
   warm-up at the same T. At T = 1, bytes of the routed experts read per second against the
   GPU's peak.
3. ``--generate``: 8 Mixtral-8x7B-shaped layers (random weights): greedy generation of 64
   new tokens after a 32-token prompt at batch 1 and 16, bf16 (grouped_mm, eager) against the
   packed model (experts mixed as above, attention 4 bits), warmed up at the same lengths.
4. ``--sweep``: the tensor-core kernel's tile sizes for the mixed layers (--layer, default both) at
   --tokens; ``--gemv_sweep`` the decode kernel's; ``--dequant_sweep`` the grouped path's
   one-launch dequantization.
5. ``--profile``: torch.profiler tables (CUDA time per kernel) for that layer, both backends.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from moeq.inference import greedy_generate
from moeq.quant import triton_experts as tx
from moeq.quant.modules import QuantExperts, dequantize_experts_forward, set_experts_backend
from moeq.utils.synthetic import random_packed_experts, random_packed_linear
from moeq.utils.timing import call_ms

MIXED = [3, 3, 2, 2, 2, 2, 1, 1]
SHAPES = {  # model_type, hidden, expert intermediate, experts, top-k
    "mixtral8x7b": ("mixtral", 4096, 14336, 8, 2),
    "qwen3-30b-a3b": ("qwen3_moe", 2048, 768, 128, 8),
}
DEV = "cuda"    # --smoke: "cpu" (Triton's interpreter), tiny shapes, to try this script without a GPU
SMALL = dict(H=512, I=1024, T=(1, 7, 64, 333, 4096), gen=(4096, 14336, 32000), layers=8, new_tokens=64)
PEAK_GBS = {"H100": 3350.0, "H200": 4800.0}   # HBM3 / HBM3e spec sheets (SXM)
RESULTS: dict = {}


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def log(*a):
    print(*a, flush=True)


def experts_template(model_type, hidden, inter, experts, top_k):
    from transformers import AutoConfig
    if model_type == "mixtral":
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts as cls
        config = AutoConfig.for_model("mixtral", hidden_size=hidden, intermediate_size=inter,
                                      num_local_experts=experts, num_experts_per_tok=top_k)
    elif model_type == "qwen3_moe":
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts as cls
        config = AutoConfig.for_model("qwen3_moe", hidden_size=hidden, moe_intermediate_size=inter,
                                      num_experts=experts, num_experts_per_tok=top_k)
    else:
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts as cls
        config = AutoConfig.for_model("gpt_oss", hidden_size=hidden, intermediate_size=inter,
                                      num_local_experts=experts, num_experts_per_tok=top_k)
    return cls, config


def packed_layer(model_type, hidden, inter, experts, top_k, bits, seed=0, dtype=torch.bfloat16):
    cls, config = experts_template(model_type, hidden, inter, experts, top_k)
    with torch.device("meta"):
        template = cls(config)
    return random_packed_experts(template, config, {"gate_up_proj": (2 * inter, hidden), "down_proj": (hidden, inter)},
                                 bits, 128, device=DEV, seed=seed, bias_dtype=dtype)


def routing(T, experts, top_k, dtype, gen, starve=None):
    logits = torch.randn(T, experts, device=DEV, generator=gen)
    if starve is not None:
        logits[:, starve] = -1e9
    w, idx = torch.topk(logits.softmax(-1), top_k, dim=-1)
    return idx, (w / w.sum(-1, keepdim=True)).to(dtype)


def rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def t_span() -> str:
    """The token counts --check ran (all of SMALL["T"], or --check_tokens)."""
    ts = SMALL["T"]
    return f"{ts[0]}..{ts[-1]}" if len(ts) > 4 else ", ".join(map(str, ts))


def check() -> bool:
    ok = True
    gen = torch.Generator(device=DEV).manual_seed(0)
    H, I, E = SMALL["H"], SMALL["I"], 8
    cases = [("mixtral", [b] * E) for b in (1, 2, 3, 4, 8)] + [("mixtral", MIXED), ("gpt_oss", [8, 4, 3, 2, 1, 8, 4, 3])]
    for family, bits in cases:
        for dtype in (torch.bfloat16, torch.float16):
            m = packed_layer(family, H, I, E, 2, bits, dtype=dtype)
            worst = {"fused": 0.0, "grouped": 0.0}
            same = {"fused": True, "grouped": True}   # a second call gives the same bits (no atomics)
            for T in SMALL["T"]:
                x = torch.randn(T, H, device=DEV, generator=gen).to(dtype)
                idx, w = routing(T, E, 2, dtype, gen, starve=E - 1)
                ref = dequantize_experts_forward(m, x, idx, w)
                for backend in worst:
                    set_experts_backend(m, backend)
                    got = m(x, idx, w)
                    worst[backend] = max(worst[backend], rel(got, ref))
                    same[backend] &= torch.equal(got, m(x, idx, w))
            tol = 3e-2 if dtype == torch.bfloat16 else 1e-2
            for backend, err in worst.items():
                good = err < tol and same[backend]
                ok &= good
                log(f"check experts {backend:7s} {family:8s} bits {bits} {str(dtype):15s} T {t_span()}: max rel diff "
                    f"{err:.2e}, two calls {'equal' if same[backend] else 'DIFFER'} {'ok' if good else 'FAIL'}")
                RESULTS.setdefault("check", []).append({"backend": backend, "family": family, "bits": bits,
                                                        "dtype": str(dtype), "max_rel": err,
                                                        "two_calls_equal": same[backend], "ok": good})
    for bits in (1, 2, 3, 4, 8):
        lin = random_packed_linear(SMALL["gen"][0], SMALL["H"], bits, 128, device=DEV, bias=True, dtype=torch.bfloat16)
        worst, same = 0.0, True
        for T in SMALL["T"]:
            x = torch.randn(T, SMALL["gen"][0], device=DEV, generator=gen).to(torch.bfloat16)
            lin.backend = "dequantize"
            ref = lin(x)
            lin.backend = "fused"
            got = lin(x)
            worst = max(worst, rel(got, ref))
            same &= torch.equal(got, lin(x))
        good = worst < 3e-2 and same
        ok &= good
        log(f"check linear bits {bits} bf16 T {t_span()}: max rel diff {worst:.2e}, two calls "
            f"{'equal' if same else 'DIFFER'} {'ok' if good else 'FAIL'}")
    return ok


def timed(fn, reps):
    if DEV == "cpu":   # the interpreter: one call
        return call_ms(fn, torch.device("cpu"))
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    return statistics.median(call_ms(fn, torch.device(DEV)) for _ in range(reps))


def routed_bytes(m: QuantExperts, idx) -> int:
    """Bytes of codes, scales and zero points of the experts ``idx`` routes to."""
    total = 0
    for e in sorted(set(idx.flatten().tolist())):
        for kind, layout in m.layouts.items():
            c, z = layout.code_offsets(), layout.zero_offsets()
            total += (c[e + 1] - c[e]) + (z[e + 1] - z[e]) + layout.rows * layout.groups * 2
    return total


def bench_layer(shape: str, tokens: list[int], dtype=torch.bfloat16):
    model_type, H, I, E, k = SHAPES[shape]
    name = torch.cuda.get_device_name() if DEV == "cuda" else "cpu"
    peak = next((v for key, v in PEAK_GBS.items() if key in name), None)
    gen = torch.Generator(device=DEV).manual_seed(1)
    cls, config = experts_template(model_type, H, I, E, k)
    with torch.device(DEV):
        dense = cls(config).to(dtype)
    for p in dense.parameters():
        torch.nn.init.normal_(p, std=0.02)
    packed = {label: packed_layer(model_type, H, I, E, k, bits) for label, bits in
              (("mixed 3/3/2/2/2/2/1/1", (MIXED * (E // 8 + 1))[:E]),
                                                                        *((f"uniform {b}", [b] * E) for b in (1, 2, 3, 4)))}
    log(f"\n## one {shape} MoE layer ({E} experts, top-{k}, hidden {H}, intermediate {I}), {dtype}, group 128; {name}")
    log("ms: median of timed calls (host time included); graph ms: median CUDA-graph replay of the same call (kernels "
        "only; at T <= 64, for the implementations that capture); routed GB/s: bytes of the routed experts over graph ms")
    log("| T | implementation | ms | x bf16 best | graph ms | x bf16 best (graph) | routed GB/s (T=1, graph) |")
    log("|---|---|---|---|---|---|---|")
    rows = []

    def graph_ms(fn, T, capturable):
        if not capturable or T > 64 or DEV != "cuda":
            return None
        try:
            with torch.no_grad():
                return replay_ms(fn, 100)
        except Exception as exc:  # noqa: BLE001 (report, go on)
            log(f"graph capture: {type(exc).__name__}: {str(exc)[:120]}")
            return None

    def cell(v, best):
        return (f"{v:.3f} | {best / v:.2f}" if v and best else " | ")
    for T in tokens:
        x = torch.randn(T, H, device=DEV, generator=gen).to(dtype)
        idx, w = routing(T, E, k, dtype, gen)
        reps = 50 if T <= 64 else 10
        base, base_graph = {}, {}
        for impl in ("grouped_mm", "batched_mm", "eager"):
            if impl == "batched_mm" and T * k * 2 * I * H * 2 > 20e9:
                continue   # batched_mm gathers a weight copy per routed token: out of memory here
            config._experts_implementation = impl
            try:
                with torch.no_grad():
                    base[impl] = timed(lambda: dense(x, idx, w), reps)
            except Exception as exc:  # noqa: BLE001 (report, go on)
                log(f"bf16 {impl} T={T}: {type(exc).__name__}: {str(exc)[:200]}")
            # eager loops over experts with host syncs: no capture
            base_graph[impl] = graph_ms(lambda: dense(x, idx, w), T, impl != "eager")
        best = min(base.values())
        best_graph = min((v for v in base_graph.values() if v), default=None)
        dense_bytes = len(set(idx.flatten().tolist())) * 3 * H * I * 2
        for impl, ms in base.items():
            g = base_graph.get(impl)
            bw = f"{dense_bytes / g / 1e6:.0f}" if T == 1 and g else ""
            log(f"| {T} | bf16 {impl} | {cell(ms, best)} | {cell(g, best_graph)} | {bw} |")
            rows.append({"shape": shape, "T": T, "impl": f"bf16 {impl}", "ms": ms, "graph_ms": g})
        for label, m in packed.items():
            # grouped (dequantize every expert once, grouped GEMMs) is auto's choice at many tokens
            for backend in ("fused", "grouped", "dequantize") if T >= 64 else ("fused", "dequantize"):
                set_experts_backend(m, backend)
                with torch.no_grad():
                    ms = timed(lambda: m(x, idx, w), reps)
                g = graph_ms(lambda: m(x, idx, w), T, backend == "fused")
                bw = ""
                if T == 1 and g:
                    gbs = routed_bytes(m, idx) / g / 1e6
                    bw = f"{gbs:.0f}" + (f" ({100 * gbs / peak:.0f}% of {peak:.0f})" if peak else "")
                log(f"| {T} | packed {label}, {backend} | {cell(ms, best)} | {cell(g, best_graph)} | {bw} |")
                rows.append({"shape": shape, "T": T, "impl": f"packed {label} {backend}", "ms": ms,
                             "x_bf16_best": best / ms, "graph_ms": g,
                             "x_bf16_best_graph": best_graph / g if g and best_graph else None})
            if T >= 64 and label.startswith("mixed"):
                # the grouped backend with torch's SwiGLU (silu, then the product) in place of its launch
                from moeq.quant.grouped_experts import grouped_experts
                up, down = m.packed(m.gate_kind), m.packed("down_proj")
                with torch.no_grad():
                    ms = timed(lambda: grouped_experts(x, idx, w, up, down, activation=m._activate, swiglu=False),
                               reps)
                log(f"| {T} | packed {label}, grouped, torch SwiGLU | {cell(ms, best)} | | | |")
                rows.append({"shape": shape, "T": T, "impl": f"packed {label} grouped torch SwiGLU", "ms": ms,
                             "x_bf16_best": best / ms})
    RESULTS.setdefault("layer", []).extend(rows)
    dense = packed = None   # free before the next shape
    if DEV == "cuda":
        torch.cuda.empty_cache()


def replay_ms(fn, reps=200):
    """Median milliseconds of ``fn`` captured once in a CUDA graph and replayed (kernels only, no
    host time); on the CPU one plain call."""
    if DEV != "cuda":
        return timed(fn, 1)
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return timed(g.replay, reps)


GEMV_CANDS = [   # (block_n, nw, warps) of both launches, split_k launch 1, split_k launch 2
    (64, 8, 4, 1, 4), (64, 8, 4, 2, 4), (64, 8, 4, 4, 4), (64, 8, 4, 2, 8), (32, 16, 4, 1, 4), (32, 16, 4, 2, 4),
    (32, 8, 2, 1, 4), (32, 8, 2, 2, 4), (128, 8, 8, 1, 4), (128, 8, 8, 2, 4), (64, 8, 2, 1, 4), (64, 8, 2, 2, 4),
    (128, 8, 4, 1, 4), (128, 8, 4, 2, 4)]


def gemv_sweep(shapes=("mixtral8x7b", "qwen3-30b-a3b"), tokens=(1, 16)):
    """The decode kernel's tile candidates (block_n, nw, warps, split_k launch 1, split_k launch 2),
    per layer shape, T and width (uniform 1/2/3/4 bits, and mixed), each timed as CUDA-graph
    replays of the whole fused_experts call (kernels only: no host time), against the default
    tiles and the tensor-core kernel. The same routing for every candidate of a row."""
    for shape in shapes:
        model_type, H, I, E, k = SHAPES[shape]
        layers = {f"uniform {b}": packed_layer(model_type, H, I, E, k, [b] * E) for b in (1, 2, 3, 4)}
        layers["mixed"] = packed_layer(model_type, H, I, E, k, (MIXED * (E // 8 + 1))[:E])
        gen = torch.Generator(device=DEV).manual_seed(5)
        log(f"\n## decode kernel tiles, {shape} layer, CUDA-graph replays (ms): candidates (block_n, nw, warps, "
            f"split_k 1, split_k 2)")
        for T in tokens:
            x = torch.randn(T, H, device=DEV, generator=gen).to(torch.bfloat16)
            idx, w = routing(T, E, k, torch.bfloat16, gen)
            labels = ["gemv default", "mma default"] + [str(c) for c in GEMV_CANDS]
            log(f"\nT {T}, experts {sorted(set(idx.flatten().tolist()))[:16]}")
            log("| tiles | " + " | ".join(layers) + " |")
            log("|---|" + "---|" * len(layers))
            mats = {name: (m.packed("gate_up_proj"), m.packed("down_proj"), dequantize_experts_forward(m, x, idx, w))
                    for name, m in layers.items()}
            for label in labels:   # a row as soon as it is measured (a run cut short keeps its rows)
                if label == "gemv default":
                    kw = dict(kernel="gemv")
                elif label == "mma default":
                    kw = dict(kernel="mma")
                else:
                    bn, nw, warps, sk1, sk2 = eval(label)   # noqa: S307 (our own tuple's repr)
                    kw = dict(kernel="gemv", gemv_tiles=(tx.GemvTiles(bn, nw, sk1, warps),
                                                         tx.GemvTiles(bn, nw, sk2, warps)))
                cells = []
                for name, (up, down, ref) in mats.items():
                    fn = lambda kw=kw: tx.fused_experts(x, idx, w, up, down, gated=True, fuse_silu=True, **kw)  # noqa
                    try:
                        err = rel(fn(), ref)
                        ms = replay_ms(fn)
                        cells.append(f"{ms:.4f}" + ("" if err < 3e-2 else f" (rel diff {err:.1e}!)"))
                        RESULTS.setdefault("gemv_sweep", []).append({"shape": shape, "T": T, "layer": name,
                                                                     "tiles": label, "ms": ms, "rel": err})
                    except Exception as exc:  # noqa: BLE001
                        cells.append(f"{type(exc).__name__}")
                        log(f"{label} {name}: {type(exc).__name__} {str(exc)[:150]}")
                log(f"| {label} | " + " | ".join(cells) + " |")
        layers = None
        if DEV == "cuda":
            torch.cuda.empty_cache()


DEQUANT_CANDS = [(8, 32, 4), (16, 32, 4), (32, 32, 4), (8, 64, 4), (16, 64, 8), (32, 16, 4), (32, 32, 8),
                 (64, 16, 8), (4, 64, 4), (16, 16, 4)]


WORDS_CANDS = [(128, 128, 4), (64, 128, 2), (128, 64, 4), (256, 128, 8), (64, 256, 4), (32, 128, 1)]


def dequant_sweep(shapes=("mixtral8x7b", "qwen3-30b-a3b")):
    """The grouped path's one-launch dequantization (triton_dequant.dequantize_experts_triton) of a
    layer's gate/up experts, every expert with tokens, per tile candidate (rows, units of 8 codes,
    warps) and width, the codes read as bytes; then read as int32 words (dequantize_experts_words),
    per candidate (rows, codes, warps): CUDA-graph replays, and GB/s of bf16 written plus codes,
    scales and zeros read; beside it a plain bf16 copy of the same size (read + write)."""
    from moeq.quant.grouped_experts import dequantize_stack
    for shape in shapes:
        model_type, H, I, E, k = SHAPES[shape]
        layers = {f"uniform {b}": packed_layer(model_type, H, I, E, k, [b] * E) for b in (1, 2, 3, 4)}
        layers["mixed"] = packed_layer(model_type, H, I, E, k, (MIXED * (E // 8 + 1))[:E])
        buf = torch.empty(E, 2 * I, H, device=DEV, dtype=torch.bfloat16)
        copy_ms = replay_ms(lambda: torch.empty_like(buf).copy_(buf))
        log(f"\n## one-launch dequantization of a {shape} layer's gate/up experts ({E} x {2 * I} x {H}), ms (GB/s); "
            f"a bf16 copy of that size: {copy_ms:.3f} ms ({2 * buf.numel() * 2 / copy_ms / 1e6:.0f} GB/s read + write)")
        log("| bytes (rows, units, warps) / words (rows, codes, warps) | " + " | ".join(layers) + " |")
        log("|---|" + "---|" * len(layers))
        counts = torch.ones(E, dtype=torch.int32, device=DEV)   # every expert has tokens
        stacks = {name: m.packed("gate_up_proj") for name, m in layers.items()}
        refs = {name: dequantize_stack(mats, counts, torch.bfloat16, words=False, tiles=DEQUANT_CANDS[0])
                for name, mats in stacks.items()}
        for words, tiles in [(False, t) for t in DEQUANT_CANDS] + [(True, t) for t in WORDS_CANDS]:
            cells = []
            for name, mats in stacks.items():
                try:
                    fn = lambda mats=mats: dequantize_stack(mats, counts, torch.bfloat16, words=words,  # noqa: E731
                                                            tiles=tiles)
                    same = torch.equal(fn(), refs[name])
                    ms = replay_ms(fn)
                    moved = buf.numel() * 2 + mats.codes.numel() + mats.scale.numel() * 4
                    cells.append(f"{ms:.3f} ({moved / ms / 1e6:.0f})" + ("" if same else " DIFFERS"))
                    RESULTS.setdefault("dequant_sweep", []).append({"shape": shape, "layer": name, "tiles": tiles,
                                                                    "words": words, "ms": ms, "same": same})
                except Exception as exc:  # noqa: BLE001
                    cells.append(type(exc).__name__)
                    log(f"{tiles} {name}: {type(exc).__name__} {str(exc)[:150]}")
            log(f"| {'words' if words else 'bytes'} {tiles} | " + " | ".join(cells) + " |")
        layers = stacks = refs = buf = None
        torch.cuda.empty_cache()


def sweep(shapes=("mixtral8x7b", "qwen3-30b-a3b"), tokens=(16, 4096)):
    """The tensor-core kernel (kernel="mma") against the default path (the decode kernel where it
    applies), the dequantize path and bf16 grouped_mm, and its tile candidates (block_m, block_n,
    block_k, split_k launch 2, warps, stages), per layer shape and T."""
    cands = {16: [(16, 128, 128, 1, 4, 2), (16, 128, 128, 2, 4, 2), (16, 128, 128, 4, 4, 2), (16, 256, 128, 1, 8, 2),
                  (16, 128, 128, 1, 4, 3), (16, 128, 256, 1, 8, 2), (16, 64, 128, 2, 4, 2), (16, 128, 64, 2, 4, 3)],
             4096: [(128, 128, 64, 1, 8, 3), (128, 128, 128, 1, 8, 3), (128, 256, 64, 1, 8, 3), (64, 128, 64, 1, 4, 3),
                    (128, 64, 64, 1, 4, 3), (256, 128, 64, 1, 8, 3), (128, 128, 64, 1, 4, 4)]}
    for shape in shapes:
        model_type, H, I, E, k = SHAPES[shape]
        m = packed_layer(model_type, H, I, E, k, (MIXED * (E // 8 + 1))[:E])
        cls, config = experts_template(model_type, H, I, E, k)
        with torch.device(DEV):
            dense = cls(config).to(torch.bfloat16)
        for p in dense.parameters():
            torch.nn.init.normal_(p, std=0.02)
        config._experts_implementation = "grouped_mm"
        gen = torch.Generator(device=DEV).manual_seed(6)
        up, down = m.packed("gate_up_proj"), m.packed("down_proj")
        log(f"\n## tensor-core kernel from words, mixed {shape} layer: tiles (block_m, block_n, block_k, "
            f"split_k 2, warps, stages)")
        for T in tokens:
            x = torch.randn(T, H, device=DEV, generator=gen).to(torch.bfloat16)
            idx, w = routing(T, E, k, torch.bfloat16, gen)
            ref = dequantize_experts_forward(m, x, idx, w)
            reps = 50 if T <= 64 else 10
            with torch.no_grad():
                base = timed(lambda: dense(x, idx, w), reps)
            log(f"T {T:4d} bf16 grouped_mm: {base:.4f} ms")
            for label, fn in (("dequantize", lambda: dequantize_experts_forward(m, x, idx, w)),
                              ("default fused", lambda: tx.fused_experts(x, idx, w, up, down, gated=True, fuse_silu=True)),
                              ("mma default", lambda: tx.fused_experts(x, idx, w, up, down, gated=True, fuse_silu=True,
                                                                       kernel="mma"))):
                try:
                    err = rel(fn(), ref)
                    ms = timed(fn, reps)
                    log(f"T {T:4d} {label}: {ms:.4f} ms, x bf16 {base / ms:.2f} (rel diff {err:.1e})")
                    RESULTS.setdefault("sweep", []).append({"shape": shape, "T": T, "tiles": label, "ms": ms,
                                                                "bf16_ms": base})
                except Exception as exc:  # noqa: BLE001
                    log(f"T {T} {label}: {type(exc).__name__} {str(exc)[:200]}")
            for bm, bn, bk, sk2, warps, stages in cands.get(T, []):
                t1 = tx.Tiles(bm, bn, bk, 1, warps, stages)
                t2 = tx.Tiles(bm, bn, bk, sk2, warps, stages)
                fn = lambda: tx.fused_experts(x, idx, w, up, down, gated=True, fuse_silu=True,  # noqa: E731
                                              kernel="mma", tiles=(t1, t2))
                try:
                    err = rel(fn(), ref)
                    ms = timed(fn, reps)
                    log(f"T {T:4d} mma tiles {bm}, {bn}, {bk}, {sk2}, {warps}, {stages}: {ms:.4f} ms, "
                        f"x bf16 {base / ms:.2f} (rel diff {err:.1e})")
                    RESULTS.setdefault("sweep", []).append({"shape": shape, "T": T, "ms": ms, "bf16_ms": base,
                                                                "tiles": [bm, bn, bk, sk2, warps, stages]})
                except Exception as exc:  # noqa: BLE001
                    log(f"T {T} mma tiles {bm}, {bn}, {bk}, {sk2}, {warps}, {stages}: {type(exc).__name__} "
                        f"{str(exc)[:150]}")
        dense = m = None
        if DEV == "cuda":
            torch.cuda.empty_cache()


def profile():
    """Where a mixed Mixtral layer's time goes (torch.profiler, CUDA time per kernel)."""
    model_type, H, I, E, k = SHAPES["mixtral8x7b"]
    m = packed_layer(model_type, H, I, E, k, MIXED)
    gen = torch.Generator(device=DEV).manual_seed(4)
    for T in (1, 16, 4096):
        x = torch.randn(T, H, device=DEV, generator=gen).to(torch.bfloat16)
        idx, w = routing(T, E, k, torch.bfloat16, gen)
        for backend in ("fused", "dequantize"):
            set_experts_backend(m, backend)
            with torch.no_grad():
                for _ in range(3):
                    m(x, idx, w)
                sync()
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                        torch.profiler.ProfilerActivity.CUDA]) as prof:
                    for _ in range(5):
                        m(x, idx, w)
                    sync()
            log(f"\n## profile, mixed Mixtral layer, T={T}, {backend} (5 calls)")
            log(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))


PROFILE_DECODE = False   # --profile_decode


def profile_decode(model, ids, label, new_tokens=9):
    """Where a decode step's GPU time goes: torch.profiler over greedy_generate without a CUDA
    graph (the kernels the graph replays), less a profile of the prompt's forward alone, per kernel
    and per step."""
    def kernels(n):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            greedy_generate(model, ids, n, cuda_graph=False)
            sync()
        return {e.key: (e.count, e.device_time_total) for e in prof.key_averages() if e.device_time_total > 0}
    with torch.no_grad():
        greedy_generate(model, ids, new_tokens, cuda_graph=False)   # warm-up: compiled kernels, caches
        prompt, run = kernels(1), kernels(new_tokens)
    steps = new_tokens - 1
    per_step = {k: ((c - prompt.get(k, (0, 0))[0]) / steps, (us - prompt.get(k, (0, 0))[1]) / steps)
                for k, (c, us) in run.items()}
    total = sum(us for _, us in per_step.values())
    log(f"\n## decode step GPU time, {label}, batch {ids.shape[0]} (torch.profiler over {steps} eager steps, the "
        f"prompt's forward subtracted): {total / 1000:.3f} ms of kernels a step")
    log("| kernel | calls a step | us a step |")
    log("|---|---|---|")
    for key, (calls, us) in sorted(per_step.items(), key=lambda kv: -kv[1][1])[:18]:
        log(f"| {key[:90]} | {calls:.1f} | {us:.1f} |")


def generate(prompt=32):
    layers, new_tokens = SMALL["layers"], SMALL["new_tokens"]
    from transformers import AutoConfig, AutoModelForCausalLM
    hidden, inter, vocab = SMALL["gen"]
    config = AutoConfig.for_model("mixtral", hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                                  num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
                                  num_experts_per_tok=2, vocab_size=vocab, sliding_window=None)
    torch.manual_seed(0)
    with torch.device(DEV):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    gen = torch.Generator(device=DEV).manual_seed(3)
    prompts = {b: torch.randint(0, vocab, (b, prompt), device=DEV, generator=gen) for b in (1, 16)}
    log(f"\n## greedy generation, {layers} Mixtral-8x7B-shaped layers, {prompt}-token prompt + {new_tokens} new tokens")
    log("tokens/s: batch x new tokens / the whole call's time (prompt forward, eager steps and the CUDA graph's capture "
        "included); decode-step tokens/s: batch / the median step time of the CUDA-graph replays (greedy_generate's "
        "step_ms), the steady decode speed")
    log("| batch | model, how | tokens/s | x bf16 best | x bf16 best generate() | decode-step tokens/s | x bf16 best |")
    log("|---|---|---|---|---|---|---|")
    out = []

    def tok_s(batch, graph=False):
        """Tokens/s of one whole call (prefill included; with ``graph``, greedy_generate's
        capture of the decode step too), after a warm-up call at the same lengths; with ``graph``
        also batch / the median replayed step (else None)."""
        ids = prompts[batch]
        kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        steps = []
        if graph:
            run = lambda: greedy_generate(model, ids, new_tokens, cuda_graph=True, step_ms=steps)   # noqa: E731
        else:
            run = lambda: model.generate(ids, **kw)   # noqa: E731
        with torch.no_grad():
            run()
            sync()
            steps.clear()
            t0 = time.perf_counter()
            tokens = run()
            sync()
        rate = batch * new_tokens / (time.perf_counter() - t0)
        if graph:   # the same tokens as generate()? (bf16 ties may flip an argmax; reported, not asserted)
            with torch.no_grad():
                first = model.generate(ids, **kw)
                same = (first == tokens).float().mean().item()
                again = (first == model.generate(ids, **kw)).float().mean().item()
            log(f"batch {batch}: greedy_generate's tokens equal generate()'s: {100 * same:.1f}%; two generate() "
                f"calls agree on {100 * again:.1f}%")
        replays = steps[2:]   # the first two steps run eagerly (greedy_generate)
        return rate, (1000 * batch / statistics.median(replays) if replays else None)

    def measure(label, batch, graph):
        try:
            return tok_s(batch, graph)
        except Exception as exc:  # noqa: BLE001 (a mode that cannot run here is reported, not fatal)
            log(f"{label} batch {batch}{' CUDA graph' if graph else ''}: {type(exc).__name__}: {str(exc)[:200]}")
            return None, None
    graph_modes = (False, True) if DEV == "cuda" else (False,)
    base = {}
    for batch in (1, 16):
        for impl in ("grouped_mm", "eager"):
            model.set_experts_implementation(impl)
            for graph in graph_modes:
                base[(batch, impl, graph)] = measure(f"bf16 {impl}", batch, graph)
    model.set_experts_implementation("grouped_mm")
    if PROFILE_DECODE:
        profile_decode(model, prompts[1], "bf16 grouped_mm")
    for i, layer in enumerate(model.model.layers):   # pack in place: experts mixed, attention 4 bits
        layer.mlp.experts = packed_layer("mixtral", hidden, inter, 8, 2, MIXED, seed=i)
        layer.mlp.experts.config = model.config      # dispatch as in a loaded model
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            old = getattr(layer.self_attn, name)
            setattr(layer.self_attn, name, random_packed_linear(old.in_features, old.out_features, 4, 128, device=DEV,
                                                                seed=i, dtype=torch.bfloat16))
            del old
        if DEV == "cuda":
            torch.cuda.empty_cache()

    if PROFILE_DECODE:
        set_experts_backend(model, "fused")
        profile_decode(model, prompts[1], "packed fused")

    def how(graph):
        return "greedy_generate, CUDA graph" if graph else "generate"

    def cells(rate, step, best, best_plain, best_step):
        step_cells = f"{step:.1f} | {step / best_step:.2f}" if step and best_step else " | "
        return f"{rate:.1f} | {rate / best:.2f} | {rate / best_plain:.2f} | {step_cells}"
    for batch in (1, 16):
        mine = {key: v for key, v in base.items() if key[0] == batch and v[0]}
        best = max(v[0] for v in mine.values())
        best_plain = max(v[0] for (_, _, g), v in mine.items() if not g)
        best_step = max((v[1] for v in mine.values() if v[1]), default=None)
        for (b, impl, graph), (v, step) in mine.items():
            log(f"| {batch} | bf16 {impl}, {how(graph)} | {cells(v, step, best, best_plain, best_step)} |")
            out.append({"batch": batch, "model": f"bf16 {impl}", "cuda_graph": graph, "tok_s": v,
                        "decode_step_tok_s": step})
        for backend in ("fused", "dequantize"):
            set_experts_backend(model, backend)
            for graph in graph_modes if backend == "fused" else (False,):
                v, step = measure(f"packed {backend}", batch, graph)
                if v:
                    log(f"| {batch} | packed {backend}, {how(graph)} | {cells(v, step, best, best_plain, best_step)} |")
                    out.append({"batch": batch, "model": f"packed {backend}", "cuda_graph": graph, "tok_s": v,
                                "x_bf16_best": v / best, "x_bf16_best_generate": v / best_plain,
                                "decode_step_tok_s": step,
                                "x_bf16_best_decode_step": step / best_step if step and best_step else None})
    RESULTS["generate"] = out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--layer", nargs="*", default=[], choices=sorted(SHAPES))
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 4096])
    ap.add_argument("--generate", action="store_true")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--gemv_sweep", action="store_true", help="the decode kernel's tiles, --layer shapes, --tokens")
    ap.add_argument("--gemv_cands", nargs="+", default=None, metavar="BN,NW,WARPS,SK1,SK2",
                    help="--gemv_sweep's candidates (default: GEMV_CANDS)")
    ap.add_argument("--dequant_sweep", action="store_true", help="the grouped path's dequantization tiles, --layer shapes")
    ap.add_argument("--dequant_cands", nargs="+", default=None, metavar="ROWS,UNITS,WARPS",
                    help="--dequant_sweep's byte-kernel candidates (default DEQUANT_CANDS)")
    ap.add_argument("--words_cands", nargs="+", default=None, metavar="ROWS,CODES,WARPS",
                    help="--dequant_sweep's word-kernel candidates (default WORDS_CANDS)")
    ap.add_argument("--check_tokens", type=int, nargs="+", default=None, help="T values of --check")
    ap.add_argument("--profile", action="store_true", help="torch.profiler tables of a mixed Mixtral layer")
    ap.add_argument("--profile_decode", action="store_true",
                    help="with --generate: torch.profiler of a batch-1 decode step, bf16 and packed")
    ap.add_argument("--json_out", default=None)
    ap.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.smoke:   # tiny shapes on the CPU through Triton's interpreter: the script's own test
        global DEV
        DEV = "cpu"
        SMALL.update(H=128, I=256, T=(1, 5, 40), gen=(256, 256, 512), layers=2, new_tokens=3)
        SHAPES.update({k: (v[0], 128, 256, v[3], v[4]) for k, v in SHAPES.items()})
    elif not torch.cuda.is_available():
        sys.exit("error: this benchmark needs a CUDA GPU (the CPU tests run the kernels through Triton's interpreter)")
    if a.check_tokens:
        SMALL["T"] = tuple(a.check_tokens)
    for given, cands in ((a.words_cands, WORDS_CANDS), (a.dequant_cands, DEQUANT_CANDS), (a.gemv_cands, GEMV_CANDS)):
        if given:   # "A,B,C" -> (A, B, C)
            cands[:] = [tuple(int(v) for v in c.split(",")) for c in given]
    global PROFILE_DECODE
    PROFILE_DECODE = a.profile_decode
    log("command: python " + " ".join(sys.argv))
    log(f"device: {torch.cuda.get_device_name() if DEV == 'cuda' else 'cpu (smoke)'}; torch {torch.__version__}")
    ok = True
    sweeping = a.sweep or a.gemv_sweep or a.dequant_sweep   # --layer then only names the sweeps' shapes
    steps = ([check] if a.check else []) + [lambda s=s: bench_layer(s, a.tokens) for s in a.layer if not sweeping] + \
        ([generate] if a.generate else []) + ([lambda: sweep(a.layer or tuple(SHAPES), a.tokens)] if a.sweep else []) + ([profile] if a.profile else []) + \
        ([lambda: gemv_sweep(a.layer or tuple(SHAPES), a.tokens)] if a.gemv_sweep else []) + \
        ([lambda: dequant_sweep(a.layer or tuple(SHAPES))] if a.dequant_sweep else [])
    for step in steps:
        t0 = time.time()
        try:
            r = step()
            ok &= r is not False
        except Exception as exc:  # noqa: BLE001 (the other steps still run)
            import traceback
            traceback.print_exc()
            log(f"step failed: {type(exc).__name__}: {exc}")
            ok = False
        log(f"[{time.time() - t0:.0f} s]")
        if a.json_out:
            with open(a.json_out, "w") as f:
                json.dump(RESULTS, f, indent=1)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

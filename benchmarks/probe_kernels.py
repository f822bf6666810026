#!/usr/bin/env python
"""Register, spill and shared-memory counts of the packed-weight kernels, and their time
next to a plain Triton byte-to-bf16 copy of the same size (is Triton itself slow here, or
our kernels?). Run under ncu for hardware counters:
    ncu --clock-control none -k regex:"_dequant|_experts_gemm|_copy" -c 6 --section SpeedOfLight \
        --section Occupancy --section LaunchStats --section WarpStateStats python benchmarks/probe_kernels.py
"""
import torch
import triton
import triton.language as tl

from moeq.quant import triton_dequant, triton_experts as tx
from moeq.quant.format import decode_zero  # noqa: F401
from moeq.utils.synthetic import _random_matrix
from moeq.quant.packing import pack_codes


@triton.jit
def _copy(src, dst, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(src + i, mask=i < n, other=0)
    tl.store(dst + i, x.to(tl.float32).to(tl.bfloat16), mask=i < n)


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def show(name, compiled):
    try:
        print(f"{name}: regs {compiled.n_regs} spills {compiled.n_spills} shared {compiled.metadata.shared} "
              f"warps {compiled.metadata.num_warps}", flush=True)
    except Exception as exc:  # noqa: BLE001
        print(name, "no stats:", exc)


def compiled_stats(name, jit_fn):
    for cache in getattr(jit_fn, "device_caches", {}).values():
        for key, k in cache[0].items():
            show(f"{name} {str(key)[-160:]}", k)


def main():
    dev = "cuda"
    gen = torch.Generator(device=dev).manual_seed(0)
    R, C, bits, gs = 28672, 4096, 2, 128
    codes, scale, zero = _random_matrix(R, C, bits, gs, gen, dev)
    q = pack_codes(codes, bits)
    s16 = scale.half()
    n = R * C
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device=dev)
    dst = torch.empty(n, dtype=torch.bfloat16, device=dev)
    c = _copy[(triton.cdiv(n, 1024),)](src, dst, n, BLOCK=1024)
    show("copy uint8->bf16", c)
    ms = bench(lambda: _copy[(triton.cdiv(n, 1024),)](src, dst, n, BLOCK=1024))
    print(f"copy uint8->bf16 {n / 1e6:.0f}M: {ms * 1e3:.0f} us, {3 * n / ms / 1e6:.0f} GB/s", flush=True)
    ms = bench(lambda: dst.copy_(src))
    print(f"torch copy_ uint8->bf16: {ms * 1e3:.0f} us, {3 * n / ms / 1e6:.0f} GB/s", flush=True)
    out = triton_dequant.dequantize_triton(q, s16, zero, bits, C, torch.bfloat16)
    ms = bench(lambda: triton_dequant.dequantize_triton(q, s16, zero, bits, C, torch.bfloat16))
    print(f"dequant {R}x{C} {bits}-bit -> bf16: {ms * 1e3:.0f} us, {(q.numel() + 2 * n) / ms / 1e6:.0f} GB/s",
          flush=True)
    compiled_stats("dequant", triton_dequant._dequant_kernel)
    del out
    # the fused kernel on one expert-sized matrix, 1 token: launch-2 shape (down) and launch-1 (gate/up)
    from moeq.utils.synthetic import random_packed_linear
    for rows, cols in ((28672, 4096), (4096, 14336)):
        lin = random_packed_linear(cols, rows, bits, gs, device=dev, dtype=torch.bfloat16)
        mats = lin.packed()
        x = torch.randn(1, cols, device=dev, dtype=torch.bfloat16)
        for t in (tx.choose_tiles(1, 1, rows, cols, 1, 132, split=True), tx.Tiles(1, 64, 128, 1, 4, 2),
                  tx.Tiles(16, 64, 128, 4, 4, 2)):
            tx.fused_linear(x, mats, t)
            ms = bench(lambda: tx.fused_linear(x, mats, t))
            print(f"fused linear {rows}x{cols} {bits}-bit T=1 tiles {t}: {ms * 1e3:.0f} us, "
                  f"{mats.codes.numel() / ms / 1e6:.0f} GB/s of codes", flush=True)
    compiled_stats("experts gemm", tx._experts_gemm_kernel)


if __name__ == "__main__":
    main()

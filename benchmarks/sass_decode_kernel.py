#!/usr/bin/env python
"""Instruction mix of the experts kernels' inner loops, compiled offline for sm_90 (no GPU needed).

    python benchmarks/sass_decode_kernel.py [--silu] [--tiles 64 8 4]
    python benchmarks/sass_decode_kernel.py --kernel mma [--silu] [--mma_tiles 16 128 128 4 3]

Builds quant/triton_experts._gemv_kernel for an H100 (Triton's own ptxas; bf16 activations,
group 128, launch-2 settings unless --silu), disassembles the cubin with Triton's bundled
nvdisasm and prints, for each backward branch (one inner loop per width, in the order the
compiler laid them out), the instruction count and the most frequent opcodes, plus registers
per thread. Each loop is one tile: BLOCK_N x NW words; divide by the FFMA count to get
instructions per code and row. ``--kernel mma``: the tensor-core kernel (_experts_mma_kernel), tiles
BLOCK_M BLOCK_N BLOCK_K warps stages; a loop is one K tile, BLOCK_N x BLOCK_K codes over the threads
(one FFMA per code). Runs with or without torch (a stub stands in: the kernels do
not use it); with the GPU's Triton version the figures are those of the GPU's code.
"""
from __future__ import annotations

import argparse
import collections
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import types

try:
    import torch  # noqa: F401
except ImportError:  # the kernels need no torch; the module only names it
    sys.modules["torch"] = types.ModuleType("torch")
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
MMA_SIG = {"a_ptr": "*bf16", "out_ptr": "*fp32", "words_ptr": "*i32", "word_off_ptr": "*i64", "bits_ptr": "*i32",
           "scale_ptr": "*fp16", "zero_ptr": "*fp16", "bias_ptr": "*fp16", "order_ptr": "*i64", "counts_ptr": "*i32",
           "starts_ptr": "*i32", "SPAN": "i32", "N": "i32", "KW": "i32", "R": "i32", "G": "i32", "TOPK": "i32",
           "M_TILES": "i32", "ONE": "i32"}
SIG = {"a_ptr": "*bf16", "out_ptr": "*fp32", "words_ptr": "*i32", "word_off_ptr": "*i64", "bits_ptr": "*i32",
       "scale_ptr": "*fp16", "zero_ptr": "*fp16", "bias_ptr": "*fp16", "idx_ptr": "*i64", "SPAN": "i32", "N": "i32", "KW": "i32", "R": "i32", "G": "i32", "A_DIV": "i32", "O_DIV": "i32", "ONE": "i32"}


def load_kernels():
    spec = importlib.util.spec_from_file_location("triton_experts_offline", os.path.join(ROOT, "quant", "triton_experts.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def loops(sass: str):
    """(instruction count, opcode counter) of each loop: from a label to the branch back to it."""
    ins, labels = [], {}
    for line in sass.splitlines():
        m = re.match(r"\s*\.(L_x_\d+):", line)
        if m:
            labels[m.group(1)] = len(ins)
            continue
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(.*?);", line)
        if m:
            ins.append(m.group(1).strip())
    for i, text in enumerate(ins):
        m = re.search(r"BRA\s+`?\(?\.?(L_x_\d+)", text)
        if m and m.group(1) in labels and labels[m.group(1)] < i:
            body = ins[labels[m.group(1)]:i + 1]
            yield len(body), collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", x).split()[0] for x in body)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--silu", action="store_true", help="launch 1 (gate and up rows, SwiGLU)")
    ap.add_argument("--tiles", type=int, nargs=3, default=(64, 8, 4), metavar=("BLOCK_N", "NW", "WARPS"))
    ap.add_argument("--kernel", choices=("gemv", "mma"), default="gemv")
    ap.add_argument("--mma_tiles", type=int, nargs=5, default=(16, 128, 128, 4, 3),
                    metavar=("BLOCK_M", "BLOCK_N", "BLOCK_K", "WARPS", "STAGES"))
    args = ap.parse_args()
    tx = load_kernels()
    if args.kernel == "mma":
        fn, base = tx._experts_mma_kernel, MMA_SIG
        bm, bn, bk, warps, stages = args.mma_tiles
        const = dict(GATHER_A=args.silu, SCATTER_OUT=not args.silu, GS=128, SILU=args.silu, HAS_BIAS=False,
                     SPLIT_K=1, ONE_GROUP=True, BLOCK_M=bm,
                     BLOCK_N=bn, BLOCK_K=bk, FP32_DOT=False)
        what = f"tiles BLOCK_M {bm} x BLOCK_N {bn} x BLOCK_K {bk}, {warps} warps, {stages} stages"
    else:
        fn, base, stages = tx._gemv_kernel, SIG, 1
        bn, nw, warps = args.tiles
        const = {"GS": 128, "SILU": args.silu, "HAS_BIAS": False, "SPLIT_K": 1, "BLOCK_N": bn, "NW": nw}
        what = f"tiles BLOCK_N {bn} x NW {nw} words, {warps} warps"
    names = list(fn.arg_names)
    sig = {k: v for k, v in dict(base, **{k: "constexpr" for k in const}).items() if k in names}  # ONE: v7 on
    if args.kernel == "mma" and args.silu:
        sig["out_ptr"] = "*bf16"
    attrs = {(names.index(k),): [["tt.divisibility", 16]] for k, v in sig.items()
             if v.startswith("*") or k in ("N", "KW", "R", "G")}
    k = triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": warps, "num_stages": stages})
    with tempfile.TemporaryDirectory() as d:
        cubin = os.path.join(d, "k.cubin")
        open(cubin, "wb").write(k.asm["cubin"])
        sass = subprocess.run([os.path.join(BIN, "nvdisasm"), "-c", cubin], capture_output=True, text=True,
                              check=True).stdout
        res = subprocess.run([os.path.join(BIN, "cuobjdump"), "-res-usage", cubin], capture_output=True, text=True,
                             check=True).stdout
    regs = re.search(r"REG:(\d+)", res).group(1)
    print(f"command: python benchmarks/sass_decode_kernel.py {' '.join(sys.argv[1:])}")
    spill = re.search(r"STACK:(\d+)", res).group(1)
    print(f"triton {triton.__version__}, sm_90, {fn.__name__}, {what}, "
          f"{'launch 1 (SwiGLU)' if args.silu else 'launch 2'}; registers/thread {regs}, stack bytes {spill}")
    for n, ops in loops(sass):
        if n > 1:
            print(f"loop: {n} instructions, FFMA {ops.get('FFMA', 0)}: "
                  + ", ".join(f"{op} {c}" for op, c in ops.most_common(12)))


if __name__ == "__main__":
    main()

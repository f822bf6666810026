#!/usr/bin/env python
"""Layer quality of GPTQ and RTN on the min-max and the searched grid (quant/quantizer.py).

    python benchmarks/bench_gptq_quality.py                                  # CPU, small shapes
    python benchmarks/bench_gptq_quality.py --paper_repo DIR --float_zero   # + paper repo, + fp16 zeros
    python benchmarks/bench_gptq_quality.py --shape mixtral --device cuda    # one H100: error and seconds

Figure: the relative output error tr(dW H dW^T) / tr(W H W^T) of one layer.
Problems (random, identical for every method): weights W ~ N(0, 0.02^2); calibration
inputs X (4 x cols tokens) = Z + 0.25 Z16 M (a 16-dim common part makes the channels
correlated), times a log-normal scale per channel, with cols/128 outlier channels x8;
H = X^T X / n. Group size 128, asymmetric, percdamp 0.01, no act_order.

--shape small: 512 x 1024 and 256 x 512 matrices, seeds --seeds, widths --bits: GPTQ and
  RTN on both grids; with --paper_repo DIR (a local clone of
  github.com/nowazrabbani/moe_quantization; imported at run time, nothing of it is in this
  repo; it needs the `texttable` package) also that repo's own GPTQ (gptq.py with
  utils/quantizer_moe.py, its defaults) and the ratios to it.
--float_zero: also the searched grid with float16 zero points instead of integer ones
  (the checkpoint format has integer zeros; this only measures what fp16 zeros would
  gain), the searched grid at group size 64 (about the same storage as fp16 zeros at
  128), and the bits per weight each layout stores.
--unweighted: also GPTQ on the searched grid with all columns' errors weighed alike, to
  show what weighing them by GPTQ's loss weights 1/U_jj^2 brings.
--shape mixtral: one Mixtral-8x7B layer's experts (real dims, random weights, each expert
  its own H), gate_up (8 x 28672 x 4096) and down (8 x 4096 x 14336) batches at
  3/3/2/2/2/2/1/1 bits: per-expert error and seconds of GPTQ, min-max vs searched grid.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import time

import torch

import moeq.quant.quantizer as Q
from moeq.quant.gptq import gptq_quantize, output_error, rtn_quantize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def problem(rows, cols, seed, device, nsamples=None):
    """W (rows, cols) and H (cols, cols) as described in the module doc."""
    g = torch.Generator(device=device).manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g, device=device)  # noqa: E731
    n = nsamples or 4 * cols
    X = rnd(n, cols) + rnd(n, 16) @ rnd(16, cols) * 0.25
    X *= torch.exp(0.5 * rnd(cols))
    outliers = torch.randperm(cols, generator=g, device=device)[:max(cols // 128, 2)]
    X[:, outliers] *= 8.0
    H = X.T @ X / n
    del X
    return rnd(rows, cols) * 0.02, H


def rel_err(W, W_hat, H):
    return output_error(W.double(), W_hat.double(), H.double())


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(device, fn, *args, **kw):
    sync(device)
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    sync(device)
    return out, time.perf_counter() - t0


# --- the paper repo's GPTQ, imported from a local clone --------------------------------------

def load_paper_gptq(repo):
    sys.path.insert(0, os.path.abspath(repo))
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    import gptq as paper  # its gptq.py, which imports its utils/quantizer_moe.py
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32  # it sets both off
    return paper


def paper_gptq(paper, W, H, bits, groupsize):
    """Its GPTQ class as its quantize_mixtral.py drives it (configure(bits, perchannel=True,
    sym=False, mse=False, pack=False); fasterquant(percdamp=0.01, groupsize, actorder=False)),
    on our H (its add_batch would give 2 H, the same GPTQ). Returns the dequantized W."""
    layer = torch.nn.Linear(W.shape[1], W.shape[0], bias=False, device=W.device)
    layer.weight.data = W.clone()
    g = paper.GPTQ(layer, None, "bench", bits)
    g.quantizer.configure(bits, perchannel=True, sym=False, mse=False, pack=False)
    g.H, g.inp1, g.out1 = H.clone(), None, None
    cuda_sync = torch.cuda.synchronize
    if W.device.type != "cuda":
        torch.cuda.synchronize = lambda *a, **k: None  # it syncs unconditionally
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints a table row per layer
            g.fasterquant(percdamp=0.01, groupsize=groupsize, actorder=False)
    finally:
        torch.cuda.synchronize = cuda_sync
    return layer.weight.data.float()


# --- float16 zero points (a measurement only: the checkpoint stores integer zeros) -----------

def float_zero_params(w, maxq, sym, colw=None):
    """The searched grid with an fp16 zero: min-max and the same shrunk ranges with the
    unrounded zero, then the weighted least-squares scale and offset for the chosen codes."""
    xmin, xmax = Q._range(w, sym)
    span = 0.7 ** (torch.log2(maxq + 1) - 1)
    best = None
    for k in range(Q.N_SHRINK + 1):
        p = 1 - k / Q.N_SHRINK * span
        scale = Q._fp16_scale(p * (xmax - xmin) / maxq)
        zero = Q._fp16(-p * xmin / scale)
        cand = (Q.group_error(w, scale, zero, maxq, colw), scale, zero)
        best = cand if best is None else Q._keep_better(best, cand)
    _, scale, zero = best
    q = Q.quantize_codes(w, scale, zero, maxq)
    c = torch.ones_like(w[..., :1, :]) if colw is None else colw
    cs = c.sum(-1, keepdim=True)
    mq, mw = (c * q).sum(-1, keepdim=True) / cs, (c * w).sum(-1, keepdim=True) / cs
    slope = (c * (q - mq) * (w - mw)).sum(-1, keepdim=True) / (c * (q - mq) ** 2).sum(-1, keepdim=True).clamp(min=1e-30)
    ls = Q._fp16_scale(slope.clamp(min=0))
    ls_zero = Q._fp16((mq * ls - mw) / ls)  # w ~ ls * (q - zero)
    best = Q._keep_better(best, (Q.group_error(w, ls, ls_zero, maxq, colw), ls, ls_zero))
    return best[1], best[2]


@contextlib.contextmanager
def unweighted():
    """The searched grid with every column's error weighed alike (as RTN does), in GPTQ."""
    affine, binary = Q.searched_params, Q.searched_binary_params
    Q.searched_params = lambda w, maxq, sym, colw=None: affine(w, maxq, sym)
    Q.searched_binary_params = lambda w, colw=None: binary(w)
    try:
        yield
    finally:
        Q.searched_params, Q.searched_binary_params = affine, binary


@contextlib.contextmanager
def fp16_zeros():
    searched = Q.searched_params
    Q.searched_params = float_zero_params  # group_params looks it up at call time
    try:
        yield
    finally:
        Q.searched_params = searched


def bits_per_weight(bits, groupsize, zero):
    """Stored bits per weight: the codes, an fp16 scale per group and its zero point
    (``zero`` "int": `bits` bits, "fp16": 16 bits; 1-bit codes always have an fp16 zero)."""
    zero_bits = 16 if zero == "fp16" or bits == 1 else bits
    return bits + (16 + zero_bits) / groupsize


# --- the runs ------------------------------------------------------------------------------------

def run_small(a, device):
    paper = load_paper_gptq(a.paper_repo) if a.paper_repo else None
    summary = {}  # bits -> list of (search/minmax, search/paper, minmax/paper)
    for rows, cols in ((512, 1024), (256, 512)):
        for seed in a.seeds:
            W, H = problem(rows, cols, seed, device)
            print(f"\n{rows} x {cols}, seed {seed}")
            head = f"{'bits':>4} {'gptq-minmax':>12} {'gptq-search':>12} {'search/mm':>9} {'rtn-minmax':>11} " \
                   f"{'rtn-search':>11}"
            if paper:
                head += f" {'paper':>9} {'search/paper':>12} {'mm/paper':>9}"
            if a.float_zero:
                head += f" {'fp16-zero':>10} {'fp16z/search':>12} {'search-g64':>10}"
            if a.unweighted:
                head += f" {'unweighted':>10} {'unw/search':>10}"
            print(head)
            for bits in a.bits:
                mm = gptq_quantize(W[None], H[None], [bits], a.groupsize, grid="minmax")
                se = gptq_quantize(W[None], H[None], [bits], a.groupsize)
                e_mm, e_se = float(rel_err(W[None], mm.weight, H[None])), float(rel_err(W[None], se.weight, H[None]))
                r_mm = float(rtn_quantize(W[None], H[None], [bits], a.groupsize, grid="minmax").loss)
                r_se = float(rtn_quantize(W[None], H[None], [bits], a.groupsize).loss)
                line = f"{bits:>4} {e_mm:>12.6f} {e_se:>12.6f} {e_se / e_mm:>9.3f} {r_mm:>11.6f} {r_se:>11.6f}"
                ratios = [e_se / e_mm]
                if paper:
                    e_pa = float(rel_err(W, paper_gptq(paper, W, H, bits, a.groupsize), H))
                    line += f" {e_pa:>9.6f} {e_se / e_pa:>12.3f} {e_mm / e_pa:>9.3f}"
                    ratios += [e_se / e_pa, e_mm / e_pa]
                if a.float_zero:
                    with fp16_zeros():
                        fz = gptq_quantize(W[None], H[None], [bits], a.groupsize)
                    e_fz = float(rel_err(W[None], fz.weight, H[None]))
                    g64 = gptq_quantize(W[None], H[None], [bits], a.groupsize // 2)
                    e_64 = float(rel_err(W[None], g64.weight, H[None]))
                    line += f" {e_fz:>10.6f} {e_fz / e_se:>12.3f} {e_64:>10.6f}"
                if a.unweighted:
                    with unweighted():
                        uw = gptq_quantize(W[None], H[None], [bits], a.groupsize)
                    e_uw = float(rel_err(W[None], uw.weight, H[None]))
                    line += f" {e_uw:>10.6f} {e_uw / e_se:>10.3f}"
                print(line, flush=True)
                summary.setdefault(bits, []).append(ratios)
    names = ["gptq search/minmax"] + (["gptq search/paper", "gptq minmax/paper"] if paper else [])
    print("\nratios over shapes and seeds (min-max):")
    for bits, rows_ in summary.items():
        cols_ = list(zip(*rows_))
        print(f"  {bits} bits: " + "; ".join(f"{n} {min(c):.3f}-{max(c):.3f}" for n, c in zip(names, cols_)))
    if a.float_zero:
        print("\nstored bits per weight (fp16 scale per group; zero: integer of `bits` bits, or fp16):")
        for bits in a.bits:
            print(f"  {bits} bits: " + "; ".join(
                f"g{gs} int {bits_per_weight(bits, gs, 'int'):.4f} fp16 {bits_per_weight(bits, gs, 'fp16'):.4f}"
                for gs in (128, 64, 32)))


def run_mixtral(a, device):
    E, Hd, I = a.experts, a.hidden, a.intermediate
    bits = ([3, 3, 2, 2, 2, 2, 1, 1] * E)[:E]
    print(f"{E} experts, hidden {Hd}, intermediate {I}, bits {bits}, group size {a.groupsize}")
    total = {"minmax": 0.0, "search": 0.0}
    for name, rows, cols in (("gate_up", 2 * I, Hd), ("down", Hd, I)):
        W = torch.empty(E, rows, cols, device=device)
        H = torch.empty(E, cols, cols, device=device)
        for e in range(E):
            W[e], H[e] = problem(rows, cols, 100 * e + 1, device, a.nsamples or 2 * cols)
        err = {}
        for grid in ("minmax", "search"):
            times = []
            for _ in range(a.repeat):
                res, t = timed(device, gptq_quantize, W, H, bits, a.groupsize, grid=grid)
                times.append(t)
            err[grid] = rel_err(W, res.weight, H).tolist()
            total[grid] += min(times)
            print(f"{name:8s} {grid:7s} seconds " + " ".join(f"{t:.3f}" for t in times) +
                  "  error per expert " + " ".join(f"{x:.5f}" for x in err[grid]), flush=True)
            del res
        print(f"{name:8s} search/minmax error per expert " +
              " ".join(f"{s / m:.3f}" for s, m in zip(err["search"], err["minmax"])))
        del W, H
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"gate_up + down, best of {a.repeat}: minmax {total['minmax']:.3f} s, search {total['search']:.3f} s, "
          f"ratio {total['search'] / total['minmax']:.3f}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=["small", "mixtral"], default="small")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--bits", type=int, nargs="+", default=[1, 2, 3, 4])
    p.add_argument("--groupsize", type=int, default=128)
    p.add_argument("--paper_repo", default=None, help="local clone of nowazrabbani/moe_quantization")
    p.add_argument("--float_zero", action="store_true", help="also measure fp16 zero points (small shape)")
    p.add_argument("--unweighted", action="store_true",
                   help="also GPTQ with the searched grid weighing all columns alike (small shape)")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=14336)
    p.add_argument("--nsamples", type=int, default=None, help="mixtral: calibration tokens per expert (2 x cols)")
    p.add_argument("--repeat", type=int, default=2, help="mixtral: timed runs per grid")
    p.add_argument("--threads", type=int, default=2, help="CPU threads")
    p.add_argument("--shrink", type=int, default=None, help="override quant.quantizer.N_SHRINK (tuning)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.shrink is not None:
        Q.N_SHRINK = a.shrink
    device = torch.device(a.device)
    print("command: python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]))
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {gpu}; torch {torch.__version__}; search: {Q.N_SHRINK} shrunk ranges, zero -1/+1, "
          f"least-squares scale; 1 bit: 2 weighted 2-means steps")
    run_small(a, device) if a.shape == "small" else run_mixtral(a, device)


if __name__ == "__main__":
    main()

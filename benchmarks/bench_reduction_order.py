#!/usr/bin/env python
"""What the summation order of Hessians does to a checkpoint: why several ranks exchange the
Hessians' inputs instead of all-reducing partial Hessians (utils/distributed.py).

    python benchmarks/bench_reduction_order.py [--parts 2 4 8]

Quantizes models/demo-moe (4 MoE layers of 8 experts; 64 x 256 calibration tokens of
data/python-docs; 3/2/1 bits at 2.0 average, attention at 4 bits, group size 32) as one
process does, one running sum per Hessian, batch after batch; then, per --parts N, with every
Hessian summed as N partial sums (the k-th batch that reaches a Hessian goes to partial
k mod N) added at the end: what an all-reduce over N ranks of interleaved batches computes.
Both in float32 (what the pipeline does) and in float64 rounded to float32 at the end.
Prints, per N: the Hessian entries of the first block's experts that differ and their largest
relative difference, the quantized weights that differ (a different code or group scale), and
the mean relative output error over every quantized matrix.
"""
from __future__ import annotations

import argparse
import os

import torch

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def partial_sums(parts: int, dtype):
    """A HessianAccumulator whose sums are ``parts`` partial sums in ``dtype``, added in order
    and rounded to float32 when the Hessian is asked for."""
    from moeq.utils.sequential import HessianAccumulator

    class Partial(HessianAccumulator):
        def __init__(self, dim, device, count=1):
            super().__init__(dim, device, count)
            self.parts = torch.zeros(parts, count, dim, dim, device=device, dtype=dtype)
            self.seen = [0] * count

        def add(self, x, index=0, mask=None):
            from moeq.utils.sequential import real_rows
            x = real_rows(x, mask).to(dtype)
            self.parts[self.seen[index] % parts, index].addmm_(x.T, x)
            self.seen[index] += 1
            self.n[index] += x.shape[0]

        def hessian(self, index=None):
            if not getattr(self, "_normalised", False):
                total = self.parts[0].clone()
                for p in self.parts[1:]:
                    total += p
                self.sum.copy_(total / self.n.clamp(min=1).view(-1, 1, 1).to(total))
                self._normalised = True
            return self.sum if index is None else self.sum[index]
    return Partial


def run(model_dir, windows, accumulator):
    """The quantized model's weights, the first block's expert Hessians, the mean relative error."""
    from transformers import AutoModelForCausalLM

    from moeq.config import QuantConfig
    from moeq.utils import pipeline, sequential
    from moeq.utils.families import family_for
    saved = pipeline.HessianAccumulator, sequential.HessianAccumulator
    pipeline.HessianAccumulator = sequential.HessianAccumulator = accumulator
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        hessians = {}

        def keep(name, W, H, bits, res, first):
            if name.startswith("model.layers.0."):
                hessians[name] = H.clone()
        cfg = QuantConfig(avg_bits=2.0, high_bits=3, mid_bits=2, low_bits=1, groupsize=32, batch_size=8)
        report = pipeline.quantize_model(model, family_for(model), windows, cfg, torch.device("cpu"),
                                         on_experts=keep)
    finally:
        pipeline.HessianAccumulator, sequential.HessianAccumulator = saved
    errs = [row["rel_err"] for row in report.modules if row["rel_err"] is not None]
    return model.state_dict(), hessians, sum(errs) / len(errs)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(HERE, "models", "demo-moe"))
    ap.add_argument("--data", default=os.path.join(HERE, "data", "python-docs"))
    ap.add_argument("--parts", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=256)
    a = ap.parse_args()
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()

    from moeq.utils import data
    from moeq.utils.sequential import HessianAccumulator
    text = data.load_text(a.data)
    windows = data.calibration_windows(data.tokenize(AutoTokenizer.from_pretrained(a.model), text.train),
                                       a.nsamples, a.seqlen, seed=0)
    print(f"command: python benchmarks/bench_reduction_order.py --parts {' '.join(map(str, a.parts))}")
    print(f"{os.path.relpath(a.model, HERE)}: {a.nsamples} x {a.seqlen} calibration tokens, batches of 8, "
          f"torch {torch.__version__}, CPU")
    print(f"{'sum':<24} {'H entries differ':>17} {'max rel dH':>11} {'weights differ':>15} {'mean rel_err':>13}")
    for dtype in (torch.float32, torch.float64):
        ref_w, ref_h, ref_err = run(a.model, windows, HessianAccumulator if dtype == torch.float32
                                    else partial_sums(1, dtype))
        name = "float32" if dtype == torch.float32 else "float64 -> float32"
        print(f"{'one running ' + name:<24} {'':>17} {'':>11} {'':>15} {ref_err:>13.6e}")
        for parts in a.parts:
            w, h, err = run(a.model, windows, partial_sums(parts, dtype))
            dh = [(h[k] != ref_h[k]).sum().item() / h[k].numel() for k in ref_h]
            rel = max(((h[k] - ref_h[k]).abs() / ref_h[k].abs().clamp(min=1e-30)).max().item() for k in ref_h)
            quantized = [k for k in ref_w if k.endswith(("_proj", "_proj.weight")) and ".layers." in k]
            diff = sum((w[k] != ref_w[k]).sum().item() for k in quantized)
            total = sum(ref_w[k].numel() for k in quantized)
            print(f"{f'{parts} partial sums, {name}':<24} {max(dh):>16.2%} {rel:>11.2e} {diff / total:>15.4%} "
                  f"{err:>13.6e}")


if __name__ == "__main__":
    main()

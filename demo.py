#!/usr/bin/env python
"""The method on a small trained MoE, in about a minute on 2 CPU cores, with nothing to download.

    python demo.py [--out out/demo]

models/demo-moe is a ~1M-parameter Mixtral-architecture LM (4 MoE layers of 8 experts,
top-2) trained on the Python documentation and shipped in this repository (how it was
trained: models/demo-moe/train_info.json). The demo quantizes it at 2.0 average bits per
expert weight, four ways, calibrating on data/python-docs/train.txt, and prints the
perplexity of each on the held-out data/python-docs/test.txt beside the unquantized model's:

- mixed 3/2/1 bits, the paper's order (router norm, MaxVar reordering with zeta 3)
- mixed 3/2/1 bits, experts with the most routed calibration tokens first
- uniform 2-bit GPTQ
- uniform 2-bit round-to-nearest (the baseline GPTQ improves on)

Each run writes a packed checkpoint under --out (load it with transformers'
``from_pretrained``), its bit_allocation.json / .png and results.json; the table also goes
to OUT/summary.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RUNS = [  # name, what it is, QuantConfig settings
    ("mixed-paper", "mixed 3/2/1, paper order (combined, zeta 3)", dict(order_type="combined", zeta=3.0)),
    ("mixed-frequency", "mixed 3/2/1, most-routed experts first", dict(order_type="frequency")),
    ("uniform-gptq", "uniform 2-bit GPTQ", dict(mixed_type="uniform")),
    ("uniform-rtn", "uniform 2-bit RTN", dict(mixed_type="uniform", method="rtn")),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(HERE, "models", "demo-moe"), help="the MoE checkpoint")
    ap.add_argument("--data", default=os.path.join(HERE, "data", "python-docs"),
                    help="directory with train.txt (calibration) and test.txt (perplexity)")
    ap.add_argument("--out", default="out/demo", help="where the checkpoints and results go (replaced)")
    ap.add_argument("--nsamples", type=int, default=64, help="calibration samples")
    ap.add_argument("--seqlen", type=int, default=256, help="tokens per sample and per perplexity window")
    a = ap.parse_args(argv)
    try:
        from moeq.api import evaluate_unquantized, prepare_data, quantize
        from moeq.cli import quiet_progress_unless_terminal
        from moeq.config import ConfigError, QuantConfig, RunConfig
    except ModuleNotFoundError as e:
        if e.name != "moeq":
            raise
        sys.exit("error: the moeq package is not installed: run `pip install -e .` in this repository first")

    quiet_progress_unless_terminal()
    t_start = time.time()
    base = RunConfig(model=a.model, dataset=a.data, nsamples=a.nsamples, seqlen=a.seqlen, evaluate=True,
                     device="cpu", verbose=False)
    try:
        data = prepare_data(base)
        rows = [("unquantized", "unquantized (bf16 checkpoint)", None,
                 evaluate_unquantized(base, data)["ppl"]["python-docs"], None)]
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"model {a.model}; calibration {data.info['nsamples']} x {data.info['seqlen']} tokens of "
          f"{a.data}/train.txt; perplexity on {data.info['eval_windows']['python-docs']} windows of test.txt")
    print(f"  {'unquantized':<16} ppl {rows[0][3]:.3f}")
    for name, what, settings in RUNS:
        quant = QuantConfig(avg_bits=2.0, high_bits=3, mid_bits=2, low_bits=1, attn_bits=4, groupsize=32, **settings)
        cfg = RunConfig(model=a.model, quant=quant, dataset=a.data, nsamples=a.nsamples, seqlen=a.seqlen,
                        evaluate=True, device="cpu", verbose=False, saving_path=os.path.join(a.out, name),
                        pack=True, overwrite=True, command=f"python demo.py {' '.join(sys.argv[1:])}")
        result = quantize(cfg, data)
        ppl = result.evaluation["quantized"]["ppl"]["python-docs"]
        rows.append((name, what, result.avg_bits, ppl, result))
        print(f"  {name:<16} ppl {ppl:.3f}   ({result.seconds['quantize']:.1f}s quantize, "
              f"{result.seconds['evaluate']:.1f}s evaluate)")

    fp = rows[0][3]
    print(f"\nperplexity on held-out Python docs (lower is better), {a.model}:")
    print(f"  {'run':<47} {'avg bits':>8} {'stored':>7} {'ppl':>9} {'vs unquantized':>15}")
    for name, what, bits, ppl, r in rows:
        rel = "" if bits is None else f"{100 * (ppl / fp - 1):+.1f}%"
        stored = "16" if r is None else f"{r.report.avg_expert_stored_bits():.2f}"   # with scales and zeros
        print(f"  {what:<47} {'16' if bits is None else f'{bits:.2f}':>8} {stored:>7} {ppl:9.3f} {rel:>15}")
    print("\nbits per expert (layer: experts 0..7), from each run's bit_allocation.json:")
    for name, _, _, _, result in rows[1:3]:
        print(f"  {name}:")
        for layer in result.report.layers:
            print(f"    {layer['name']}: {' '.join(map(str, layer['bits']))}")
    summary = {"command": f"python demo.py {' '.join(sys.argv[1:])}", "model": a.model, "data": a.data,
               "calibration": data.info, "seconds": time.time() - t_start,
               "rows": [{"run": name, "what": what, "avg_bits": bits, "ppl": ppl,
                         "stored_bits_per_expert_weight": None if r is None else r.report.avg_expert_stored_bits(),
                         "checkpoint": None if r is None else r.saved_to} for name, what, bits, ppl, r in rows]}
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"\ncheckpoints, bit allocations (json + png) and results.json in {a.out}/; "
          f"this table in {a.out}/summary.json; {time.time() - t_start:.0f}s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Quantize a decoder-only MoE model (Mixtral family): every expert of a MoE layer gets its
own bit width, chosen by router norm (change) and MaxVar; GPTQ per expert; packed checkpoint.

Example (the paper's setting):
  python quantize_mixtral.py --model Mixtral8x7B --mixed_type mixed --order_type combined \\
    --zeta 3.0 --avg_bits 2.0 --high_bit_level 3 --mid_bit_level 2 --low_bit_level 1 \\
    --attn_bit_level 4 --groupsize 128 --dataset wikitext2 --eval_ppl --pack --save \\
    --saving_path quantized_ckpts/2p0

--dataset: wikitext2 | ptb | c4 (hub), a text file (first 90% of lines calibrate, last 10%
evaluate) or a directory with train and test text files (e.g. train.txt / test.txt).
"""
import sys

try:
    from moeq.cli import main
except ModuleNotFoundError as e:
    if e.name != "moeq":
        raise
    sys.exit("error: the moeq package is not installed: run `pip install -e .` in this repository first")

if __name__ == "__main__":
    sys.exit(main("causal", __doc__))

#!/usr/bin/env python
"""Quantize a Mixtral-family MoE model: per-expert mixed precision chosen by router
norm (change) and MaxVar, GPTQ per expert, optional packed checkpoint.

Example (the paper's setting):
    python quantize_mixtral.py --model Mixtral8x7B --mixed_type mixed --order_type combined \\
      --zeta 3.0 --avg_bits 2.0 --high_bit_level 3 --mid_bit_level 2 --low_bit_level 1 \\
      --attn_bit_level 4 --groupsize 128 --dataset wikitext2 --eval_ppl --pack --save \\
      --saving_path quantized_ckpts/2p0
"""
import sys

from utils.cli import main, run_causal_lm

if __name__ == "__main__":
    sys.exit(main(run_causal_lm, __doc__))

#!/usr/bin/env python
"""Quantize a Switch Transformer (encoder-decoder MoE): experts ordered by the change of
their router-row norm from the pretrained checkpoint (--reference_model) to the fine-tuned
one (--model), MaxVar reordering, GPTQ per expert, packed checkpoint.

Example:
  python quantize_switch.py --model FINETUNED_DIR --reference_model PRETRAINED_DIR \\
    --order_type combined --zeta 3.0 --high_bit_level 3 --low_bit_level 2 \\
    --num_high_bit_experts 32 --num_low_bit_experts 32 --dataset DATA --pack --save \\
    --saving_path out/switch

--dataset: cnn_dailymail (hub), a jsonl file of {"source": ..., "target": ...} (first 90%
calibrate, last 10% evaluate) or a directory with train.jsonl and test.jsonl.
"""
import sys

try:
    from moeq.cli import main
except ModuleNotFoundError as e:
    if e.name != "moeq":
        raise
    sys.exit("error: the moeq package is not installed: run `pip install -e .` in this repository first")

if __name__ == "__main__":
    sys.exit(main("seq2seq", __doc__))

#!/usr/bin/env python
"""Quantize a Switch Transformer (encoder-decoder MoE): experts ordered by the change of
their router-row norm from the pretrained checkpoint (--reference_model) to the
fine-tuned one (--model), MaxVar reordering, GPTQ per expert, packed checkpoint.

Example:
    python quantize_switch.py --model FINETUNED_DIR --reference_model PRETRAINED_DIR \\
      --order_type combined --zeta 3.0 --high_bit_level 3 --low_bit_level 2 \\
      --num_high_bit_experts 32 --num_low_bit_experts 32 --dataset DATA --pack --save --saving_path out/switch
"""
import sys

from utils.cli import add_seq2seq_args, main, run_seq2seq

if __name__ == "__main__":
    sys.exit(main(run_seq2seq, __doc__, add_seq2seq_args))

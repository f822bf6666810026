#!/usr/bin/env bash
# One command on a machine with 4 GPUs (nvidia-h200-x4): seconds per layer with 1, 2 and 4 ranks
# (torchrun, NCCL) on DeepSeek-V3- and Mixtral-8x7B-shaped layers, and each packed checkpoint
# against the one-rank one.
#   bash benchmarks/gpu_ranks.sh OUT
set -uo pipefail
out=${1:?usage: benchmarks/gpu_ranks.sh OUT}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python -m pip install -q --no-deps --no-build-isolation -e . > "$out/install.log" 2>&1 || { cat "$out/install.log"; exit 1; }
nvidia-smi --query-gpu=name,memory.total --format=csv > "$out/gpus.txt"
b="python benchmarks/bench_quantize.py --reference_experts 0 --ranks 1 2 4"
timeout 900 $b --layers 1 --shape deepseek-v3 --workdir /tmp/ds --json_out "$out/deepseek_v3_ranks.json" 2>&1 \
  | tee "$out/bench_quantize_deepseek_v3_1l_ranks.txt"
rm -rf /tmp/ds
timeout 600 $b --layers 4 --shape mixtral8x7b --workdir /tmp/mx --json_out "$out/mixtral_ranks.json" 2>&1 \
  | tee "$out/bench_quantize_mixtral_4l_ranks.txt"
rm -rf /tmp/mx

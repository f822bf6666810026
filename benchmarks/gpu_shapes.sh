#!/usr/bin/env bash
# One GPU command: quantization speed and memory at real shapes (random weights).
#   bash benchmarks/gpu_shapes.sh OUT
# Mixtral-8x7B (4 layers; searched grid, then the plain min-max grid on the same checkpoint),
# Qwen3-30B-A3B (4 of its 48 layers), DeepSeek-V3 (1 of its 61 layers: 256 experts in chunks).
set -uo pipefail
out=${1:?usage: benchmarks/gpu_shapes.sh OUT}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python -m pip install -q --no-deps --no-build-isolation -e . > "$out/install.log" 2>&1 || { cat "$out/install.log"; exit 1; }
b="python benchmarks/bench_quantize.py --reference_experts 0"
timeout 150 $b --layers 4 --workdir /tmp/mx --json_out "$out/mixtral_search.json" 2>&1 | tee "$out/bench_quantize_mixtral_4l.txt"
timeout 100 $b --layers 4 --workdir /tmp/mx --quant_grid minmax 2>&1 | tee "$out/bench_quantize_mixtral_4l_minmax.txt"
rm -rf /tmp/mx
timeout 150 $b --layers 4 --shape qwen3-30b-a3b --workdir /tmp/qw --json_out "$out/qwen3.json" 2>&1 | tee "$out/bench_quantize_qwen3_30b_a3b_4l.txt"
rm -rf /tmp/qw
timeout 240 $b --layers 1 --shape deepseek-v3 --workdir /tmp/ds --json_out "$out/deepseek.json" 2>&1 | tee "$out/bench_quantize_deepseek_v3_1l.txt"

#!/usr/bin/env bash
# One GPU command: correctness checks, then quantization speed of Mixtral-8x7B-shaped layers
# for this tree and for the code before the package refactor (.gpu/old: `git archive fa0f04b`),
# side by side on the same machine, then the GPTQ grid benchmark at Mixtral shapes.
#   bash benchmarks/gpu_checks.sh OUT
set -uo pipefail
out=${1:?usage: benchmarks/gpu_checks.sh OUT}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python -m pip install -q --no-deps --no-build-isolation -e . > "$out/install.log" 2>&1 || { cat "$out/install.log"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt"
python benchmarks/check_gpu.py 2>&1 | tee "$out/check_gpu.log"
python benchmarks/bench_quantize.py --layers 4 --reference_experts 0 --workdir /tmp/bq_new 2>&1 | tee "$out/bench_quantize_mixtral_4l.txt"
rm -rf /tmp/bq_new
if [ -d .gpu/old ]; then
  (cd .gpu/old && python benchmarks/bench_quantize.py --layers 4 --reference_experts 0 --workdir /tmp/bq_old) 2>&1 \
    | tee "$out/bench_quantize_mixtral_4l_before.txt"
  rm -rf /tmp/bq_old
fi
python benchmarks/bench_gptq_quality.py --shape mixtral --device cuda 2>&1 | tee "$out/gptq_quality_mixtral_h100.txt"

#!/usr/bin/env bash
# One GPU command: a DeepSeek-V3-shaped layer, then paired timing of Mixtral-8x7B-shaped layers on
# one checkpoint, alternating the code before the package refactor (.gpu/old = `git archive
# fa0f04b`), this tree with the old min-max grid, and this tree as it is (searched grid).
#   bash benchmarks/gpu_timing.sh OUT [REPEATS]
set -uo pipefail
out=${1:?usage: benchmarks/gpu_timing.sh OUT [REPEATS]}
reps=${2:-2}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python -m pip install -q --no-deps --no-build-isolation -e . > "$out/install.log" 2>&1 || { cat "$out/install.log"; exit 1; }
timeout 300 python benchmarks/bench_quantize.py --reference_experts 0 --layers 1 --shape deepseek-v3 --workdir /tmp/ds \
  2>&1 | tee "$out/bench_quantize_deepseek_v3_1l.txt"
rm -rf /tmp/ds
ck=/tmp/mx/mixtral8x7b_4l
python benchmarks/bench_quantize.py --layers 4 --workdir /tmp/mx --_stage make --_path $ck
run() {  # name, script, extra args: one RESULT line per run
  echo "$1 $(python "$2" --layers 4 --reference_experts 0 --_stage run --_path $ck "${@:3}" | grep '^RESULT ')"
}
for r in $(seq "$reps"); do
  run before .gpu/old/benchmarks/bench_quantize.py >> "$out/paired.txt"
  run minmax benchmarks/bench_quantize.py --quant_grid minmax >> "$out/paired.txt"
  run search benchmarks/bench_quantize.py >> "$out/paired.txt"
done
python - "$out/paired.txt" <<'PY' | tee "$out/paired_summary.txt"
import json, sys
rows = [(l.split(" ", 1)[0], json.loads(l.split("RESULT ", 1)[1])) for l in open(sys.argv[1]) if "RESULT " in l]
print("command: bash benchmarks/gpu_timing.sh OUT; Mixtral-8x7B-shaped, 4 layers, 128 x 2048 tokens; s/layer")
for name in ("before", "minmax", "search"):
    got = [r for n, r in rows if n == name]
    print(f"{name:<7} per layer " + " ".join(f"{r['per_layer_s']:.2f}" for r in got) + "   phases (last run): "
          + ", ".join(f"{k} {v:.2f}" for k, v in got[-1]["phases_s"].items()))
PY

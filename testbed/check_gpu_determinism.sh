#!/usr/bin/env bash
# Same seed, same GPU: same weights? Trains the gpu-preset Mixtral testbed for STEPS steps
# three times side by side (seed 0 twice, seed 1 once: the load of testbed/gpu_run.sh) and
# compares the trained weights bit for bit. Prints the per-run seconds, to project the
# cost of deterministic attention onto gpu_run.sh's 800 steps.
#   MOEQ_DATA=.gpu/data STEPS=60 bash testbed/check_gpu_determinism.sh
set -euo pipefail
data=${MOEQ_DATA:-../shared/data}
steps=${STEPS:-60}
mkdir -p logs
for run in a:0 b:0 c:1; do
  python testbed/train_mixtral.py --data "$data/python-docs" --out "runs/det-${run%%:*}" --seed "${run##*:}" \
    --preset gpu --steps "$steps" --overwrite > "logs/det-${run%%:*}.log" 2>&1 &
done
wait
grep -h "^trained" logs/det-*.log
python - <<'PY'
import torch
from safetensors.torch import load_file
w = {r: load_file(f"runs/det-{r}/trained/model.safetensors") for r in "abc"}
def diff(x, y):
    return sum(int((w[x][k].float() != w[y][k].float()).sum()) for k in w[x])
n = sum(t.numel() for t in w["a"].values())
print(f"seed 0 vs seed 0: {diff('a', 'b')} of {n} weights differ")
print(f"seed 0 vs seed 1: {diff('a', 'c')} of {n} weights differ (must be > 0)")
PY

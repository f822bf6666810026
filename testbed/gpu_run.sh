#!/usr/bin/env bash
# The testbed grid in one GPU command (~10 min on one H100): three seeds of the Mixtral
# testbed trained side by side (the small models leave the GPU mostly idle), then the full
# paper grid, one reproduce_tables.py process per model. Writes to OUT: runs.jsonl (all
# models), logs.tgz (training and grid logs), training.tgz (loss curves, train_info.json).
# STAGE=train|grid|all (default all) splits it over two commands on a warm machine: the
# grid resumes from runs/grid-gpu-s*/runs.jsonl. GRID_LIMIT (seconds) stops the grid processes
# in time for the results to be collected; a later grid call goes on where they stopped.
# Locally: copy runs.jsonl into a results folder and rebuild the table with
#   python reproduce_tables.py --model runs/mixtral-gpu-s{0,1,2}/trained --dataset x --out DIR --report_only
set -uo pipefail
out=${1:?usage: testbed/gpu_run.sh OUT [reproduce_tables.py args]}
shift
data=${MOEQ_DATA:-../shared/data}
steps=${STEPS:-1000}
stage=${STAGE:-all}
grid_limit=${GRID_LIMIT:-0}
mkdir -p "$out" logs
if [[ $stage == train || $stage == all ]]; then
aux=()
if ! python testbed/train_mixtral.py --data "$data/python-docs" --out /tmp/smoke --preset smoke --steps 3 \
     --overwrite > logs/smoke.log 2>&1; then
  echo "router aux loss failed on this transformers (see logs/smoke.log): training without it"; aux=(--aux_loss_coef 0)
fi
t0=$(date +%s)
for s in 0 1 2; do
  python testbed/train_mixtral.py --data "$data/python-docs" --out runs/mixtral-gpu-s$s --seed $s --preset gpu \
    --steps "$steps" --overwrite "${aux[@]}" > logs/train_s$s.log 2>&1 &
done
wait
echo "training: $(( $(date +%s) - t0 )) s"; grep -h "^trained" logs/train_s*.log
fi
if [[ $stage == grid || $stage == all ]]; then
t0=$(date +%s)
for s in 0 1 2; do
  [[ -f runs/mixtral-gpu-s$s/trained/config.json ]] || { echo "no trained model for seed $s: run STAGE=train first"; exit 1; }
  timeout "$grid_limit" python reproduce_tables.py --model runs/mixtral-gpu-s$s/trained --router_reference runs/mixtral-gpu-s$s/init \
    --dataset "$data/python-docs" --eval_dataset "$data/python-docs" "$data/wikitext-2" --out runs/grid-gpu-s$s \
    --nsamples 128 --seqlen 512 --batch_size 16 "$@" >> logs/grid_s$s.log 2>&1 &
done
wait
echo "grid: $(( $(date +%s) - t0 )) s"; wc -l runs/grid-gpu-s*/runs.jsonl
cat runs/grid-gpu-s*/runs.jsonl > "$out/runs.jsonl"
fi
tar czf "$out/logs.tgz" logs
tar czf "$out/training.tgz" runs/mixtral-gpu-s*/train_info.json runs/mixtral-gpu-s*/loss_curve.json

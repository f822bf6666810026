#!/usr/bin/env bash
# The testbed grid in one GPU command (~10 min on one H100): three seeds of the Mixtral
# testbed trained side by side (the small models leave the GPU mostly idle), then the full
# paper grid, one reproduce_tables.py process per model. Writes to OUT: runs.jsonl (all
# models), logs.tgz (training and grid logs), training.tgz (loss curves, train_info.json).
# STAGE=train|grid|all (default all) splits it over two commands on a warm machine: the
# grid resumes from runs/grid-gpu-s*/runs.jsonl. GRID_LIMIT (seconds) stops the grid processes
# in time for the results to be collected; a later grid call goes on where they stopped.
# GRIDS (default "search") lists the quantization grids (--quant_grid) to run, each into its own
# runs/grid-gpu-GRID-s* and OUT/runs_GRID.jsonl; ROWS (default: every row) and ROWS_MINMAX (rows of
# the min-max grid, default ROWS) select row ids (reproduce_tables.py --rows).
# Locally: copy runs.jsonl into a results folder and rebuild the table with
#   python reproduce_tables.py --model runs/mixtral-gpu-s{0,1,2}/trained --dataset x --out DIR --report_only
set -uo pipefail
python -m pip install -q --no-deps --no-build-isolation -e . > /dev/null 2>&1 || { echo "pip install -e . failed"; exit 1; }
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
for g in ${GRIDS:-search}; do
  rows=${ROWS:-}
  [[ $g == minmax && -n ${ROWS_MINMAX:-} ]] && rows=$ROWS_MINMAX
  set -f; read -ra rowargs <<< "$rows"; set +f   # row ids are globs for reproduce_tables, not for the shell
  [[ ${#rowargs[@]} -gt 0 ]] && rowargs=(--rows "${rowargs[@]}")
  for s in 0 1 2; do
    [[ -f runs/mixtral-gpu-s$s/trained/config.json ]] || { echo "no trained model for seed $s: run STAGE=train first"; exit 1; }
    timeout "$grid_limit" python reproduce_tables.py --model runs/mixtral-gpu-s$s/trained --router_reference runs/mixtral-gpu-s$s/init \
      --dataset "$data/python-docs" --eval_dataset "$data/python-docs" "$data/wikitext-2" --out runs/grid-gpu-$g-s$s \
      --nsamples 128 --seqlen 512 --batch_size 16 --quant_grid "$g" "${rowargs[@]}" "$@" >> logs/grid_${g}_s$s.log 2>&1 &
  done
done
wait
echo "grid: $(( $(date +%s) - t0 )) s"
for g in ${GRIDS:-search}; do wc -l runs/grid-gpu-$g-s*/runs.jsonl; cat runs/grid-gpu-$g-s*/runs.jsonl > "$out/runs_$g.jsonl"; done
fi
tar czf "$out/logs.tgz" logs
tar czf "$out/training.tgz" runs/mixtral-gpu-s*/train_info.json runs/mixtral-gpu-s*/loss_curve.json

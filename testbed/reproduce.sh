#!/usr/bin/env bash
# Train the Mixtral testbed (three seeds) and run the paper's grid on it.
#
#   bash testbed/reproduce.sh gpu results/mixtral-gpu     # one H100: see README "Reproducing the tables"
#   bash testbed/reproduce.sh cpu results/mixtral-cpu     # 2 CPU cores: ~15 min training + ~16 min grid
#
# Checkpoints go to runs/ (git-ignored); a checkpoint that exists is not retrained, and
# the grid resumes from OUT/runs.jsonl, so an interrupted run continues where it stopped.
# OUT receives the grid (table.md, results.json, bits_vs_ppl.png, runs.jsonl) and the
# training records (training/seed*_{loss_curve.json,train_info.json,loss_curve.png}).
# Extra arguments go to reproduce_tables.py. Text: $MOEQ_DATA (default ../shared/data).
set -euo pipefail
preset=${1:?usage: testbed/reproduce.sh gpu|cpu|smoke OUT [reproduce_tables.py args]}
out=${2:?usage: testbed/reproduce.sh gpu|cpu|smoke OUT [reproduce_tables.py args]}
shift 2
data=${MOEQ_DATA:-../shared/data}
[ -d "$data/python-docs" ] || { echo "error: $data/python-docs not found: set MOEQ_DATA to the data folder" >&2; exit 2; }
seeds=${SEEDS:-0 1 2}

case $preset in
  gpu) grid=(--nsamples 128 --seqlen 512 --batch_size 16) ;;
  # cpu: 32 calibration windows, 64 test windows per eval set (2 CPU cores; run with
  # OMP_NUM_THREADS=1 when anything else runs: two 2-thread torch processes thrash).
  cpu) grid=(--nsamples 32 --seqlen 256 --batch_size 8 --eval_windows 64) ;;
  smoke) grid=(--nsamples 8 --seqlen 64 --batch_size 4 --eval_windows 8 --groupsize 32) ;;
  *) echo "error: preset $preset: choose gpu, cpu or smoke" >&2; exit 2 ;;
esac

models=() refs=()
mkdir -p "$out/training"
for s in $seeds; do
  run=runs/mixtral-$preset-s$s
  if [ ! -f "$run/trained/config.json" ]; then
    python testbed/train_mixtral.py --data "$data/python-docs" --out "$run" --seed "$s" --preset "$preset" --overwrite
  fi
  for f in loss_curve.json train_info.json loss_curve.png; do
    [ -f "$run/$f" ] && cp "$run/$f" "$out/training/seed${s}_$f"
  done
  models+=("$run/trained") refs+=("$run/init")
done

python reproduce_tables.py --model "${models[@]}" --router_reference "${refs[@]}" \
  --dataset "$data/python-docs" --eval_dataset "$data/python-docs" "$data/wikitext-2" \
  --out "$out" "${grid[@]}" "$@"

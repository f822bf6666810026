#!/usr/bin/env bash
# Issue 17's study, one command per regime: train the regime's models (those not trained yet),
# measure every expert alone (expert_sensitivity.py: the pre-registered analysis and its plot),
# then the grid rows of the orders, sensitivity, oracle and anti_oracle (reproduce_tables.py).
#
#   bash testbed/sensitivity.sh cpu results/sensitivity-cpu mixtral          # 3 seeds, top-2, aux loss 0.01
#   bash testbed/sensitivity.sh cpu results/sensitivity-cpu mixtral-top1     # 1 seed, top-1 routing
#   bash testbed/sensitivity.sh cpu results/sensitivity-cpu mixtral-noaux    # 1 seed, no load-balancing loss
#   bash testbed/sensitivity.sh cpu results/sensitivity-cpu switch           # 2 seeds, pretrain -> fine-tune
#   bash testbed/sensitivity.sh gpu $OUT mixtral                             # one H100 (see results/sensitivity-cpu/README.md)
#
# Presets: gpu (the 51M testbed, models trained side by side, one grid process per model),
# cpu (the 4.4M testbed, one thing at a time), smoke (seconds: tests the script).
# OUT/REGIME gets sensitivity-*.json, analysis.{json,md}, sensitivity_vs_router_change.png,
# grid/ (runs.jsonl, table.md, results.json, bits_vs_ppl.png) and training/ (train_info.json,
# loss curves). Checkpoints go to runs/ (git-ignored); everything resumes where it stopped.
# Every stage ends with its seconds, and the "stage ..." lines of its processes' logs (where the
# time went inside them: data, training, quantization phases, scoring, grid rows).
# Env: MOEQ_DATA (text, default ../shared/data), STEPS (training steps, Mixtral; gpu default 500), DEADLINE
# (seconds from the start after which measurement and grid processes are stopped, to be resumed
# by the same command again; 0: none), ROWS (grid row globs).
set -euo pipefail
preset=${1:?usage: testbed/sensitivity.sh gpu|cpu|smoke OUT REGIME...}
out=${2:?usage: testbed/sensitivity.sh gpu|cpu|smoke OUT REGIME...}
shift 2
[[ $# -gt 0 ]] || { echo "usage: testbed/sensitivity.sh gpu|cpu|smoke OUT mixtral|mixtral-top1|mixtral-noaux|switch..." >&2; exit 2; }
data=${MOEQ_DATA:-../shared/data}
# training, measurement and grid tokenize the same train split with the same BPE: once is enough
export MOEQ_TOKEN_CACHE=${MOEQ_TOKEN_CACHE:-runs/token-cache}
deadline=${DEADLINE:-0}
start=$(date +%s)
[[ -d $data/python-docs ]] || { echo "error: $data/python-docs not found: set MOEQ_DATA to the data folder" >&2; exit 2; }
case $preset in
  # gpu: batches of 64 windows (32k tokens): fewer, fuller kernel launches than 16 where one batch is
  # launch-bound on an H100. 500 steps x 64 x 512 tokens: 6 passes over the 2.6M-token train split;
  # at 800 (10 passes) the held-out loss was flat after ~560 steps while the train loss kept falling.
  # Switch measurement: its 90 held-out pairs in one batch (greedy generation runs batch by batch).
  # Switch grid rows: each model's rows split over 2 processes (a row's time is mostly the host's;
  # the Mixtral regimes fit in 10 minutes with one process per model and were measured so).
  gpu) parallel=1 causal=(--nsamples 128 --seqlen 512 --batch_size 64) measure_causal=(--eval_windows 64)
       seq2seq=(--nsamples 128 --src_len 256 --tgt_len 32 --batch_size 64) steps=(--steps "${STEPS:-500}")
       measure_pairs=90 measure_batch=(--batch_size 96) grid_pairs=64 train_switch=() grid_windows=0 switch_grid_procs=2 ;;
  cpu) parallel=0 causal=(--nsamples 32 --seqlen 256 --batch_size 8) measure_causal=(--eval_windows 32)
       seq2seq=(--nsamples 64 --src_len 160 --tgt_len 24 --batch_size 16) steps=(${STEPS:+--steps $STEPS})
       measure_pairs=64 measure_batch=() grid_pairs=64 train_switch=() grid_windows=64 switch_grid_procs=1 ;;
  smoke) parallel=0 causal=(--nsamples 8 --seqlen 64 --batch_size 4 --groupsize 32) measure_causal=(--eval_windows 8)
       seq2seq=(--nsamples 16 --src_len 64 --tgt_len 8 --batch_size 8 --groupsize 32 --min_expert_tokens 1)
       steps=(--steps ${STEPS:-24} --train_bytes 200000) measure_pairs=16 grid_pairs=16 \
       train_switch=(--pretrain_steps 3 --finetune_steps 2) measure_batch=() \
       grid_windows=8 switch_grid_procs=${GRID_PROCS:-1} ;;
  *) echo "error: preset $preset: choose gpu, cpu or smoke" >&2; exit 2 ;;
esac
# The grid's rows: the uniform baselines and every order at 2.0 bits, 3/2/1 (Switch: also the paper
# repo's Switch levels, 3/2 at 2.5 bits).
orders="router router_change variance combined random-seed* frequency routing_weight reverse_router sensitivity oracle anti_oracle"
mixtral_rows="unquantized gptq-uniform-2 gptq-uniform-3 $(for o in $orders; do printf 'mixed-2.0-3/2/1-%s ' "$o"; done)"
switch_rows="$mixtral_rows $(for o in $orders; do printf 'mixed-2.5-3/2-%s ' "$o"; done)"
timed() {   # runs "$@" until the deadline, if one is set
  if [[ $deadline -eq 0 ]]; then "$@"; return; fi
  local left=$(( start + deadline - $(date +%s) ))
  if [[ $left -le 0 ]]; then echo "deadline passed: $*" >&2; return 124; fi
  timeout "$left" "$@"
}
both() { if [[ $parallel == 1 ]]; then "$@" & else "$@"; fi; }   # side by side on a GPU, one by one on a CPU
stage_lines() {   # the "stage NAME: N s" lines the processes of a stage logged, by log
  local log
  for log in "$@"; do
    if [[ -f $log ]]; then grep "^stage " "$log" | sed "s|^|  $(basename "$log" .log): |" || true; fi
  done
}

regime_runs() {   # sets runs (run folders) and extra (training flags) of regime $1
  case $1 in
    mixtral) runs=(runs/mixtral-$preset-s0 runs/mixtral-$preset-s1 runs/mixtral-$preset-s2); extra=() ;;
    mixtral-top1) runs=(runs/mixtral-$preset-top1-s0); extra=(--top_k 1) ;;
    mixtral-noaux) runs=(runs/mixtral-$preset-noaux-s0); extra=(--aux_loss_coef 0) ;;
    switch) runs=(runs/switch-$preset-s0 runs/switch-$preset-s1); extra=() ;;
    *) echo "error: regime $1: choose mixtral, mixtral-top1, mixtral-noaux or switch" >&2; exit 2 ;;
  esac
}

for regime in "$@"; do   # the Switch scores (ROUGE of generated titles) need rouge_score: say so before training
  if [[ $regime == switch ]] && ! python -c "import rouge_score.rouge_scorer" 2> /dev/null; then
    echo "error: the switch regime needs rouge_score (pip install rouge-score; on a GPU machine without an index, carry its wheels: testbed/sensitivity_gpu.sh installs .whl/*.whl)" >&2
    exit 2
  fi
done
t0=$(date +%s)
mkdir -p logs
trained=()   # the training logs of this call
for regime in "$@"; do   # first train what is missing, every regime's models side by side on a GPU
  regime_runs "$regime"
  for run in "${runs[@]}"; do
    seed=${run##*-s}
    log="logs/train_$(basename "$run").log"
    if [[ $regime == switch ]]; then
      [[ -f $run/finetuned/config.json ]] || { trained+=("$log"); both python testbed/train_switch.py \
        --data "$data/python-docs" --out "$run" --seed "$seed" --preset "$preset" "${train_switch[@]}" > "$log" 2>&1; }
    else
      [[ -f $run/trained/config.json ]] || { trained+=("$log"); both python testbed/train_mixtral.py \
        --data "$data/python-docs" --out "$run" --seed "$seed" --preset "$preset" --overwrite "${steps[@]}" \
        "${extra[@]}" > "$log" 2>&1; }
    fi
  done
done
wait
echo "training: $(( $(date +%s) - t0 )) s"
stage_lines ${trained[@]+"${trained[@]}"}

for regime in "$@"; do
  regime_runs "$regime"
  dir=$out/$regime
  mkdir -p "$dir/training"
  for run in "${runs[@]}"; do
    for f in train_info.json loss_curve.json loss_curve.png; do
      if [[ -f $run/$f ]]; then cp "$run/$f" "$dir/training/$(basename "$run")_$f"; fi
    done
  done

  if [[ $regime == switch ]]; then
    models=("${runs[@]/%//finetuned}") refs=("${runs[@]/%//pretrained}")
    task=(--task seq2seq --dataset "${runs[0]}/pairs" "${seq2seq[@]}") rows=$switch_rows
    # Switch's held-out pairs are the last test pairs, the grid's the first: 64 + 64 (GPU 90 + 64) of 184
    measure=(--eval_samples "$measure_pairs" ${measure_batch[@]+"${measure_batch[@]}"}) grid=(--eval_samples "$grid_pairs")
  else
    models=("${runs[@]/%//trained}") refs=("${runs[@]/%//init}")
    task=(--dataset "$data/python-docs" "${causal[@]}") rows=$mixtral_rows
    grid=(--eval_dataset "$data/python-docs" --eval_windows "$grid_windows") measure=("${measure_causal[@]}")
  fi
  t0=$(date +%s)
  for i in "${!models[@]}"; do   # each model measured on its own (resumable), then the analysis of all
    both timed python expert_sensitivity.py --model "${models[$i]}" --router_reference "${refs[$i]}" --out "$dir" \
      --title "$regime ($preset)" "${task[@]}" "${measure[@]}" > "logs/sensitivity_${regime}_$i.log" 2>&1 \
      || echo "$regime: measurement of ${models[$i]} stopped (time limit or error: logs/sensitivity_${regime}_$i.log)"
  done
  wait
  python expert_sensitivity.py --model "${models[@]}" --router_reference "${refs[@]}" --out "$dir" \
    --title "$regime ($preset)" --report_only "${task[@]}" "${measure[@]}" > /dev/null \
    || echo "$regime: the analysis waits for every model's measurement (run the command again)"
  echo "$regime: measurement $(( $(date +%s) - t0 )) s"; grep "Decision" "$dir/analysis.md" || true
  stage_lines logs/sensitivity_"$regime"_*.log

  t0=$(date +%s)
  set -f; read -ra rowargs <<< "${ROWS:-$rows}"; set +f   # row ids are globs for reproduce_tables, not the shell
  sens=()
  for m in "${models[@]}"; do sens+=("$dir/sensitivity-$(basename "$(dirname "$m")").json"); done
  grid_procs=1; [[ $regime != switch ]] || grid_procs=$switch_grid_procs
  for i in "${!models[@]}"; do   # per model grid_procs processes (side by side on a GPU), then one table
    for ((j = 0; j < grid_procs; j++)); do
      part=()   # every grid_procs-th row id from the j-th
      for ((r = j; r < ${#rowargs[@]}; r += grid_procs)); do part+=("${rowargs[$r]}"); done
      [[ ${#part[@]} -gt 0 ]] || continue
      name="$i"; [[ $grid_procs -eq 1 ]] || name="$i-$j"
      both timed python reproduce_tables.py --model "${models[$i]}" --router_reference "${refs[$i]}" \
        --sensitivity_file "${sens[$i]}" --out "runs/grid-sens-$regime-$preset-$name" "${task[@]}" "${grid[@]}" \
        --rows "${part[@]}" > "logs/grid_${regime}_$name.log" 2>&1 \
        || echo "$regime: grid of ${models[$i]} (part $name) stopped (time limit or error: logs/grid_${regime}_$name.log)"
    done
  done
  wait
  mkdir -p "$dir/grid"
  cat runs/grid-sens-"$regime"-"$preset"-*/runs.jsonl > "$dir/grid/runs.jsonl" 2> /dev/null || true
  python reproduce_tables.py --model "${models[@]}" --router_reference "${refs[@]}" --sensitivity_file "${sens[@]}" \
    --out "$dir/grid" "${task[@]}" "${grid[@]}" --rows "${rowargs[@]}" --report_only > /dev/null \
    || echo "$regime: no grid results yet"
  echo "$regime: grid $(( $(date +%s) - t0 )) s; $(wc -l < "$dir/grid/runs.jsonl") runs in $dir/grid"
  stage_lines logs/grid_"$regime"_*.log
done
echo "all: $(( $(date +%s) - start )) s"

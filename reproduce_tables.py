#!/usr/bin/env python
"""The paper's comparison grid on any MoE checkpoint(s): one command, one table.

    python reproduce_tables.py --model runs/mixtral-s0/trained runs/mixtral-s1/trained runs/mixtral-s2/trained \\
        --router_reference runs/mixtral-s0/init runs/mixtral-s1/init runs/mixtral-s2/init \\
        --dataset ../shared/data/python-docs \\
        --eval_dataset ../shared/data/python-docs ../shared/data/wikitext-2 --out results/grid

Rows (``--grid paper``): unquantized; RTN and GPTQ uniform at 2/3/4 bits; mixed at an
average of 2.0 and 2.5 bits per expert with three levels (3/2/1) and two levels (3/1 at
2.0, 3/2 at 2.5), each with every expert order: router, router change (needs
``--router_reference``), variance, combined (zeta 3), random (``--random_seeds``),
frequency, routing_weight, reverse_router, sensitivity (predicted from GPTQ's error per
width), oracle and anti_oracle (from measured per-expert loss increases: need
``--sensitivity_file``, one per model, from expert_sensitivity.py); and a zeta sweep of the
combined order at 2.0 bits, 3/2/1. ``--rows`` keeps the rows whose id matches one of its globs.

``--task seq2seq`` runs the grid on Switch Transformers (quantize_switch.py's pipeline):
``--dataset`` holds train.jsonl / test.jsonl pairs, the first ``--eval_samples`` test pairs
are scored: the "ppl" columns are exp(teacher-forced target loss), and rougeL and exact
match of greedy generations are extra columns.

Each row: the model is streamed from its checkpoint, quantized by the same pipeline
as quantize_mixtral.py (attention at ``--attn_bits``, group ``--groupsize``), its packed
checkpoint is written to a temporary directory to measure its size, and perplexity is
measured on the test split of every ``--eval_dataset`` (windows of ``--seqlen``) on the
fake-quantized weights, which equal the packed checkpoint's dequantized weights bit
for bit (tests/test_packed.py). Rows with several models (training seeds) or random
seeds are reported as mean +- sample standard deviation over all their runs.

Results go to ``--out``: ``runs.jsonl`` (one line per model x row, appended as they
finish: a rerun skips what is there), then ``results.json``, ``table.md`` and
``bits_vs_ppl.png``. ``--report_only`` rebuilds the last three from runs.jsonl.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections import Counter

import torch

from moeq.api import evaluate_unquantized, prepare_data, quantize
from moeq.cli import attn_bits
from moeq.config import ConfigError, QuantConfig, RunConfig

ORDERS = ["router", "router_change", "variance", "combined", "random", "frequency", "routing_weight",
          "reverse_router", "sensitivity", "oracle", "anti_oracle"]
NEEDS = {"router_change": "router_reference", "oracle": "sensitivity_file", "anti_oracle": "sensitivity_file"}
# (average bits, levels high/mid/low; mid None = two levels)
MIXED_SETTINGS = [(2.0, (3, 2, 1)), (2.0, (3, None, 1)), (2.5, (3, 2, 1)), (2.5, (3, None, 2))]


def level_name(levels) -> str:
    return "/".join(str(b) for b in levels if b is not None)


def paper_rows(random_seeds: int, zetas: list[float]) -> list[dict]:
    """The grid: one dict per row (``id`` plus what it changes in the QuantConfig)."""
    rows = [{"id": "unquantized", "group": "unquantized", "method": None}]
    for method in ("rtn", "gptq"):
        for bits in (2, 3, 4):
            rows.append({"id": f"{method}-uniform-{bits}", "group": f"{method} uniform", "method": method,
                         "avg_bits": bits, "levels": (bits, None, bits), "order": "uniform"})
    for avg, levels in MIXED_SETTINGS:
        for order in ORDERS:
            seeds = range(random_seeds) if order == "random" else [0]
            for seed in seeds:
                suffix = f"-seed{seed}" if order == "random" else ""
                rows.append({"id": f"mixed-{avg}-{level_name(levels)}-{order}{suffix}",
                             "group": f"mixed {avg} bits, {level_name(levels)}", "method": "gptq", "avg_bits": avg,
                             "levels": levels, "order": order, "seed": seed})
    for zeta in zetas:
        if zeta != 3.0:  # zeta 3 is the combined row above
            rows.append({"id": f"mixed-2.0-3/2/1-combined-zeta{zeta:g}", "group": "zeta sweep (2.0 bits, 3/2/1)",
                         "method": "gptq", "avg_bits": 2.0, "levels": (3, 2, 1), "order": "combined", "zeta": zeta})
    return rows


def select_rows(rows: list[dict], patterns: list[str] | None) -> list[dict]:
    if not patterns:
        return rows
    keep = [r for r in rows if any(fnmatch.fnmatchcase(r["id"], p) for p in patterns)]
    if not keep:
        raise ConfigError(f"--rows {' '.join(patterns)} matches no row id; ids look like "
                          f"{', '.join(r['id'] for r in rows[:3])}, ... (see --list_rows)")
    return keep


def quant_config(row: dict, a, sensitivity_file: str | None = None) -> QuantConfig:
    high, mid, low = row["levels"]
    order = {"router_change": "router", "uniform": "router"}.get(row["order"], row["order"])
    return QuantConfig(method=row["method"], mixed_type="uniform" if row["order"] == "uniform" else "mixed",
                       order_type=order, zeta=row.get("zeta", 3.0), avg_bits=row["avg_bits"], high_bits=high,
                       sensitivity_file=sensitivity_file if row["order"] in ("oracle", "anti_oracle") else None,
                       mid_bits=mid, low_bits=low, attn_bits=attn_bits(a.attn_bits),
                       groupsize=a.groupsize, grid=a.quant_grid, seed=row.get("seed", 0), batch_size=a.batch_size,
                       min_expert_tokens=a.min_expert_tokens)


def run_config(model_path: str, a, quant: QuantConfig | None = None, **kw) -> RunConfig:
    task = dict(task="seq2seq", src_len=a.src_len, tgt_len=a.tgt_len, eval_samples=a.eval_samples) \
        if a.task == "seq2seq" else dict(eval_datasets=tuple(a.eval_dataset), seqlen=a.seqlen)
    return RunConfig(model=model_path, quant=quant or QuantConfig(), dataset=a.dataset, nsamples=a.nsamples,
                     seed=a.calib_seed, device=a.device, dtype=a.dtype, evaluate=True, verbose=False, **task, **kw)


def scores_of(evaluation: dict) -> dict:
    """The grid's columns of one evaluation: causal, perplexity per eval set; seq2seq,
    exp(target loss) as the "ppl" of the pairs, rougeL and exact match as extra columns."""
    if "ppl" in evaluation:
        return {"ppl": evaluation["ppl"]}
    return {"ppl": {evaluation["eval_set"]: math.exp(evaluation["loss"])},
            "tasks": {"rougeL": evaluation["rouge"]["rougeL"], "exact_match": evaluation["exact_match"]}}


class ModelData:
    """Per model: calibration windows and evaluation windows (tokenized once for all rows)."""

    def __init__(self, path: str, a):
        from transformers import AutoConfig, AutoTokenizer
        self.path = path
        self.config = AutoConfig.from_pretrained(path)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.data = prepare_data(run_config(path, a))
        if a.eval_windows:
            self.data.evals = {k: v[: a.eval_windows] for k, v in self.data.evals.items()}
        self.calib_source = self.data.info["source"]
        self.seqlen = self.data.info.get("seqlen") or (a.src_len, a.tgt_len)
        self.evals = self.data.evals if a.task == "causal" else \
            {self.data.pairs.name: self.data.pairs.test[: a.eval_samples]}


def run_row(row: dict, md: ModelData, reference_path: str | None, a, sensitivity_file: str | None = None) -> dict:
    """One grid cell: the model quantized as the row says (packed checkpoint written to a
    temporary directory to measure it), perplexity of the fake-quantized model (equal to the
    packed one's, tests/test_packed.py) on every eval set."""
    out = {"model": md.path, "row": row["id"]}
    if row["method"] is None:
        stored = getattr(md.config, "dtype", None) or "float32"   # the checkpoint's storage width
        out.update({"avg_bits": float(torch.finfo(getattr(torch, str(stored).replace("torch.", ""))).bits),
                    "quant_seconds": 0.0,
                    "packed_mib": sum(os.path.getsize(os.path.join(md.path, f)) for f in os.listdir(md.path)
                                      if f.endswith(".safetensors")) / 2**20})
        t0 = time.time()
        out.update(scores_of(evaluate_unquantized(run_config(md.path, a), md.data)))
        out["stage_seconds"] = {"evaluate": time.time() - t0}
        if a.tasks:
            from transformers import AutoModelForCausalLM
            out["tasks"] = lm_eval_scores(AutoModelForCausalLM.from_pretrained(md.path).eval(), md.tokenizer, a)
        return out
    tmp = tempfile.mkdtemp(prefix="grid-packed-", dir=a.tmp_dir)
    try:
        reference = reference_path if row["order"] == "router_change" else None
        # the checkpoint is measured and deleted: no picture of its allocation
        result = quantize(run_config(md.path, a, quant_config(row, a, sensitivity_file), router_reference=reference,
                                     saving_path=os.path.join(tmp, "ckpt"), keep_model=True, allocation_png=False),
                          md.data)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out.update({"avg_bits": result.avg_bits, "stored_bits": result.report.avg_expert_stored_bits(),
                "packed_mib": result.sizes["disk_bytes"] / 2**20, "quant_seconds": result.seconds["quantize"],
                "level_counts": {str(b): n for b, n in sorted(Counter(result.report.layers[0]["bits"]).items())},
                "bits": [layer["bits"] for layer in result.report.layers],
                "expert_order": [layer["expert_order"] for layer in result.report.layers],
                "scores": [layer["scores"] for layer in result.report.layers],
                "starved_experts": len(result.report.starved), **scores_of(result.evaluation["quantized"]),
                "stage_seconds": {k: v for k, v in result.seconds.items() if k != "total"},
                "quantize_phases": result.report.timings})
    if reference_path:   # every run keeps both router scores, whichever its order used
        out["router_norm_change"] = router_norm_change(result.model, reference_path)
    if a.tasks:
        out["tasks"] = lm_eval_scores(result.model, md.tokenizer, a)
    return out


def router_norm_change(model, reference_path: str) -> list[list[float]]:
    """Per MoE layer, each expert's router-row norm minus the reference checkpoint's."""
    from moeq.quant.allocation import router_norm
    from moeq.utils.families import family_for
    from moeq.utils.loading import router_reference_weights
    family = family_for(model)
    reference = router_reference_weights(reference_path, model, family)
    return [router_norm(family.router_weight(moe), reference[moe.name]) for name, block in family.blocks(model)
            if (moe := family.moe(block, name)) is not None]


def lm_eval_scores(model, tokenizer, a) -> dict:
    """lm-eval accuracies of the in-memory model (stock HFLM on the fake-quantized weights)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    model.to(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=a.batch_size)
    res = lm_eval.simple_evaluate(model=lm, tasks=a.tasks, task_manager=TaskManager(include_path=a.include_path),
                                  limit=a.task_limit)["results"]
    model.to("cpu")
    return {f"{task}/{metric.split(',')[0]}": value for task, metrics in res.items()
            for metric, value in metrics.items() if metric.split(",")[0] in ("acc", "acc_norm")}


def add_stage(totals: dict, name: str, seconds: float) -> None:
    totals[name] = totals.get(name, 0.0) + seconds


def stage_line(result: dict, totals: dict) -> str:
    """One row's seconds by stage (the pipeline's phases inside quantize), added to ``totals``."""
    parts = []
    for name, seconds in result.get("stage_seconds", {}).items():
        add_stage(totals, name, seconds)
        phases = result.get("quantize_phases") if name == "quantize" else None
        for phase, phase_seconds in (phases or {}).items():
            add_stage(totals, f"quantize {phase}", phase_seconds)
        parts.append(f"{name} {seconds:.1f} s" + (" (" + ", ".join(f"{k} {v:.1f}" for k, v in phases.items()) + ")"
                                                  if phases else ""))
    return "stages: " + ", ".join(parts)


def read_runs(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    runs = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            try:
                runs.append(json.loads(line)) if line.strip() else None
            except json.JSONDecodeError:  # a run killed mid-write (e.g. by a time limit): that row runs again
                print(f"{path}:{n}: unreadable line skipped")
    return runs


def append_run(path: str, result: dict) -> None:
    """One line per run; after a line cut short by a kill, start on a fresh line."""
    with open(path, "ab+") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
        f.write((json.dumps(result) + "\n").encode())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", nargs="+", required=True, help="one or more checkpoints (e.g. training seeds)")
    ap.add_argument("--router_reference", nargs="*", default=None,
                    help="each model's checkpoint before training (same order): enables the router_change rows")
    ap.add_argument("--sensitivity_file", nargs="*", default=None, help="each model's sensitivity json from "
                    "expert_sensitivity.py (same order): enables the oracle and anti_oracle rows")
    ap.add_argument("--task", choices=["causal", "seq2seq"], default="causal",
                    help="seq2seq: Switch Transformers, --dataset with train.jsonl / test.jsonl pairs")
    ap.add_argument("--src_len", type=int, default=256, help="seq2seq: source tokens per pair")
    ap.add_argument("--tgt_len", type=int, default=32, help="seq2seq: target tokens per pair")
    ap.add_argument("--eval_samples", type=int, default=64, help="seq2seq: the first N test pairs are scored")
    ap.add_argument("--dataset", required=True, help="calibration text (train split): directory, file or hub name")
    ap.add_argument("--eval_dataset", nargs="+", default=None, help="perplexity on the test split of each "
                    "(default: --dataset)")
    ap.add_argument("--out", required=True, help="results directory")
    ap.add_argument("--grid", choices=["paper"], default="paper")
    ap.add_argument("--rows", nargs="*", default=None, help="glob(s) of row ids to run, e.g. 'gptq-*' unquantized")
    ap.add_argument("--list_rows", action="store_true", help="print the row ids and exit")
    ap.add_argument("--random_seeds", type=int, default=3)
    ap.add_argument("--zetas", default="1,2,3,5,10", help="zeta values of the sweep (comma separated)")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--calib_seed", type=int, default=0)
    ap.add_argument("--eval_windows", type=int, default=0, help="evaluate only the first N test windows (0: all)")
    ap.add_argument("--attn_bits", type=int, default=4, help="attention linears (16: keep fp)")
    ap.add_argument("--groupsize", type=int, default=128)
    ap.add_argument("--quant_grid", default="search", choices=["search", "minmax"],
                    help="each group's scale and zero: searched or plain min-max (every row)")
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--min_expert_tokens", type=int, default=16)
    ap.add_argument("--tasks", nargs="*", default=None, help="lm-eval tasks (accuracy columns)")
    ap.add_argument("--include_path", default=None, help="lm-eval --include_path for local task yamls")
    ap.add_argument("--task_limit", type=int, default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="auto: float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--tmp_dir", default=None, help="where packed checkpoints are written to be measured")
    ap.add_argument("--report_only", action="store_true")
    a = ap.parse_args(argv)
    try:
        return _main(a, argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _main(a, argv) -> int:
    from moeq.utils import tables
    zetas = [float(z) for z in a.zetas.split(",") if z.strip()]
    rows = select_rows(paper_rows(a.random_seeds, zetas), a.rows)
    if a.list_rows:
        print("\n".join(r["id"] for r in rows))
        return 0
    for order, flag in NEEDS.items():
        paths = getattr(a, flag)
        if paths and len(paths) != len(a.model):
            raise ConfigError(f"--{flag} got {len(paths)} paths for {len(a.model)} models: give one per model, "
                              f"in the same order")
        if not paths:
            dropped = [r["id"] for r in rows if r.get("order") == order]
            rows = [r for r in rows if r.get("order") != order]
            if dropped:
                print(f"no --{flag}: skipping {len(dropped)} {order} rows")
    for path in [] if a.report_only else a.model + (a.router_reference or []):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ConfigError(f"{path} is not a checkpoint directory (no config.json): pass local checkpoints")
    a.eval_dataset = a.eval_dataset or [a.dataset]
    os.makedirs(a.out, exist_ok=True)
    runs_path = os.path.join(a.out, "runs.jsonl")
    device = torch.device(a.device)
    if a.dtype == "auto":  # the grid computes in bf16 on GPUs whatever the checkpoints store
        a.dtype = "bfloat16" if device.type == "cuda" else "float32"
    command = "python reproduce_tables.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if not a.report_only:
        done = {(r["model"], r["row"]) for r in read_runs(runs_path)}
        todo = [(m, r) for m in a.model for r in rows if (m, r["id"]) not in done]
        print(f"{len(rows)} rows x {len(a.model)} models: {len(todo)} to run, {len(done)} already in {runs_path}")
        data_cache: dict[str, ModelData] = {}
        t_all, totals = time.time(), {}
        for i, (model_path, row) in enumerate(todo):
            if model_path not in data_cache:
                data_cache.clear()
                t0 = time.time()
                data_cache[model_path] = ModelData(model_path, a)
                add_stage(totals, "data", time.time() - t0)
            md = data_cache[model_path]
            ref = a.router_reference[a.model.index(model_path)] if a.router_reference else None
            sens = a.sensitivity_file[a.model.index(model_path)] if a.sensitivity_file else None
            t0 = time.time()
            result = run_row(row, md, ref, a, sens)
            result.update({"row_seconds": time.time() - t0, "group": row["group"], "order": row.get("order"),
                           "method": row["method"], "device": tables.device_name(device), "command": command,
                           "calibration": {"source": md.calib_source, "nsamples": a.nsamples, "seqlen": md.seqlen,
                                           "seed": a.calib_seed},
                           "eval_windows": {k: len(v) for k, v in md.evals.items()}, "task": a.task,
                           "attn_bits": a.attn_bits, "groupsize": a.groupsize, "quant_grid": a.quant_grid})
            append_run(runs_path, result)
            ppl = " ".join(f"{k} {v:.3f}" for k, v in result["ppl"].items())
            print(f"[{i + 1}/{len(todo)}] {row['id']:<40} {os.path.basename(os.path.dirname(model_path.rstrip('/')))}"
                  f": avg bits {result['avg_bits']:.3f}, ppl {ppl}, {result['quant_seconds']:.1f}s quantize, "
                  f"{result['row_seconds']:.1f}s row", flush=True)
            print("  " + stage_line(result, totals), flush=True)
        print(f"grid ran in {time.time() - t_all:.1f}s")
        for name, seconds in totals.items():
            print(f"stage grid {name}: {seconds:.1f} s")
    runs = [r for r in read_runs(runs_path) if r["row"] in {x["id"] for x in rows} and r["model"] in a.model]
    if not runs:
        raise ConfigError(f"no results in {runs_path} for these models and rows")
    summary = tables.write_report(runs, rows, a.out, command)
    print(open(summary).read())
    return 0


if __name__ == "__main__":
    sys.exit(main())

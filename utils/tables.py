"""Results of reproduce_tables.py: aggregation over runs (training seeds, random-order
seeds), the markdown table, results.json and the bits-vs-perplexity plot."""
from __future__ import annotations

import json
import math
import os
import re
import statistics
import time

import torch


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def base_id(row_id: str) -> str:
    """Random-order rows of one setting share a line: 'mixed-2.0-3/2/1-random-seed1' -> '...-random'."""
    return re.sub(r"-seed\d+$", "", row_id)


def stats(values: list[float]) -> dict:
    """mean, sample standard deviation (0 for one value) and count."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return {"mean": float("nan"), "sd": float("nan"), "n": 0}
    return {"mean": statistics.fmean(vals), "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0, "n": len(vals)}


def aggregate(runs: list[dict], rows: list[dict]) -> list[dict]:
    """One line per base row id, in grid order, with mean/sd over every run it has."""
    order, groups = [], {}
    for row in rows:
        key = base_id(row["id"])
        if key not in groups:
            order.append(key)
            groups[key] = {"id": key, "group": row["group"], "order": row.get("order"), "runs": []}
    for r in runs:
        groups[base_id(r["row"])]["runs"].append(r)
    lines = []
    for key in order:
        g = groups[key]
        if not g["runs"]:
            continue
        evals = sorted({name for r in g["runs"] for name in r["ppl"]})
        line = {"id": key, "group": g["group"], "order": g["order"],
                "models": sorted({r["model"] for r in g["runs"]}), "runs": len(g["runs"]),
                "ppl": {name: stats([r["ppl"].get(name) for r in g["runs"]]) for name in evals},
                "avg_bits": stats([r["avg_bits"] for r in g["runs"]]),
                "packed_mib": stats([r["packed_mib"] for r in g["runs"]]),
                "quant_seconds": stats([r["quant_seconds"] for r in g["runs"]])}
        tasks = sorted({t for r in g["runs"] for t in r.get("tasks", {})})
        if tasks:
            line["tasks"] = {t: stats([r.get("tasks", {}).get(t) for r in g["runs"]]) for t in tasks}
        lines.append(line)
    _beats_random(lines, runs)
    _paired_delta(lines, runs)
    return lines


def _paired_delta(lines: list[dict], runs: list[dict]) -> None:
    """Perplexity minus the same model's unquantized perplexity, per run: training seeds
    differ far more from each other than rows do, so differences are compared in pairs."""
    base = {r["model"]: r["ppl"] for r in runs if r["row"] == "unquantized"}
    by_line = {}
    for r in runs:
        by_line.setdefault(base_id(r["row"]), []).append(r)
    for line in lines:
        if line["id"] == "unquantized":
            continue
        paired = [r for r in by_line.get(line["id"], []) if r["model"] in base]
        if paired:
            line["delta_ppl"] = {e: stats([r["ppl"][e] - base[r["model"]][e] for r in paired if e in base[r["model"]]])
                                 for e in line["ppl"]}


def _beats_random(lines: list[dict], runs: list[dict]) -> None:
    """For each mixed row: on how many models its perplexity (first eval set) is below
    the mean of the random orders of the same setting on the same model."""
    by_key = {}
    for r in runs:
        by_key.setdefault((base_id(r["row"]), r["model"]), []).append(r)
    for line in lines:
        if not line["id"].startswith("mixed-") or line["order"] == "random" or not line["ppl"]:
            continue
        setting = "-".join(line["id"].split("-")[:3])   # mixed-<avg>-<levels>
        first = sorted(line["ppl"])[0]
        wins = total = 0
        for model in line["models"]:
            rnd = by_key.get((f"{setting}-random", model))
            mine = by_key.get((line["id"], model))
            if not rnd or not mine:
                continue
            rnd_mean = statistics.fmean(r["ppl"][first] for r in rnd)
            total += 1
            wins += statistics.fmean(r["ppl"][first] for r in mine) < rnd_mean
        if total:
            line["beats_random"] = {"eval": first, "wins": wins, "models": total}


def _fmt(s: dict, digits: int = 2) -> str:
    if s["n"] == 0:
        return "-"
    return f"{s['mean']:.{digits}f}" + (f" ± {s['sd']:.{digits}f}" if s["n"] > 1 else "")


def markdown(lines: list[dict], runs: list[dict], command: str) -> str:
    evals = sorted({name for line in lines for name in line["ppl"]})
    tasks = sorted({t for line in lines for t in line.get("tasks", {})})
    models = sorted({r["model"] for r in runs})
    first = runs[0]
    out = ["# MoE quantization grid", "",
           "- command(s): " + "; ".join(f"`{c}`" for c in dict.fromkeys([r["command"] for r in runs] + [command])),
           f"- device: {first['device']}; date {time.strftime('%Y-%m-%d')}",
           f"- models ({len(models)}): " + ", ".join(f"`{m}`" for m in models),
           f"- calibration: {first['calibration']['nsamples']} x {first['calibration']['seqlen']} tokens from "
           f"{first['calibration']['source']} (seed {first['calibration']['seed']}); attention {first['attn_bits']} "
           f"bits, group size {first['groupsize']}",
           "- perplexity: test split, non-overlapping windows of the calibration length ("
           + ", ".join(f"{k}: {v} windows" for k, v in first["eval_windows"].items()) + ")",
           "- values: mean ± sample sd over models (training seeds) and, for `random`, random-order seeds; "
           "`beats random`: on how many models the row's perplexity (first eval set) is below the mean of the "
           "random orders of the same setting; `Δ ppl`: the row's perplexity minus the unquantized one of the same model "
           "(paired, so the spread between training seeds cancels)",
           "- avg bits: expert weights only (the unquantized row: the checkpoint's storage width); packed MiB: "
           "size of the packed checkpoint on disk (unquantized: the checkpoint's safetensors)", ""]
    head = ["row", "avg bits"] + [f"ppl {e}" for e in evals] + [f"Δ ppl {e}" for e in evals] + tasks + ["packed MiB", "quantize s", "beats random",
                                                                         "runs"]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    group = None
    for line in lines:
        if line["group"] != group:
            group = line["group"]
            out.append(f"| **{group}** |" + " |" * (len(head) - 1))
        br = line.get("beats_random")
        cells = [line["id"], _fmt(line["avg_bits"], 3)] + [_fmt(line["ppl"].get(e, {"n": 0})) for e in evals] \
            + [_fmt(line.get("delta_ppl", {}).get(e, {"n": 0})) for e in evals] \
            + [_fmt(line.get("tasks", {}).get(t, {"n": 0}), 3) for t in tasks] \
            + [_fmt(line["packed_mib"]), _fmt(line["quant_seconds"], 1),
               f"{br['wins']}/{br['models']}" if br else "", str(line["runs"])]
        out.append("| " + " | ".join(cells) + " |")
    out += ["", pivot(lines, evals[0]) if evals else ""]
    return "\n".join(out) + "\n"


def pivot(lines: list[dict], eval_name: str) -> str:
    """Orders x mixed settings, perplexity on one eval set: the paper's main comparison."""
    settings, orders, cell = [], [], {}
    for line in lines:
        if not line["id"].startswith("mixed-") or "zeta" in line["id"]:
            continue
        setting = "-".join(line["id"].split("-")[1:3])
        if setting not in settings:
            settings.append(setting)
        if line["order"] not in orders:
            orders.append(line["order"])
        cell[(line["order"], setting)] = line.get("delta_ppl", line["ppl"]).get(eval_name, {"n": 0})
    if not settings:
        return ""
    out = [f"## Expert order x setting: perplexity increase over unquantized on {eval_name} (paired; lower is "
           f"better)", "",
           "| order | " + " | ".join(s.replace("-", " bits, ") for s in settings) + " |",
           "|---|" + "---|" * len(settings)]
    for order in orders:
        out.append(f"| {order} | " + " | ".join(_fmt(cell.get((order, s), {"n": 0})) for s in settings) + " |")
    return "\n".join(out) + "\n"


def plot(lines: list[dict], path: str) -> bool:
    """Average expert bits vs perplexity increase over unquantized (paired, mean ± sd),
    one panel per eval set; three-level settings as x, two-level ones as + (shifted
    right). False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    evals = sorted({name for line in lines for name in line.get("delta_ppl", {})})
    if not evals:
        return False
    fig, axes = plt.subplots(1, len(evals), figsize=(6.5 * len(evals), 4.8), squeeze=False)
    mixed = [line for line in lines if line["id"].startswith("mixed-") and "zeta" not in line["id"]]
    orders = list(dict.fromkeys(line["order"] for line in mixed))
    colors = {o: f"C{k + 2}" for k, o in enumerate(orders)}
    for ax, ev in zip(axes[0], evals):
        y = lambda p: p["delta_ppl"][ev]["mean"]
        err = lambda p: p["delta_ppl"][ev]["sd"]
        for method, style in (("rtn", "s--"), ("gptq", "o-")):
            pts = [line for line in lines if line["id"].startswith(f"{method}-uniform-") and ev in line.get("delta_ppl", {})]
            if pts:
                ax.errorbar([p["avg_bits"]["mean"] for p in pts], [y(p) for p in pts], yerr=[err(p) for p in pts],
                            fmt=style, capsize=3, label=f"{method} uniform")
        for k, order in enumerate(orders):
            for two_level in (False, True):
                pts = [line for line in mixed if line["order"] == order and ev in line.get("delta_ppl", {})
                       and (line["id"].count("/") == 1) == two_level]
                if pts:
                    dx = (k - len(orders) / 2) * 0.012 + (0.15 if two_level else 0.0)
                    ax.errorbar([p["avg_bits"]["mean"] + dx for p in pts], [y(p) for p in pts],
                                yerr=[err(p) for p in pts], fmt="+" if two_level else "x", color=colors[order],
                                capsize=2, label=f"mixed: {order}" if not two_level else None)
        ax.axhline(0.0, color="k", ls=":", label="unquantized")
        ax.set_xlabel("average bits per expert weight (mixed: x three levels, + two levels, shifted right)")
        ax.set_ylabel(f"perplexity increase over unquantized ({ev} test)")
        ax.set_title(f"{ev} (paired mean ± sd over runs)")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(runs: list[dict], rows: list[dict], out_dir: str, command: str) -> str:
    """results.json, table.md, bits_vs_ppl.png; returns the table's path."""
    lines = aggregate(runs, rows)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"command": command, "device": runs[0]["device"], "lines": lines}, f, indent=1)
        f.write("\n")
    table = os.path.join(out_dir, "table.md")
    with open(table, "w") as f:
        f.write(markdown(lines, runs, command))
    plot(lines, os.path.join(out_dir, "bits_vs_ppl.png"))
    return table

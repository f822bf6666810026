#!/usr/bin/env python
"""lm-eval loglikelihood throughput and GPU memory: packed checkpoint vs its fp16 original.

    python benchmarks/bench_lm_eval.py --layers 4 --data DIR --workdir W

1. writes a Mixtral-8x7B-shaped model (``--layers`` blocks, real dims, random weights)
   with a BPE tokenizer trained on ``--data``/pydocs_train.txt;
2. quantizes it with quantize_mixtral.py (the paper's 2.0-bit setting, --pack --save);
3. runs the seed's lm_eval command shape on the packed model through the installed CLI
   (parallelize=True,quantized=True,dtype='float16', batch 32) on a local
   multiple-choice task built from WikiText-2 (``--include_path``);
4. in fresh processes, times ``lm_eval.simple_evaluate`` on the same task for the fp16
   model (stock hf) and the packed one (quantized=True): requests per second (model load
   excluded), GPU memory after load and at peak.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_task(data_dir, task_dir, n_docs):
    import random
    text = open(os.path.join(data_dir, "wikitext-2", "test.txt"), encoding="utf-8").read()
    paras = [p.strip() for p in text.split("\n \n") if len(p.strip()) > 600]
    rng = random.Random(0)
    docs = []
    for i, p in enumerate(paras[:n_docs]):
        others = [paras[(i + k * 7 + 1) % len(paras)] for k in range(1, 4)]
        choices = [p[400:600]] + [o[400:600] for o in others]
        order = list(range(4))
        rng.shuffle(order)
        docs.append({"question": p[:400], "choices": [choices[j] for j in order], "label": order.index(0)})
    os.makedirs(task_dir, exist_ok=True)
    with open(os.path.join(task_dir, "wiki_mc.jsonl"), "w") as f:
        for d in docs:
            f.write(json.dumps(d) + "\n")
    with open(os.path.join(task_dir, "wiki_mc.yaml"), "w") as f:
        f.write(f"task: wiki_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: "
                f"{os.path.join(task_dir, 'wiki_mc.jsonl')}\ntest_split: test\noutput_type: multiple_choice\n"
                "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: label\n"
                "metric_list:\n  - metric: acc\n")
    return len(docs) * 4


def timed_eval(model_args: str, task_dir: str, batch_size: int):
    """Runs in a child process: load, then time simple_evaluate alone."""
    import lm_eval
    import torch
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager
    t0 = time.time()
    lm = get_model("hf").create_from_arg_string(model_args, {"batch_size": batch_size, "device": "cuda"})
    load_s = time.time() - t0
    torch.cuda.synchronize()
    mem_load = torch.cuda.memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    res = lm_eval.simple_evaluate(model=lm, tasks=["wiki_mc"], task_manager=TaskManager(include_path=task_dir))
    torch.cuda.synchronize()
    eval_s = time.time() - t0
    # The model alone: forward of a (32, 256) batch, median of 10 after warm-up.
    ids = torch.randint(0, lm.model.config.vocab_size, (32, 256), device="cuda")
    times = []
    with torch.no_grad():
        for i in range(13):
            torch.cuda.synchronize()
            t = time.time()
            lm.model(ids)
            torch.cuda.synchronize()
            times.append(time.time() - t)
    fwd_ms = sorted(times[3:])[5] * 1000
    print("RESULT " + json.dumps({"load_s": load_s, "eval_s": eval_s, "fwd_ms": fwd_ms, "mem_after_load_gib": mem_load,
                                  "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
                                  "acc": res["results"]["wiki_mc"]["acc,none"]}))


def sh(cmd, **kw):
    print("$ " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=True, **kw)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--data", required=True, help="folder with wikitext-2/{valid,test}.txt and pydocs_train.txt or python-docs/train.txt")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--docs", type=int, default=250)
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--_eval", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    task_dir = os.path.join(a.workdir, "tasks")
    if a._eval:
        return timed_eval(a._eval, task_dir, a.batch_size)
    fp, q = os.path.join(a.workdir, "fp16"), os.path.join(a.workdir, "packed")
    sh([sys.executable, os.path.join(ROOT, "benchmarks", "bench_quantize.py"), "--layers", str(a.layers),
        "--_stage", "make", "--_path", fp])
    from moeq.utils.tiny import train_tokenizer
    train = os.path.join(a.data, "pydocs_train.txt")   # or ../shared/data's layout: python-docs/train.txt
    if not os.path.exists(train):
        train = os.path.join(a.data, "python-docs", "train.txt")
    tok = train_tokenizer(open(train, encoding="utf-8").read(), 8000)
    tok.save_pretrained(fp)
    n_req = make_task(a.data, task_dir, a.docs)
    t0 = time.time()
    sh([sys.executable, os.path.join(ROOT, "quantize_mixtral.py"), "--model", fp, "--mixed_type", "mixed",
        "--order_type", "combined", "--zeta", "3.0", "--avg_bits", "2.0", "--high_bit_level", "3",
        "--mid_bit_level", "2", "--low_bit_level", "1", "--attn_bit_level", "4", "--groupsize", "128",
        "--dataset", os.path.join(a.data, "wikitext-2"), "--nsamples", str(a.nsamples), "--pack", "--save",
        "--saving_path", q, "--overwrite"], stdout=subprocess.DEVNULL)
    quant_s = time.time() - t0
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    t0 = time.time()
    r = sh([sys.executable, "-m", "lm_eval", "--model", "hf", "--tasks", "wiki_mc", "--include_path", task_dir, "--model_args",
            f"pretrained={q},parallelize=True,quantized=True,dtype='float16'", "--batch_size", "32"],
           env=env, capture_output=True, text=True)
    cli_s = time.time() - t0
    table = [l for l in r.stdout.splitlines() if l.startswith("|")]
    results = {}
    for name, args in (("fp16", f"pretrained={fp},dtype=float16"),
                       ("packed", f"pretrained={q},quantized=True,dtype=float16")):
        out = sh([sys.executable, __file__, "--data", a.data, "--workdir", a.workdir, "--batch_size",
                  str(a.batch_size), "--_eval", args], env=env, capture_output=True, text=True)
        results[name] = json.loads(next(l for l in out.stdout.splitlines() if l.startswith("RESULT "))[7:])
        results[name]["req_per_s"] = n_req / results[name]["eval_s"]
    size = lambda d: sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.endswith(".safetensors"))
    print(f"\ncommand: python benchmarks/bench_lm_eval.py {' '.join(sys.argv[1:])}")
    print(f"model: Mixtral-8x7B-shaped, {a.layers} layers, random weights; task wiki_mc: {n_req} loglikelihood "
          f"requests, batch {a.batch_size}; quantization {quant_s:.0f}s")
    print("seed lm_eval command on the packed model (CLI, %.0fs):" % cli_s)
    print("\n".join(table))
    print(f"{'model':<8} {'req/s':>8} {'eval s':>8} {'fwd ms':>8} {'load s':>8} {'GiB after load':>15} {'GiB peak':>9} {'acc':>6} {'checkpoint GiB':>15}")
    for name, d in (("fp16", fp), ("packed", q)):
        r = results[name]
        print(f"{name:<8} {r['req_per_s']:8.1f} {r['eval_s']:8.1f} {r['fwd_ms']:8.1f} {r['load_s']:8.1f} {r['mem_after_load_gib']:15.2f} "
              f"{r['peak_gib']:9.2f} {r['acc']:6.3f} {size(d) / 2**30:15.2f}")
    print(f"throughput packed / fp16: lm-eval {results['packed']['req_per_s'] / results['fp16']['req_per_s']:.3f}, "
          f"model forward (32 x 256 tokens) {results['fp16']['fwd_ms'] / results['packed']['fwd_ms']:.3f}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Multi-GPU check (run on a machine with >= 2 GPUs): a packed Mixtral-shaped checkpoint
loaded with device_map="auto" and a per-GPU memory cap spreads its blocks over the GPUs,
gives the same logits as the single-GPU load, and the seed's lm_eval command shape with
parallelize=True runs on it.
    python benchmarks/check_multi_gpu.py --workdir W --data .gpu/data
"""
import argparse
import os
import subprocess
import sys
from collections import Counter

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--layers", type=int, default=4)
    a = ap.parse_args()
    fp, q = os.path.join(a.workdir, "fp16"), os.path.join(a.workdir, "packed")
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_quantize.py"), "--layers", str(a.layers),
                    "--_stage", "make", "--_path", fp], check=True)
    from moeq.utils.tiny import train_tokenizer
    train_tokenizer(open(os.path.join(a.data, "pydocs_train.txt"), encoding="utf-8").read(), 4000).save_pretrained(fp)
    subprocess.run([sys.executable, os.path.join(ROOT, "quantize_mixtral.py"), "--model", fp, "--avg_bits", "2.0",
                    "--high_bit_level", "3", "--mid_bit_level", "2", "--low_bit_level", "1", "--dataset",
                    os.path.join(a.data, "wikitext-2"), "--nsamples", "32", "--pack", "--save", "--saving_path", q,
                    "--overwrite"], check=True, stdout=subprocess.DEVNULL)
    from moeq.inference import load_quantized_model
    one = load_quantized_model(q, device_map="cuda:0", dtype=torch.float16)
    ids = torch.randint(0, one.config.vocab_size, (2, 128), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = one(ids.to("cuda:0")).logits.float().cpu()
    del one
    torch.cuda.empty_cache()
    cap = {i: "1GiB" for i in range(torch.cuda.device_count())}
    multi = load_quantized_model(q, device_map="auto", dtype=torch.float16, max_memory=cap)
    spread = Counter(str(v) for v in multi.hf_device_map.values())
    with torch.no_grad():
        got = multi(ids.to("cuda:0")).logits.float().cpu()
    print(f"GPUs: {torch.cuda.device_count()}; modules per device: {dict(spread)}")
    print(f"multi-GPU vs single-GPU logits: max |diff| {(got - ref).abs().max().item():.3e}")
    assert len([d for d in spread if d not in ("cpu", "disk")]) >= 2, spread
    assert torch.allclose(got, ref, atol=1e-2, rtol=0), (got - ref).abs().max()
    from bench_lm_eval import make_task  # beside this script
    task_dir = os.path.join(a.workdir, "tasks")
    make_task(a.data, task_dir, 50)
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--tasks", "wiki_mc", "--include_path", task_dir,
           "--model_args", f"pretrained={q},parallelize=True,max_memory_per_gpu=1GiB,quantized=True,dtype='float16'",
           "--batch_size", "32"]
    print("$ " + " ".join(cmd))
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    print("\n".join(l for l in r.stdout.splitlines() if l.startswith("|")) or r.stderr[-3000:])
    assert r.returncode == 0


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Where a GPU training step of the testbed's Switch model (testbed/train_switch.py, preset
gpu) goes: seconds per step for variants of the step, one process alone, then a profile.

    python benchmarks/probe_switch_train.py --steps 30

Variants: as train_switch.py trains (batched experts, deterministic algorithms, math
attention); without deterministic algorithms; with transformers' expert loop. Batches are
random ids of the pretraining shapes (64 windows of 256 tokens, span-corrupted lengths).
"""
from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import torch

from moeq.testbed import common
from moeq.testbed.train_switch import PRESETS, init_routers, make_train_loss, model_config, router_taps
from moeq.utils.switch_experts import batched_switch_experts


class _Tok:
    """What model_config reads of a tokenizer: its size and two ids."""
    pad_token_id, eos_token_id = 0, 1

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n


def build(batched: bool, device):
    from transformers import SwitchTransformersForConditionalGeneration
    p = SimpleNamespace(**PRESETS["gpu"])
    cfg = model_config(p, _Tok(8224))
    torch.manual_seed(0)
    model = SwitchTransformersForConditionalGeneration(cfg)
    init_routers(model, p.d_model)
    model.to(device)
    if batched:
        batched_switch_experts(model)
    return model, make_train_loss(router_taps(model))


def batches(n_src=243, n_tgt=52):
    g = torch.Generator().manual_seed(0)
    while True:
        src = torch.randint(2, 8224, (64, n_src), generator=g)
        yield src, torch.ones_like(src), torch.randint(2, 8224, (64, n_tgt), generator=g)


def time_steps(model, loss_fn, steps: int, device, profile: bool = False) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    it = batches()
    with common.cuda_speed(model, device):
        for s in range(3):   # warm-up
            with common.deterministic_attention(device):
                common._step(model, opt, loss_fn, next(it), s, steps, 1e-3, 1, device)
        torch.cuda.synchronize()
        t0 = time.time()
        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                  torch.profiler.ProfilerActivity.CUDA]) if profile else None
        if prof:
            prof.__enter__()
        for s in range(steps):
            with common.deterministic_attention(device):
                common._step(model, opt, loss_fn, next(it), s, steps, 1e-3, 1, device)
        torch.cuda.synchronize()
        seconds = (time.time() - t0) / steps
        if prof:
            prof.__exit__(None, None, None)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
            print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15))
    return seconds


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    a = ap.parse_args()
    device = torch.device("cuda")
    model, loss_fn = build(True, device)
    model.train()
    common.seed_everything(0)
    print(f"as trained (batched experts, deterministic): {time_steps(model, loss_fn, a.steps, device):.4f} s/step")
    torch.use_deterministic_algorithms(False)
    print(f"deterministic algorithms off:               {time_steps(model, loss_fn, a.steps, device):.4f} s/step")
    model, loss_fn = build(False, device)
    model.train()
    print(f"transformers' expert loop, det. off:        {time_steps(model, loss_fn, a.steps, device):.4f} s/step")
    model, loss_fn = build(True, device)
    model.train()
    common.seed_everything(0)
    print("profile, as trained:")
    time_steps(model, loss_fn, 10, device, profile=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Quantization speed and memory on layers of real MoE shapes (random weights, real dims).

    python benchmarks/bench_quantize.py --layers 4 [--shape mixtral8x7b|qwen3-30b-a3b|deepseek-v3] [--ranks 1 2 4]

1. writes a sharded safetensors checkpoint of ``--layers`` blocks of the shape (one shard
   per block, the model's own tensor names) with random bf16 weights, in a child process;
2. runs the real pipeline on it in a second child process (streamed block by block,
   random calibration tokens, experts at an average of 2.0 bits with levels 3/2/1, the
   paper's combined order (or --order_type sensitivity), attention, shared experts and
   dense MLPs at 4 bits, group size 128), packs and saves;
3. prints per-phase seconds, peak GPU memory, peak host RSS of the quantizing process,
   mean GPTQ relative output error per module kind, the projection to the full model's
   layer count, and for block 0 the loss of a one-expert-at-a-time GPTQ of two experts for
   comparison.

``--ranks 1 2 4`` repeats step 2 with that many ranks (torchrun, one GPU each; gloo with
``--device cpu``), then prints seconds per layer and speed-up per rank count, and whether
each packed checkpoint equals the one-rank one (tensors that differ, largest difference).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager


FULL_LAYERS = {"mixtral8x7b": 32, "qwen3-30b-a3b": 48, "deepseek-v3": 61}
SHAPES = {  # real dimensions of the models named; --layers of them
    "mixtral8x7b": ("mixtral", dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                    num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
                                    vocab_size=32000, sliding_window=None)),
    "qwen3-30b-a3b": ("qwen3_moe", dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                                        num_experts=128, num_experts_per_tok=8, num_attention_heads=32,
                                        num_key_value_heads=4, head_dim=128, vocab_size=151936)),
    "deepseek-v3": ("deepseek_v3", dict(hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
                                        n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, n_group=8,
                                        topk_group=4, first_k_dense_replace=0, num_attention_heads=128,
                                        num_key_value_heads=128, q_lora_rank=1536, kv_lora_rank=512,
                                        qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
                                        vocab_size=129280)),
}


OVERRIDES = {"hidden": ["hidden_size"], "heads": ["num_attention_heads"], "kv_heads": ["num_key_value_heads"],
             "vocab": ["vocab_size"], "intermediate": ["moe_intermediate_size", "intermediate_size"],
             "experts": ["num_local_experts", "num_experts", "n_routed_experts"]}


def model_config(a):
    from transformers import AutoConfig
    model_type, dims = SHAPES[a.shape]
    dims = dict(dims)
    for flag, keys in OVERRIDES.items():
        if getattr(a, flag, None) is not None:
            key = next(k for k in keys if k in dims)
            dims[key] = getattr(a, flag)
    return AutoConfig.for_model(model_type, num_hidden_layers=a.layers, max_position_embeddings=max(4096, a.seqlen),
                                dtype="bfloat16", **dims)


def make_checkpoint(a, path):
    """Random bf16 weights in the model's own tensor names, one shard per block."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    cfg = model_config(a)
    cfg.save_pretrained(path)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    shapes = {n: tuple(p.shape) for n, p in skeleton.state_dict().items()}
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # random numbers are much faster on the GPU
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(name, shape):
        if name.endswith(("norm.weight", "layernorm.weight")):
            return torch.ones(shape, dtype=torch.bfloat16)
        if name.endswith("e_score_correction_bias"):
            return torch.zeros(shape, dtype=torch.bfloat16)
        t = torch.randn(*shape, generator=g, device=dev) * (1.0 if "embed_tokens" in name else 0.02)
        if name.endswith(("mlp.gate.weight", "router.weight")):   # distinct router norms, as trained ones have
            t *= torch.linspace(0.5, 2, shape[0], device=dev)[:, None]
        return t.to(torch.bfloat16).cpu()

    weight_map, n = {}, a.layers + 1
    groups = [[k for k in shapes if k.startswith(f"model.layers.{i}.")] for i in range(a.layers)]
    groups.append([k for k in shapes if not k.startswith("model.layers.")])
    for i, names in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file({k: rnd(k, shapes[k]) for k in names}, os.path.join(path, fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in names})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


_PEAK = [0.0]  # the whole run's peak: resetting VmHWM below also resets what getrusage reports


def _host_peak_gib(reset: bool = False) -> float:
    """Peak RSS of this process since the last reset (Linux: VmHWM; writing 5 to
    clear_refs resets it), so each block's peak can be read on its own."""
    with open("/proc/self/status") as f:
        hwm = next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) / 2**20
    _PEAK[0] = max(_PEAK[0], hwm)
    if reset:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    return hwm


def run(a, path):
    import torch

    from moeq.config import QuantConfig, parse_size
    from moeq.quant.format import ShardWriter
    from moeq.quant.gptq import gptq_quantize
    from moeq.utils import distributed
    from moeq.utils.families import family_for
    from moeq.utils.loading import BlockLoader, TensorSource, load_skeleton
    from moeq.utils.pipeline import phase, quantize_model

    ranks, device = distributed.start(a.device)   # under torchrun: this rank's GPU (or the CPU, gloo)
    device = device or torch.device(a.device)
    t0 = time.time()
    model = load_skeleton(path, torch.bfloat16)
    family = family_for(model)
    block_rss = []   # per block: peak host RSS while it was quantized, pending packed shard bytes

    class TracingLoader(BlockLoader):
        @contextmanager
        def block(self, name, block, keep=None):
            _host_peak_gib(reset=True)
            with super().block(name, block, keep) as b:
                yield b
            block_rss.append({"block": name, "peak_rss_gib": _host_peak_gib(),
                              "pending_shard_mib": writer.pending_bytes / 2**20 if writer else 0.0})

    loader = TracingLoader(family, device, TensorSource(path), torch.bfloat16, keep=False)
    loader.materialize_rest(model)
    setup = time.time() - t0
    windows = torch.randint(0, model.config.vocab_size, (a.nsamples, a.seqlen),
                            generator=torch.Generator().manual_seed(0))
    reference = {}

    def check(name, W, H, bits, res, first):  # block 0 only: a plain one-expert GPTQ call for two experts
        if name.startswith("model.layers.0.") and a.reference_experts and first == 0:
            for e in range(min(a.reference_experts, W.shape[0])):
                one = gptq_quantize(W[e:e + 1], H[e:e + 1], [bits[e]], 128)
                reference[f"{name}[{e}]"] = (float(res["loss"][e]), float(one.loss[0]))

    cfg = QuantConfig(order_type=a.order_type, avg_bits=2.0, high_bits=3, mid_bits=2, low_bits=1, attn_bits=4,
                      groupsize=128, batch_size=a.batch_size, expert_batch=a.expert_batch, grid=a.quant_grid)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    act = torch.device("cpu") if a.offload_activations else device
    out = os.path.join(os.path.dirname(os.path.abspath(path)), f"packed_{ranks.size}ranks")
    if ranks.main:
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(out)
    # packed tensors stream to disk as made, by rank 0
    writer = ShardWriter(out, 128, False, parse_size(a.shard_size)) if ranks.main else None
    t0 = time.time()
    report = quantize_model(model, family, windows, cfg, device, act, loader, writer, on_experts=check, ranks=ranks)
    quant_s = time.time() - t0
    peak_gpu = ranks.agree_max(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
    peak_rss = ranks.agree_max(int(max(_PEAK[0], _host_peak_gib()) * 2**30)) / 2**30
    distributed.stop(ranks)
    if not ranks.main:
        return
    with phase(report, "save_packed", device):
        sizes = writer.finish(model.config.to_dict())
    kinds = {}
    for row in report.modules:
        kind = row["name"].split(".")[-1].split("[")[0]
        if row["rel_err"] is not None:   # None: an expert routed no calibration token
            kinds.setdefault(kind, []).append(row["rel_err"])
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "ranks": ranks.size,
        "packed_dir": out, "layers": a.layers, "nsamples": a.nsamples, "seqlen": a.seqlen, "offload_activations": a.offload_activations,
        "setup_s": setup, "quantize_s": quant_s, "phases_s": report.timings,
        "per_layer_s": (quant_s - report.timings.get("capture", 0) - report.timings.get("callback", 0)) / a.layers,
        "peak_gpu_gib": peak_gpu / 2**30 if peak_gpu is not None else None,   # the most of any rank
        "peak_rss_gib": peak_rss, "per_block_rss": block_rss,                  # the same; per block: rank 0
        "mean_rel_err": {k: sum(v) / len(v) for k, v in kinds.items()},
        "reference_check": reference, "packed_gib": sizes["disk_bytes"] / 2**30,
        "packed_vs_theory": sizes["disk_bytes"] / sizes["theoretical_bytes"],
        "avg_expert_bits": report.avg_expert_bits(), "starved_experts": len(report.starved),
    }
    result["full_layers"] = FULL_LAYERS[a.shape]
    result["projected_full_min"] = (result["per_layer_s"] * FULL_LAYERS[a.shape] + report.timings.get("capture", 0)) / 60
    print("RESULT " + json.dumps(result))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="mixtral8x7b", help="whose real dimensions")
    ap.add_argument("--expert_batch", type=int, default=0, help="experts quantized at once (0: as memory allows)")
    ap.add_argument("--quant_grid", default="search", choices=["search", "minmax"], help="the groups' grid")
    ap.add_argument("--order_type", default="combined", choices=["combined", "sensitivity"],
                    help="the expert order (sensitivity: a GPTQ pass per width first, phase gptq_sensitivity)")
    for k in ("hidden", "intermediate", "heads", "kv_heads", "experts", "vocab"):
        ap.add_argument(f"--{k}", type=int, default=None, help=f"override the shape's {k} (small CPU runs)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1],
                    help="run with each of these rank counts (torchrun, a GPU each; gloo with --device cpu)")
    ap.add_argument("--offload_activations", action="store_true")
    ap.add_argument("--reference_experts", type=int, default=2)
    ap.add_argument("--shard_size", default="2GB", help="packed shard size (host RAM holds up to one pending shard)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json_out", default=None)
    ap.add_argument("--_stage", choices=["make", "run"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_path", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._stage == "make":
        return make_checkpoint(a, a._path)
    if a._stage == "run":
        return run(a, a._path)
    work = a.workdir or tempfile.mkdtemp()
    a.workdir = work
    path = os.path.join(work, f"{a.shape}_{a.layers}l")
    os.makedirs(path, exist_ok=True)
    args = [a for a in sys.argv[1:]]
    if "--workdir" not in args:
        args += ["--workdir", work]
    t0 = time.time()
    if os.path.isfile(os.path.join(path, "model.safetensors.index.json")):   # same shape and layers: reused
        print(f"checkpoint reused: {path}")
    else:
        subprocess.run([sys.executable, __file__, *args, "--_stage", "make", "--_path", path], check=True)
        print(f"checkpoint written in {time.time() - t0:.1f}s: {path}")
    results = []
    for n in a.ranks:
        res = run_stage(n, args, path)
        print_result(a, res)
        results.append(res)
    if len(a.ranks) > 1:
        compare_ranks(results)
    for res in results[1:]:
        shutil.rmtree(res["packed_dir"], ignore_errors=True)
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(results[0] if len(results) == 1 else results, f, indent=1)


def run_stage(n: int, args: list[str], path: str) -> dict:
    """Step 2 in a child process, or in ``n`` ranks under torchrun: rank 0's RESULT."""
    launch = [sys.executable] if n == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                              "--nproc_per_node", str(n)]
    # torchrun gives each rank one CPU thread unless told: the one-rank run gets the same, so the
    # runs compare like for like (bf16 CPU matmuls also round differently with other thread counts)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    r = subprocess.run([*launch, __file__, *args, "--_stage", "run", "--_path", path], capture_output=True, text=True,
                       env=env)
    if r.returncode:
        sys.exit(f"the quantizing process ({n} rank(s)) failed:\n{r.stderr[-4000:]}")
    line = next(l for l in r.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[7:])


def print_result(a, res: dict) -> None:
    print(f"command: python benchmarks/bench_quantize.py {' '.join(sys.argv[1:])}")
    print(f"device: {res['device']}, {res['ranks']} rank(s); {a.shape}: {res['layers']} layer(s), {res['nsamples']} x "
          f"{res['seqlen']} calibration tokens; grid {a.quant_grid}; order {a.order_type}")
    for k, v in res["phases_s"].items():
        print(f"  {k:<18} {v:8.2f} s" + ("   (reference check, excluded)" if k == "callback" else ""))
    print(f"  per layer          {res['per_layer_s']:8.2f} s   (total quantize {res['quantize_s']:.1f} s, "
          f"projection to the full {res['full_layers']} layers {res['projected_full_min']:.1f} min)")
    print(f"peak GPU memory {res['peak_gpu_gib']} GiB; peak host RSS {res['peak_rss_gib']:.2f} GiB"
          + (" (the most of any rank; per block below: rank 0)" if res["ranks"] > 1 else ""))
    for b in res["per_block_rss"]:
        print(f"  {b['block']:<18} peak host RSS {b['peak_rss_gib']:.3f} GiB "
              f"(packed shard pending: {b['pending_shard_mib']:.0f} MiB)")
    print("mean relative output error: " + ", ".join(f"{k} {v:.4g}" for k, v in res["mean_rel_err"].items()))
    for k, (batched, single) in res["reference_check"].items():
        print(f"  {k}: batched {batched:.6g} vs one-expert GPTQ {single:.6g} ({(batched / single - 1) * 100:+.3f}%)")
    print(f"packed size {res['packed_gib']:.3f} GiB, {res['packed_vs_theory']:.4f} x theory; "
          f"avg expert bits {res['avg_expert_bits']}")


def compare_ranks(results: list[dict]) -> None:
    """Seconds per layer and speed-up by rank count; each packed checkpoint against the first's."""
    import torch
    from safetensors import safe_open
    base = results[0]
    print(f"{'ranks':>5} {'s/layer':>8} {'speed-up':>8}  packed checkpoint vs {base['ranks']} rank(s)")
    for res in results:
        files = sorted(f for f in os.listdir(base["packed_dir"]) if f.endswith(".safetensors"))
        differ, most = 0, 0.0
        for fname in files:
            with safe_open(os.path.join(base["packed_dir"], fname), "pt") as fa, \
                    safe_open(os.path.join(res["packed_dir"], fname), "pt") as fb:
                for k in fa.keys():
                    x, y = fa.get_tensor(k), fb.get_tensor(k)
                    if not torch.equal(x, y):
                        differ += 1
                        most = max(most, (x.double() - y.double()).abs().max().item())
        same = "identical" if differ == 0 else f"{differ} tensors differ, largest difference {most:.3g}"
        res["same_as_first"] = differ == 0
        print(f"{res['ranks']:>5} {res['per_layer_s']:>8.2f} {base['per_layer_s'] / res['per_layer_s']:>7.2f}x  {same}")


if __name__ == "__main__":
    main()

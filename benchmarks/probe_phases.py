#!/usr/bin/env python
"""Where bench_quantize.py's phases spend their time, one level down: wraps the named
functions below with device-synchronised timers, then runs bench_quantize.py's quantizing
stage in this process (the random checkpoint is written first by its own stage, as usual).

    python benchmarks/probe_phases.py --reference_experts 0 --layers 1 --shape deepseek-v3 --workdir /tmp/ds

Arguments are bench_quantize.py's. Prints its usual report, then per wrapped function the
calls and inclusive seconds (nested functions count in both). The synchronisation adds a
little time; the phases' sum stays comparable with a plain bench_quantize.py run.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_quantize  # noqa: E402

TIMES: dict[str, list] = defaultdict(lambda: [0, 0.0])
TARGETS = [  # module, owner (None: the module), attribute
    ("moeq.quant.gptq", None, "gptq_quantize"), ("moeq.quant.gptq", None, "_prepare"),
    ("moeq.quant.gptq", None, "_inverse_cholesky"), ("moeq.quant.gptq", "_BlockRunner", "__call__"),
    ("moeq.quant.gptq", None, "dequantize_groups"), ("moeq.quant.gptq", None, "output_error"),
    ("moeq.quant.format", None, "pack_codes"), ("moeq.quant.format", None, "encode_zero"),
    ("moeq.quant.format", "PackedWriter", "add_experts"), ("moeq.quant.format", "ShardWriter", "_flush"),
    ("moeq.utils.sequential", "HessianAccumulator", "add"), ("moeq.utils.sequential", "HessianAccumulator", "hessian"),
    ("moeq.utils.pipeline", "_ExpertStats", "add"), ("moeq.utils.pipeline", "_ExpertStats", "replay"),
    ("moeq.utils.pipeline", None, "_collect_moe_stats"), ("moeq.utils.pipeline", None, "_check_scales"),
    ("moeq.utils.pipeline", None, "_share"), ("moeq.utils.pipeline", None, "_gptq_experts"),
    ("moeq.utils.pipeline", None, "_check_inputs"), ("moeq.utils.pipeline", None, "run_block"),
    ("moeq.utils.loading", None, "materialize"), ("moeq.utils.loading", None, "release"),
]


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(name, fn):
    def wrapper(*args, **kwargs):
        _sync()
        t0 = time.time()
        try:
            return fn(*args, **kwargs)
        finally:
            _sync()
            TIMES[name][0] += 1
            TIMES[name][1] += time.time() - t0
    return wrapper


def install() -> None:
    import importlib
    from moeq.utils import families
    for module, owner, attr in TARGETS:
        mod = importlib.import_module(module)
        target = getattr(mod, owner) if owner else mod
        setattr(target, attr, _timed(f"{owner + '.' if owner else ''}{attr}", getattr(target, attr)))
    for name in dir(families):   # each family adapter's expert inputs (the down projection's need a forward)
        cls = getattr(families, name)
        if isinstance(cls, type) and "expert_inputs" in vars(cls):
            cls.expert_inputs = _timed(f"{name}.expert_inputs", cls.expert_inputs)


def block_timing(B: int = 47, R: int = 4096, bs: int = 128, reps: int = 10) -> None:
    """One GPTQ column block of B experts (DeepSeek-V3's gate/up chunk): the whole block step
    (CUDA graph) against the group-parameter search alone, eager vs the fused group error."""
    from moeq.quant import gptq, quantizer
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    w = torch.randn(B, R, bs, device=dev, generator=g) * 0.02
    x = torch.randn(B, 4 * bs, bs, device=dev, generator=g)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(x.mT @ x / (4 * bs))), upper=True)
    widths = [3, 3] + [2] * (B - 4) + [1, 1]
    bits_t = torch.tensor(widths, device=dev)
    maxq = (2.0 ** bits_t.float() - 1).view(-1, 1)
    colw = 1 / torch.diagonal(hinv, dim1=-2, dim2=-1)[:, None, :].square()
    parts = gptq._parts(bits_t)

    def clock(fn):
        fn()
        _sync()
        t0 = time.time()
        for _ in range(reps):
            fn()
        _sync()
        return (time.time() - t0) / reps * 1e3

    steps, codes = {}, {}
    for fused in (False, True):
        runner = gptq._BlockRunner(B, R, bs, bs, bits_t, maxq, False, "search", dev, torch.float32, graphs=True,
                                   fused=fused)
        steps[fused] = clock(lambda: runner(w, hinv))
        codes[fused] = runner(w, hinv)[0].clone()
    differ = (codes[True] != codes[False]).float().mean().item()
    fused = clock(lambda: gptq._batch_params(w, colw, bits_t, parts, False, "search"))
    real = quantizer.group_error
    quantizer.group_error = quantizer._group_error_eager
    try:
        eager = clock(lambda: gptq._batch_params(w, colw, bits_t, parts, False, "search"))
    finally:
        quantizer.group_error = real
    print(f"GPTQ block of {B} x {R} x {bs}: whole step (CUDA graph) {steps[True]:.2f} ms with the fused column "
          f"kernel, {steps[False]:.2f} ms eager (codes differing: {differ:.2e}); group search alone: fused error "
          f"{fused:.2f} ms, eager error {eager:.2f} ms")


def main() -> None:
    args = sys.argv[1:]
    work = args[args.index("--workdir") + 1] if "--workdir" in args else "/tmp/probe_phases"
    layers = args[args.index("--layers") + 1] if "--layers" in args else "1"
    shape = args[args.index("--shape") + 1] if "--shape" in args else "mixtral8x7b"
    path = os.path.join(work, f"{shape}_{layers}l")
    os.makedirs(path, exist_ok=True)
    script = bench_quantize.__file__
    if not os.path.isfile(os.path.join(path, "model.safetensors.index.json")):
        subprocess.run([sys.executable, script, *args, "--_stage", "make", "--_path", path], check=True)
    install()
    sys.argv = [script, *args, "--_stage", "run", "--_path", path]
    bench_quantize.main()   # prints RESULT {...}
    print(f"command: python benchmarks/probe_phases.py {' '.join(args)}")
    print(f"{'function':<36} {'calls':>8} {'seconds':>9}")
    for name, (calls, seconds) in sorted(TIMES.items(), key=lambda kv: -kv[1][1]):
        print(f"{name:<36} {calls:>8} {seconds:>9.2f}")
    if torch.cuda.is_available():
        block_timing()


if __name__ == "__main__":
    main()

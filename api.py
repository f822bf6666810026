"""The one quantization run, under both CLIs and reproduce_tables.py:

    result = quantize(RunConfig(...))

checks the config and the output location, builds the model on the meta device and streams
it block by block from its shards, makes the calibration data, quantizes (utils/pipeline.py),
writes the checkpoint atomically (packed tensors stream to disk while quantizing), evaluates,
and returns a QuantizeResult that carries its config, the per-layer / per-expert report and
the timings. ``results.json`` and ``bit_allocation.json`` are written beside the checkpoint.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass, field

import torch

from .config import ConfigError, RunConfig, parse_size
from .utils import tasks
from .utils.pipeline import QuantReport


@dataclass
class QuantizeResult:
    config: RunConfig
    report: QuantReport                      # per layer: order, bits, scores; per matrix: error, tokens, seconds
    calibration: dict                        # where the calibration data came from, how much
    evaluation: dict = field(default_factory=dict)   # "unquantized" / "quantized" -> scores
    sizes: dict | None = None                # packed checkpoint bytes (disk, theory, codes, overhead)
    saved_to: str | None = None
    seconds: dict = field(default_factory=dict)      # load, quantize, save, evaluate, total
    model: object = None                     # the fake-quantized model, when config.keep_model
    ranks: int = 1                           # processes that shared the work (torchrun --nproc_per_node)

    @property
    def avg_bits(self) -> float:
        return self.report.avg_expert_bits()

    def allocation(self) -> dict:
        """bit_allocation.json: the achieved average, and per MoE layer the expert order
        (most sensitive first), bits by expert id and the scores the order came from."""
        q = self.config.quant
        return {"avg_bits": self.avg_bits, "stored_bits_per_expert_weight": self.report.avg_expert_stored_bits(),
                "target_avg_bits": q.avg_bits if q.level_counts is None else None,
                "level_counts": q.to_dict()["level_counts"], "model": self.config.model,
                "router_reference": self.config.router_reference, "method": q.method, "order_type": q.order_type,
                "zeta": q.zeta, "mixed_type": q.mixed_type,
                "levels": {"high": q.high_bits, "mid": q.mid_bits, "low": q.low_bits},
                "attn_bits": q.attn_bits, "shared_bits": q.shared_bits, "dense_bits": q.dense_bits,
                "groupsize": q.groupsize, "sym": q.sym, "act_order": q.act_order,
                "calibration": self.calibration, "quantization_seconds": self.seconds.get("quantize"),
                "starved_experts": self.report.starved, "layers": self.report.layers, "modules": self.report.modules}

    def to_json(self) -> dict:
        """results.json: every figure of the run, how it was made, and with what."""
        import transformers

        from . import __version__
        return {"command": self.config.command, "config": self.config.to_dict(),
                "versions": {"moeq": __version__, "torch": torch.__version__,
                             "transformers": transformers.__version__, "python": sys.version.split()[0]},
                "device": _device_name(self.config), "ranks": self.ranks, "avg_expert_bits": self.avg_bits,
                "stored_bits_per_expert_weight": self.report.avg_expert_stored_bits(),
                "calibration": self.calibration, "evaluation": self.evaluation, "sizes": self.sizes,
                "saved_to": self.saved_to, "seconds": self.seconds, "timings": self.report.timings,
                "layers": [{k: layer[k] for k in ("name", "expert_order", "bits")} for layer in self.report.layers],
                "starved_experts": self.report.starved}


def prepare_data(config: RunConfig) -> tasks.Data:
    """Calibration (and evaluation) data for ``config``; pass it to several ``quantize``
    calls on the same model to tokenize once."""
    from transformers import AutoConfig, AutoTokenizer

    from .utils.loading import resolve_model
    local = resolve_model(config.model)
    return tasks.prepare(config, AutoTokenizer.from_pretrained(local), AutoConfig.from_pretrained(local))


def quantize(config: RunConfig, data: tasks.Data | None = None, *, on_experts=None) -> QuantizeResult:
    """Quantize one model as ``config`` says. Bad input is a ConfigError naming the flag
    and the fix; nothing is left at ``config.saving_path`` unless the whole run succeeds
    (utils/checkpoint.py says what a run guarantees on disk).

    Under torchrun (or in a process group the caller initialized) every rank calls this with
    the same config and shares the work (utils/distributed.py); rank 0 alone prints, writes
    the checkpoint and evaluates; every rank returns the same report."""
    from .utils import checkpoint, distributed
    t_start = time.time()
    for ds in (config.dataset, *config.eval_datasets):
        if os.sep in ds and not os.path.exists(ds):
            raise ConfigError(f"--dataset {ds}: no such file or directory")
    ranks, device = distributed.start(config.device)
    say = _printer(config.verbose and ranks.main)
    out, finished = None, False
    try:
        if config.saving_path is not None and ranks.main:  # claimed before any model is loaded
            out = checkpoint.OutputDir(config.saving_path, config.overwrite,
                                       sources=tuple(p for p in (config.model, config.router_reference) if p),
                                       say=say)
        ranks.on_main(lambda: out.open() if out is not None else None)
        try:
            result = _quantize(config, data, on_experts, out, say, t_start, ranks, device)
        except BaseException:
            if out is not None:
                out.close(failed=True)
            raise
        if out is not None:
            out.close(failed=False)
        finished = True
        return result
    finally:
        distributed.stop(ranks, wait=finished)


def _quantize(config: RunConfig, data, on_experts, out, say, t_start, ranks, device) -> QuantizeResult:
    from .quant.format import ShardWriter
    from .utils.families import family_for
    from .utils.loading import BadWeights, BlockLoader, check_source, router_reference_weights
    from .utils.pipeline import quantize_model

    q, saving, main = config.quant, out is not None, ranks.main   # only rank 0 has ``out``
    device = device or resolve_device(config.device)
    act_device = torch.device("cpu") if config.offload_activations else device
    model, family, source, tokenizer, local, dtype = _open_model(config, device)
    check_widths(model, family, q.groupsize)
    for name, block in family.blocks(model):
        moe = family.moe(block, name)
        if moe is not None:
            q.counts_for(moe.num_experts)
    check_source(model, family, source)
    ranks.on_main(lambda: out.check_space(estimate_checkpoint_bytes(model, family, q, config.pack, dtype))
                  if saving else None)
    # Blocks stream from the shards; they stay on the host afterwards only when something
    # needs them in memory (a dequantized checkpoint, an in-memory evaluation, the caller).
    keep = config.keep_model or (main and ((saving and not config.pack) or
                                           (config.evaluate and not (saving and config.pack))))
    loader = BlockLoader(family, device, source, dtype, keep)
    try:
        loader.materialize_rest(model)
    except BadWeights as e:
        raise ConfigError(str(e)) from None
    say(f"model {config.model}: {type(model).__name__}, {len(family.blocks(model))} blocks, {dtype}, "
        f"streamed block by block from {local}")
    reference = router_reference_weights(config.router_reference, model, family) if config.router_reference \
        else None
    data = data or tasks.prepare(config, tokenizer, model.config)
    say(f"calibration: {data.info['source']}; {data.info['nsamples']} samples")
    seconds = {"load": time.time() - t_start}
    evaluation = {}
    if config.evaluate_fp and main:   # the other ranks wait for rank 0 at the first exchange
        t0 = time.time()
        evaluation["unquantized"] = _evaluate_fp(config, data, model, family, tokenizer, loader, local, dtype,
                                                 device, act_device)
        seconds["evaluate_fp"] = time.time() - t0
        for line in tasks.summary_lines(config, evaluation["unquantized"], "unquantized"):
            say(line)

    sink = ShardWriter(out.tmp, q.groupsize, q.sym, parse_size(config.max_shard_size)) \
        if saving and config.pack else None
    try:   # shards are written in the background: none may still be writing when the folder is removed
        t0 = time.time()
        try:
            report = quantize_model(model, family, data.calibration, q, device, act_device, loader, sink,
                                    router_reference=reference, on_experts=on_experts, log=say, ranks=ranks)
        except BadWeights as e:
            raise ConfigError(str(e)) from None
        seconds["quantize"] = time.time() - t0
        result = QuantizeResult(config, report, data.info, evaluation, None, None, seconds, model if keep else None,
                                ranks.size)
        _summarise(result, say)
        if not main:   # rank 0 writes and evaluates
            result.saved_to = config.saving_path
            return result
        if saving:
            t0 = time.time()
            _write_allocation(result.allocation(), os.path.join(out.tmp, "bit_allocation.json"),
                              config.allocation_png)
            tokenizer.save_pretrained(out.tmp)
            if getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(out.tmp)
            if config.pack:
                result.sizes = sink.finish(model.config.to_dict())
                say(f"packed checkpoint: {result.sizes['disk_bytes'] / 2**20:.2f} MiB on disk, theoretical "
                    f"{result.sizes['theoretical_bytes'] / 2**20:.2f} MiB (codes {result.sizes['code_bytes'] / 2**20:.2f}"
                    f" + scales/zeros {result.sizes['overhead_bytes'] / 2**20:.2f} + unquantized "
                    f"{result.sizes['unquantized_bytes'] / 2**20:.2f})")
            else:
                model.save_pretrained(out.tmp, max_shard_size=config.max_shard_size)
            result.saved_to = config.saving_path
            seconds["save"] = time.time() - t0
            _write_atomically(result.to_json(), os.path.join(out.tmp, "results.json"))  # completed after evaluation
            out.commit()
            say(f"saved {'packed' if config.pack else 'dequantized'} checkpoint to {config.saving_path}")
        else:
            path = config.allocation_path or "bit_allocation.json"
            _write_allocation(result.allocation(), path, config.allocation_png)
            say(f"wrote {path}" + (f" and {_png(path)}" if config.allocation_png else ""))
    except BaseException:
        if sink is not None:
            sink.abandon()
        raise

    if config.evaluate:
        t0 = time.time()
        if not keep:  # blocks were released: evaluate the packed checkpoint just written
            from .inference import load_quantized_model
            model = load_quantized_model(config.saving_path, dtype=dtype, model_class=tasks.model_class(config),
                                         attn_implementation=config.attn_implementation)
            family = family_for(model)
        evaluation["quantized"] = tasks.evaluate(config, data, model, family, tokenizer, device, act_device)
        seconds["evaluate"] = time.time() - t0
    seconds["total"] = time.time() - t_start
    results_path = os.path.join(config.saving_path, "results.json") if saving else \
        os.path.join(os.path.dirname(os.path.abspath(config.allocation_path or "bit_allocation.json")),
                     "results.json")
    _write_atomically(result.to_json(), results_path)
    if "unquantized" in evaluation and "quantized" in evaluation and config.causal:
        for name, ppl in evaluation["quantized"]["ppl"].items():
            say(f"ppl delta vs unquantized ({name}): {ppl - evaluation['unquantized']['ppl'][name]:+.4f}")
    for line in tasks.summary_lines(config, evaluation["quantized"]) if config.evaluate else []:
        say(line)
    return result


def _open_model(config: RunConfig, device: torch.device):
    """The model on the meta device, its family adapter, its weight files (headers read),
    tokenizer, local path and compute dtype; every way this can fail is a ConfigError."""
    from transformers import AutoConfig, AutoTokenizer

    from .quant.format import FormatError
    from .utils.families import family_for
    from .utils.loading import TensorSource, load_skeleton, resolve_model
    local = resolve_model(config.model)
    try:
        model_config = AutoConfig.from_pretrained(local)
    except Exception as e:  # garbled or empty config.json, unknown model type
        raise ConfigError(f"--model {config.model}: cannot read {os.path.join(local, 'config.json')} "
                          f"({str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__}): "
                          f"the checkpoint is damaged or not a transformers model") from None
    qc = getattr(model_config, "quantization_config", None)
    if qc:
        method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", qc)
        raise ConfigError(f"--model {config.model} is already quantized (quant_method {method}): pass the "
                          f"unquantized model it was made from")
    tokenizer = AutoTokenizer.from_pretrained(local)
    dtype = compute_dtype(config.dtype, device, model_config)
    model_class = tasks.model_class(config)
    try:
        model = load_skeleton(local, dtype, config.attn_implementation, model_class)
    except ValueError as e:  # e.g. an encoder-decoder config given to the causal-LM script
        reason = str(e).strip().splitlines()[0][:160]
        if "Unrecognized configuration class" in reason:
            other = "quantize_switch.py for encoder-decoder (Switch) models" if config.causal else \
                "quantize_mixtral.py for decoder-only models"
            raise ConfigError(f"--model {config.model} cannot be built as {model_class.__name__} ({reason}): "
                              f"use {other}") from None
        raise ConfigError(f"--model {config.model} cannot be built ({reason}): check --attn_implementation and "
                          f"--dtype") from None
    try:
        family = family_for(model)
    except ValueError as e:  # not an MoE we know
        raise ConfigError(str(e)) from None
    try:
        source = TensorSource(local)
    except (FileNotFoundError, FormatError) as e:
        raise ConfigError(f"--model {config.model}: {e}") from None
    return model, family, source, tokenizer, local, dtype


def estimate_checkpoint_bytes(model, family, q, pack: bool, dtype) -> int:
    """An upper bound of the checkpoint's size, from the model skeleton: every tensor at
    the compute dtype's size, except (packed) the quantized matrices, at the highest width
    plus a float16 scale and zero per group; 5% for file headers and the rest."""
    itemsize = torch.finfo(dtype).bits // 8
    total = sum(p.numel() for p in model.parameters()) * itemsize
    if pack:
        top = max([q.high_bits, q.low_bits] + ([q.mid_bits] if q.mid_bits else []) +
                  (list(q.level_counts) if q.level_counts else []) +
                  ([int(q.avg_bits)] if q.mixed_type == "uniform" else []))

        def packed_minus_dense(w, bits):
            groups = w.numel() // (w.shape[-1] if q.groupsize <= 0 else q.groupsize)
            return w.numel() * bits // 8 + groups * 4 - w.numel() * itemsize

        for name, block in family.blocks(model):
            moe = family.moe(block, name)
            if q.attn_bits:
                total += sum(packed_minus_dense(lin.weight, q.attn_bits) for _, lin in family.attention_linears(block))
            mlp_bits = q.shared_bits if moe is not None else q.dense_bits
            if mlp_bits:
                total += sum(packed_minus_dense(lin.weight, mlp_bits) for _, lin in family.mlp_linears(block))
            total += sum(packed_minus_dense(m.get(), top) for m in (moe.matrices if moe else []))
    return int(total * 1.05)


def evaluate_unquantized(config: RunConfig, data: tasks.Data | None = None) -> dict:
    """The unquantized model's scores on ``config``'s evaluation (as quantize's evaluate_fp)."""
    from transformers import AutoTokenizer

    from .utils.families import family_for
    from .utils.loading import BlockLoader, TensorSource, load_skeleton, resolve_model
    local = resolve_model(config.model)
    device = resolve_device(config.device)
    act_device = torch.device("cpu") if config.offload_activations else device
    from transformers import AutoConfig
    dtype = compute_dtype(config.dtype, device, AutoConfig.from_pretrained(local))
    model = load_skeleton(local, dtype, config.attn_implementation, tasks.model_class(config))
    family = family_for(model)
    loader = BlockLoader(family, device, TensorSource(local), dtype, keep=False)
    loader.materialize_rest(model)
    tokenizer = AutoTokenizer.from_pretrained(local)
    data = data or tasks.prepare(dataclasses.replace(config, evaluate=True), tokenizer, model.config)
    return _evaluate_fp(config, data, model, family, tokenizer, loader, local, dtype, device, act_device)


def _evaluate_fp(config, data, model, family, tokenizer, loader, local, dtype, device, act_device) -> dict:
    if config.causal:  # block by block from the shards: the model need not fit anywhere
        return tasks.evaluate(config, data, model, family, tokenizer, device, act_device, loader=loader,
                              keep=False, desc="ppl (fp)")
    fp = tasks.model_class(config).from_pretrained(local, dtype=dtype)
    return tasks.evaluate(config, data, fp, family, tokenizer, device, act_device)


def _summarise(result: QuantizeResult, say) -> None:
    q, report = result.config.quant, result.report
    target = q.avg_bits if q.level_counts is None else f"explicit counts {q.level_counts}"
    say(f"quantized in {result.seconds['quantize']:.1f}s; average expert bits {result.avg_bits:.4f} "
        f"(target {target}); {report.avg_expert_stored_bits():.4f} bits per expert weight as stored, "
        f"with scales and zero points")
    for layer in report.layers:
        say(f"  {layer['name']}: bits by expert {' '.join(map(str, layer['bits']))}; "
            f"order {' '.join(map(str, layer['expert_order']))}")
    if report.starved:
        say(f"experts with fewer than {q.min_expert_tokens} calibration tokens (all-token Hessian used): "
            + ", ".join(f"{s['layer']}[{s['expert']}]={s['tokens']}" for s in report.starved))


def _write_allocation(allocation: dict, path: str, png: bool = True) -> None:
    """bit_allocation.json and (``png``) its picture, bit_allocation.png, side by side."""
    from .quant.format import write_json
    from .utils.plots import allocation_png
    write_json(allocation, path)
    if png:
        allocation_png(allocation, _png(path))


def _png(json_path: str) -> str:
    return os.path.splitext(json_path)[0] + ".png"


def _printer(verbose: bool):
    if not verbose:
        return lambda line: None
    from tqdm.auto import tqdm
    return lambda line: tqdm.write(line, file=sys.stdout)  # clears any progress bar (stderr) first


def _write_atomically(obj, path: str) -> None:
    from .quant.format import write_json
    tmp = f"{path}.partial-{os.getpid()}"
    write_json(obj, tmp)
    os.replace(tmp, path)


def _device_name(config: RunConfig) -> str:
    device = resolve_device(config.device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA GPU is visible to torch here: use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) are visible")
    return device


def compute_dtype(name: str, device: torch.device, model_config) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    if device.type != "cuda":
        return torch.float32
    d = getattr(model_config, "dtype", None) or getattr(model_config, "torch_dtype", None)
    return getattr(torch, d) if isinstance(d, str) else (d or torch.bfloat16)


def check_widths(model, family, groupsize: int) -> None:
    if groupsize <= 0:
        return
    for block_name, block in family.blocks(model):
        widths = {f"{block_name}.{n}": lin.in_features
                  for n, lin in family.attention_linears(block) + family.mlp_linears(block)}
        moe = family.moe(block, block_name)
        if moe is not None:
            widths.update({f"{moe.name}: {m.name}": m.get().shape[2] for m in moe.matrices})
        for name, w in widths.items():
            if w % groupsize:
                raise ConfigError(f"--groupsize {groupsize} does not divide the input width {w} of {name}: "
                                  f"choose a divisor of it (e.g. 32, 64) or -1 for per-row groups")

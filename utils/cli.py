"""Command-line front end shared by quantize_mixtral.py and quantize_switch.py."""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

import torch

from quant.allocation import ORDER_TYPES

MODEL_ALIASES = {
    "Mixtral8x7B": "mistralai/Mixtral-8x7B-v0.1",
    "Mixtral8x22B": "mistralai/Mixtral-8x22B-v0.1",
}


class UserError(Exception):
    """Bad input: printed as one line, exit code 2."""


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", required=True, help="local checkpoint directory, hub id, or an alias: "
                    + ", ".join(MODEL_ALIASES))
    ap.add_argument("--method", default="gptq", choices=["gptq", "rtn"],
                    help="gptq, or rtn: round-to-nearest on the same grid (the baseline)")
    ap.add_argument("--mixed_type", default="mixed", choices=["mixed", "uniform"])
    ap.add_argument("--order_type", default="combined", help="expert ranking: " + ", ".join(ORDER_TYPES))
    ap.add_argument("--zeta", type=float, default=3.0, help="MaxVar reordering threshold (combined order)")
    ap.add_argument("--avg_bits", type=float, default=2.0, help="target average bits per expert in a MoE layer")
    ap.add_argument("--high_bit_level", type=int, default=3)
    ap.add_argument("--mid_bit_level", type=int, default=None, help="omit for two levels")
    ap.add_argument("--low_bit_level", type=int, default=1)
    ap.add_argument("--attn_bit_level", type=int, default=4, help="bits for attention linears (16: keep them fp)")
    ap.add_argument("--groupsize", type=int, default=128, help="GPTQ group size (-1: one group per row)")
    ap.add_argument("--dataset", default="wikitext2", help="wikitext2 | ptb | c4 (hub) or a local text file / "
                    "directory with train/test files")
    ap.add_argument("--eval_dataset", default=None, help="evaluate perplexity on this text instead (same forms)")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048, help="capped by the model's max_position_embeddings")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--percdamp", type=float, default=0.01)
    ap.add_argument("--sym", action="store_true")
    ap.add_argument("--act-order", "--act_order", dest="act_order", action="store_true")
    ap.add_argument("--min_expert_tokens", type=int, default=16,
                    help="experts routed fewer calibration tokens use Hessians from all tokens")
    ap.add_argument("--batch_size", type=int, default=8, help="calibration windows per forward batch")
    ap.add_argument("--expert_batch", type=int, default=0, help="experts per batched GPTQ call (0: all)")
    ap.add_argument("--router_reference", default=None,
                    help="checkpoint of the same model before training: order by router-norm change")
    ap.add_argument("--attn_implementation", default="sdpa")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"],
                    help="compute dtype (auto: the checkpoint's on CUDA, float32 on CPU)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--offload_activations", action="store_true", help="keep calibration activations on the host")
    ap.add_argument("--eval_ppl", action="store_true", help="perplexity of the quantized model on the test split")
    ap.add_argument("--eval_ppl_fp", action="store_true", help="also evaluate the unquantized model first")
    ap.add_argument("--pack", action="store_true", help="save the packed low-bit checkpoint (else dequantized)")
    ap.add_argument("--save", action="store_true")
    ap.add_argument("--saving_path", default=None)
    ap.add_argument("--max_shard_size", default="5GB")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty --saving_path")
    ap.add_argument("--allocation_path", default=None,
                    help="where bit_allocation.json goes when not saving (default: ./bit_allocation.json)")


def resolve_model(name: str) -> str:
    name = MODEL_ALIASES.get(name, name)
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise UserError(f"--model {name} has no config.json: pass a transformers checkpoint directory")
        return name
    if os.path.exists(name) or name.startswith((".", "/", "~")) or not re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        raise UserError(f"--model {name}: no such checkpoint directory (nor a hub id of the form org/name)")
    return name


def quant_config(a, router_reference=None):
    from utils.pipeline import QuantConfig
    return QuantConfig(method=a.method, mixed_type=a.mixed_type, order_type=a.order_type, zeta=a.zeta, avg_bits=a.avg_bits,
                       high_bits=a.high_bit_level, mid_bits=a.mid_bit_level, low_bits=a.low_bit_level,
                       level_counts=getattr(a, "level_counts", None),
                       attn_bits=None if a.attn_bit_level >= 16 else a.attn_bit_level, groupsize=a.groupsize,
                       sym=a.sym, act_order=a.act_order, percdamp=a.percdamp, seed=a.seed,
                       min_expert_tokens=a.min_expert_tokens, batch_size=a.batch_size, expert_batch=a.expert_batch,
                       router_reference=router_reference)


def _dtype(a, device, config):
    if a.dtype != "auto":
        return getattr(torch, a.dtype)
    if device.type != "cuda":
        return torch.float32
    d = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return getattr(torch, d) if isinstance(d, str) else (d or torch.bfloat16)


def check_widths(model, family, groupsize: int) -> None:
    if groupsize <= 0:
        return
    for block_name, block in family.blocks(model):
        widths = {f"{block_name}.{n}": l.in_features for g in family.attention_groups(block) for n, l in g}
        moe = family.moe(block, block_name)
        if moe is not None:
            widths.update({f"{moe.name}.experts.{m.name}": m.get().shape[2] for m in moe.matrices})
        for name, w in widths.items():
            if w % groupsize:
                raise UserError(f"--groupsize {groupsize} does not divide the input width {w} of {name}: "
                                f"choose a divisor of it (e.g. 32, 64) or -1 for per-row groups")


def router_reference_weights(path: str, model, family) -> dict[str, torch.Tensor]:
    """Router rows of a reference checkpoint (same architecture), keyed by MoE block name.
    Only the router tensors are read."""
    from utils.loading import TensorSource, resolve_local
    if not os.path.isdir(path) and not re.fullmatch(r"[\w.-]+/[\w.-]+", path):
        raise UserError(f"--router_reference {path}: no such checkpoint directory")
    try:
        source = TensorSource(resolve_local(path))
    except FileNotFoundError as e:
        raise UserError(f"--router_reference: {e}")
    out = {}
    for name, block in family.blocks(model):
        moe = family.moe(block, name)
        if moe is None:
            continue
        try:
            ref = family.read_tensor(source, family.router_param_name(moe))
        except KeyError:
            raise UserError(f"--router_reference {path} has no router for {moe.name}: pass a checkpoint of the "
                            f"same architecture")
        if tuple(ref.shape) != tuple(family.router_weight(moe).shape):
            raise UserError(f"--router_reference: router of {moe.name} has shape {tuple(ref.shape)}, the model's "
                            f"{tuple(family.router_weight(moe).shape)}: pass a checkpoint of the same architecture")
        out[moe.name] = ref.float()
    return out


class CausalLMTask:
    """quantize_mixtral.py: decoder-only LM; calibration windows of text; perplexity."""
    name = "causal"

    def model_class(self):
        from transformers import AutoModelForCausalLM
        return AutoModelForCausalLM

    def wants_eval(self, a) -> bool:
        return a.eval_ppl

    def calibration(self, a, tokenizer, config):
        from utils import data
        self.seqlen = min(a.seqlen, getattr(config, "max_position_embeddings", a.seqlen) or a.seqlen)
        try:
            text = data.load_text(a.dataset)
            self.eval_text = data.load_text(a.eval_dataset) if a.eval_dataset else text
        except (FileNotFoundError, ValueError) as e:
            raise UserError(str(e))
        print(f"calibration text: {text.source}")
        try:
            calib = data.calibration_windows(data.tokenize(tokenizer, text.train), a.nsamples, self.seqlen, a.seed)
            self.test = data.eval_windows(data.tokenize(tokenizer, self.eval_text.test), self.seqlen) \
                if (a.eval_ppl or a.eval_ppl_fp) else None
        except ValueError as e:
            raise UserError(str(e))
        print(f"calibration: {calib.shape[0]} windows x {self.seqlen} tokens")
        return calib, {"source": text.source, "nsamples": int(calib.shape[0]), "seqlen": self.seqlen}

    def evaluate_fp(self, a, model, family, loader, device, act_device):
        if not a.eval_ppl_fp:
            return
        from utils.perplexity import perplexity
        self.ppl_fp = perplexity(model, family, self.test, device, a.batch_size, act_device, desc="ppl (fp)",
                                 loader=loader, keep=False)
        print(f"ppl {self.eval_text.name} (unquantized): {self.ppl_fp:.4f}")

    def evaluate(self, a, model, family, device, act_device):
        from utils.perplexity import perplexity
        ppl = perplexity(model, family, self.test, device, a.batch_size, act_device, desc="ppl")
        if getattr(self, "ppl_fp", None) is not None:
            print(f"ppl delta vs unquantized: {ppl - self.ppl_fp:+.4f}")
        print(f"ppl {self.eval_text.name}: {ppl:.4f}")


def run_causal_lm(a) -> int:
    return run(a, CausalLMTask())


class Seq2SeqTask:
    """quantize_switch.py: encoder-decoder MoE; calibration from source/target pairs;
    evaluation = teacher-forced target loss and ROUGE of greedy generations."""
    name = "seq2seq"

    def model_class(self):
        from transformers import AutoModelForSeq2SeqLM
        return AutoModelForSeq2SeqLM

    def wants_eval(self, a) -> bool:
        return a.eval

    def calibration(self, a, tokenizer, config):
        from utils import data
        try:
            self.pairs = data.load_pairs(a.dataset)
            calib = data.pair_windows(tokenizer, self.pairs.train, a.nsamples, a.src_len, a.tgt_len, a.seed)
        except (FileNotFoundError, ValueError) as e:
            raise UserError(str(e))
        self.tokenizer = tokenizer
        print(f"calibration pairs: {self.pairs.source}; {a.nsamples} x ({a.src_len} source + {a.tgt_len} target) tokens")
        return calib, {"source": self.pairs.source, "nsamples": a.nsamples, "src_len": a.src_len, "tgt_len": a.tgt_len}

    def evaluate_fp(self, a, model, family, loader, device, act_device):
        if a.eval_fp:
            fp = self.model_class().from_pretrained(resolve_model(a.model), dtype=model.dtype).to(device)
            self.fp = self._evaluate(a, fp, device, "unquantized")
            del fp

    def evaluate(self, a, model, family, device, act_device):
        self._evaluate(a, model.to(device), device, None)

    @torch.no_grad()
    def _evaluate(self, a, model, device, tag):
        from rouge_score import rouge_scorer
        tok, scorer = self.tokenizer, rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
        nll = count = 0
        rouge = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
        pairs = self.pairs.test[: a.eval_samples]
        for source, target in pairs:
            src = tok(source, return_tensors="pt", truncation=True, max_length=a.src_len).input_ids.to(device)
            tgt = tok(target, return_tensors="pt", truncation=True, max_length=a.tgt_len).input_ids.to(device)
            loss = model(input_ids=src, labels=tgt).loss
            nll += float(loss) * tgt.shape[1]
            count += tgt.shape[1]
            gen = model.generate(src, max_new_tokens=a.tgt_len, do_sample=False)
            scores = scorer.score(tok.decode(tgt[0], skip_special_tokens=True), tok.decode(gen[0], skip_special_tokens=True))
            for k in rouge:
                rouge[k] += scores[k].fmeasure / len(pairs)
        label = f"{self.pairs.name}" + (f" ({tag})" if tag else "")
        print(f"eval loss {label}: {nll / count:.4f} over {count} target tokens of {len(pairs)} test pairs")
        print(f"rouge {label}: " + " ".join(f"{k} {100 * v:.2f}" for k, v in rouge.items()))
        return nll / count


def run_seq2seq(a) -> int:
    if a.reference_model:
        a.router_reference = a.reference_model
    counts = {b: n for b, n in ((a.high_bit_level, a.num_high_bit_experts), (a.mid_bit_level, a.num_mid_bit_experts),
                                (a.low_bit_level, a.num_low_bit_experts)) if n is not None}
    if counts:
        if None in counts:
            raise UserError("--num_mid_bit_experts needs --mid_bit_level")
        a.level_counts = counts
    return run(a, Seq2SeqTask())


def add_seq2seq_args(ap: argparse.ArgumentParser) -> None:
    ap.set_defaults(dataset="cnn_dailymail", low_bit_level=2, attn_implementation=None)
    ap.add_argument("--reference_model", default=None,
                    help="the pretrained checkpoint MODEL was fine-tuned from: order by router-norm change")
    ap.add_argument("--num_high_bit_experts", type=int, default=None, help="explicit count per level "
                    "(instead of --avg_bits), as the paper repo's Switch script takes")
    ap.add_argument("--num_mid_bit_experts", type=int, default=None)
    ap.add_argument("--num_low_bit_experts", type=int, default=None)
    ap.add_argument("--src_len", type=int, default=256, help="source tokens per calibration pair")
    ap.add_argument("--tgt_len", type=int, default=64, help="target tokens per calibration pair")
    ap.add_argument("--eval", action="store_true", help="held-out target loss and ROUGE after quantization")
    ap.add_argument("--eval_fp", action="store_true", help="also evaluate the unquantized model first")
    ap.add_argument("--eval_samples", type=int, default=64)


def run(a, task) -> int:
    """Quantize one model: checks, streamed load, calibration, pipeline, atomic save, evaluation."""
    from transformers import AutoConfig, AutoTokenizer

    from utils import checkpoint
    from utils.families import family_for
    from utils.loading import BadWeights, BlockLoader, TensorSource, load_skeleton, resolve_local
    from utils.pipeline import quantize_model, validate_config

    cfg = quant_config(a)
    try:
        validate_config(cfg)
    except ValueError as e:
        raise UserError(str(e))
    if a.save and not a.saving_path:
        raise UserError("--save needs --saving_path DIR")
    if a.pack and not a.save:
        raise UserError("--pack writes a checkpoint: add --save --saving_path DIR")
    if a.save:
        try:
            checkpoint.check_output_dir(a.saving_path, a.overwrite)
        except FileExistsError as e:
            raise UserError(str(e))
    for ds in filter(None, (a.dataset, getattr(a, "eval_dataset", None))):
        if os.sep in ds and not os.path.exists(ds):
            raise UserError(f"--dataset {ds}: no such file or directory")
    model_path = resolve_model(a.model)
    device = torch.device(a.device)
    act_device = torch.device("cpu") if a.offload_activations else device

    local = resolve_local(model_path)
    config = AutoConfig.from_pretrained(local)
    tokenizer = AutoTokenizer.from_pretrained(local)
    dtype = _dtype(a, device, config)
    try:
        model = load_skeleton(local, dtype, a.attn_implementation, task.model_class())
    except ValueError as e:  # e.g. a config that is not a causal / seq2seq LM
        raise UserError(f"--model {model_path} cannot be built as {task.model_class().__name__} "
                        f"({str(e).splitlines()[0]}): use quantize_mixtral.py for decoder-only models and "
                        f"quantize_switch.py for Switch Transformers")
    try:
        family = family_for(model)
    except ValueError as e:
        raise UserError(str(e))
    try:
        source = TensorSource(local)
    except FileNotFoundError as e:
        raise UserError(str(e))
    check_widths(model, family, cfg.groupsize)
    from utils.pipeline import level_counts_for
    for name, block in family.blocks(model):
        moe = family.moe(block, name)
        if moe is not None:
            try:
                level_counts_for(cfg, moe.num_experts)
            except ValueError as e:
                raise UserError(str(e))
    # Blocks are streamed from the shards; they stay on the host afterwards only when a
    # dequantized checkpoint or an in-memory evaluation needs them.
    keep = (a.save and not a.pack) or (task.wants_eval(a) and not (a.save and a.pack))
    loader = BlockLoader(family, device, source, dtype, keep)
    try:
        loader.materialize_rest(model)
    except BadWeights as e:
        raise UserError(str(e))
    print(f"model {model_path}: {type(model).__name__}, {len(family.blocks(model))} blocks, {dtype}, "
          f"streamed block by block from {local}")
    if a.router_reference:
        cfg.router_reference = router_reference_weights(a.router_reference, model, family)

    calib, calib_info = task.calibration(a, tokenizer, config)
    try:
        task.evaluate_fp(a, model, family, loader, device, act_device)
    except BadWeights as e:
        raise UserError(str(e))

    # Packed output streams into the (temporary) checkpoint directory while quantizing.
    tmp = checkpoint.temp_dir_for(a.saving_path) if a.save else None
    writer = checkpoint.ShardWriter(tmp, a.max_shard_size) if a.save and a.pack else None
    t0 = time.time()
    try:
        report = quantize_model(model, family, calib, cfg, device, act_device, loader, writer)
    except BaseException as e:
        if tmp:
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, BadWeights):
            raise UserError(str(e))
        raise
    quant_seconds = time.time() - t0
    avg = report.avg_expert_bits()
    print(f"quantized in {quant_seconds:.1f}s; average expert bits {avg:.4f} (target "
          f"{cfg.avg_bits if cfg.level_counts is None else 'explicit counts ' + str(cfg.level_counts)})")
    if report.starved:
        print(f"experts with fewer than {cfg.min_expert_tokens} calibration tokens (all-token Hessian used): "
              + ", ".join(f"{s['layer']}[{s['expert']}]={s['tokens']}" for s in report.starved))

    allocation = {"avg_bits": avg, "target_avg_bits": cfg.avg_bits if cfg.level_counts is None else None,
                  "level_counts": cfg.level_counts, "model": model_path, "router_reference": a.router_reference,
                  "method": cfg.method, "order_type": cfg.order_type, "zeta": cfg.zeta, "mixed_type": cfg.mixed_type,
                  "levels": {"high": cfg.high_bits, "mid": cfg.mid_bits, "low": cfg.low_bits},
                  "attn_bits": cfg.attn_bits, "groupsize": cfg.groupsize, "sym": cfg.sym, "act_order": cfg.act_order,
                  "calibration": {**calib_info, "seed": a.seed},
                  "quantization_seconds": quant_seconds, "starved_experts": report.starved,
                  "layers": report.layers, "modules": report.modules}

    if a.save:
        try:
            checkpoint.write_json(allocation, os.path.join(tmp, "bit_allocation.json"))
            tokenizer.save_pretrained(tmp)
            if a.pack:
                sizes = checkpoint.save_packed(model, report, tmp, cfg.groupsize, cfg.sym, a.max_shard_size, writer)
                print(f"packed checkpoint: {sizes['disk_bytes'] / 2**20:.2f} MiB on disk, theoretical "
                      f"{sizes['theoretical_bytes'] / 2**20:.2f} MiB (codes {sizes['code_bytes'] / 2**20:.2f} + "
                      f"scales/zeros {sizes['overhead_bytes'] / 2**20:.2f} + unquantized "
                      f"{sizes['unquantized_bytes'] / 2**20:.2f}); ratio {sizes['disk_bytes'] / sizes['theoretical_bytes']:.4f}")
            else:
                model.save_pretrained(tmp, max_shard_size=a.max_shard_size)
            checkpoint.commit_dir(tmp, a.saving_path)
        except BaseException:
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        print(f"saved {'packed' if a.pack else 'dequantized'} checkpoint to {a.saving_path}")
    else:
        path = a.allocation_path or "bit_allocation.json"
        checkpoint.write_json(allocation, path)
        print(f"wrote {path}")

    if task.wants_eval(a):
        if not keep:  # blocks were released: evaluate the packed checkpoint just written
            from inference import load_quantized_model
            model = load_quantized_model(a.saving_path, dtype=dtype, model_class=task.model_class(),
                                         attn_implementation=a.attn_implementation)
            family = family_for(model)
        task.evaluate(a, model, family, device, act_device)
    return 0


def main(runner, description: str, extra_args=None) -> int:
    ap = argparse.ArgumentParser(description=description)
    add_args(ap)
    if extra_args:
        extra_args(ap)
    a = ap.parse_args()
    try:
        return runner(a)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

"""The command line of quantize_mixtral.py and quantize_switch.py: flags (the paper repo's
names) -> one frozen RunConfig -> api.quantize. Bad input ends in one line, ``error: ...``,
exit code 2."""
from __future__ import annotations

import argparse
import shlex
import signal
import sys

from .config import ConfigError, QuantConfig, RunConfig
from .quant.allocation import ORDER_TYPES


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the example's line breaks and shows every flag's default."""


def add_common_args(ap: argparse.ArgumentParser) -> None:
    from .utils.loading import MODEL_ALIASES
    m = ap.add_argument_group("model and data")
    m.add_argument("--model", required=True, help="local checkpoint directory, hub id (org/name), or an alias: "
                   + ", ".join(MODEL_ALIASES))
    m.add_argument("--dataset", default="wikitext2", help="calibration data (see below)")
    m.add_argument("--nsamples", type=int, default=128, help="calibration samples")
    m.add_argument("--seed", type=int, default=0, help="seed of the calibration sample and of random orders")
    m.add_argument("--router_reference", default=None,
                   help="checkpoint of the same model before training: order by router-norm change")
    q = ap.add_argument_group("bits per expert")
    q.add_argument("--method", default="gptq", choices=["gptq", "rtn"],
                   help="gptq, or rtn: round-to-nearest on the same grid (the baseline)")
    q.add_argument("--mixed_type", default="mixed", choices=["mixed", "uniform"],
                   help="mixed: levels by expert order; uniform: every expert at --avg_bits")
    q.add_argument("--order_type", default="combined", help="expert ranking: " + ", ".join(ORDER_TYPES))
    q.add_argument("--zeta", type=float, default=3.0, help="MaxVar reordering threshold (combined order)")
    q.add_argument("--sensitivity_file", default=None, help="--order_type oracle / anti_oracle: the per-expert "
                   "loss increases expert_sensitivity.py measured for this model (sensitivity.json)")
    q.add_argument("--avg_bits", type=float, default=2.0, help="target average bits per expert of a MoE layer")
    q.add_argument("--round_avg_bits", action="store_true",
                   help="if --avg_bits cannot be met exactly with the layer's expert count, take the nearest")
    q.add_argument("--high_bit_level", type=int, default=3, help="bits of the most sensitive experts")
    q.add_argument("--mid_bit_level", type=int, default=None, help="bits of the middle level (omit for two levels)")
    q.add_argument("--low_bit_level", type=int, default=1, help="bits of the least sensitive experts")
    q.add_argument("--attn_bit_level", type=int, default=4, help="bits of attention linears (16: unquantized)")
    q.add_argument("--shared_expert_bit_level", type=int, default=4,
                   help="bits of shared experts (Qwen2-MoE, DeepSeek), which see every token like attention "
                        "(16: unquantized)")
    q.add_argument("--dense_bit_level", type=int, default=4,
                   help="bits of dense MLPs in blocks without experts (DeepSeek's first layers; 16: unquantized)")
    g = ap.add_argument_group("GPTQ")
    g.add_argument("--groupsize", type=int, default=128, help="weights per quantization group (-1: one per row)")
    g.add_argument("--sym", action="store_true", help="symmetric grid (default: asymmetric)")
    g.add_argument("--quant_grid", default="search", choices=["search", "minmax"],
                   help="each group's scale and zero: searched (weighted by GPTQ's column costs) or plain min-max")
    g.add_argument("--act-order", "--act_order", dest="act_order", action="store_true",
                   help="quantize columns by decreasing Hessian diagonal (static groups)")
    g.add_argument("--percdamp", type=float, default=0.01, help="Hessian dampening, fraction of its mean diagonal")
    g.add_argument("--min_expert_tokens", type=int, default=16,
                   help="experts routed fewer calibration tokens use the Hessian of all tokens (0: never)")
    g.add_argument("--batch_size", type=int, default=8, help="calibration samples per forward batch")
    g.add_argument("--expert_batch", type=int, default=0,
                   help="experts quantized at once (0: as many as the GPU's free memory holds; all on CPU)")
    r = ap.add_argument_group("device")
    r.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if a GPU is visible)")
    r.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"],
                   help="compute dtype (auto: the checkpoint's on CUDA, float32 on CPU)")
    r.add_argument("--attn_implementation", default=None,
                   help="transformers attention implementation (default: the model's own default)")
    r.add_argument("--offload_activations", action="store_true",
                   help="keep calibration activations on the host (less GPU memory, slower)")
    o = ap.add_argument_group("output")
    o.add_argument("--save", action="store_true", help="write a checkpoint to --saving_path")
    o.add_argument("--saving_path", default=None, help="checkpoint directory (written atomically)")
    o.add_argument("--pack", action="store_true", help="packed low-bit checkpoint (else dequantized weights)")
    o.add_argument("--max_shard_size", default="5GB", help="largest weight file, e.g. 5GB, 500MB")
    o.add_argument("--overwrite", action="store_true", help="replace a non-empty --saving_path")
    o.add_argument("--allocation_path", default=None,
                   help="bit_allocation.json when nothing is saved (default: ./bit_allocation.json)")


def add_causal_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--seqlen", type=int, default=2048, help="tokens per calibration sample (capped by the model)")
    ap.add_argument("--eval_dataset", default=None, help="perplexity on this text's test split "
                    "(default: --dataset's)")
    ap.add_argument("--eval_ppl", action="store_true", help="perplexity of the quantized model on the test split")
    ap.add_argument("--eval_ppl_fp", action="store_true", help="also the unquantized model's, first")


def add_seq2seq_args(ap: argparse.ArgumentParser) -> None:
    ap.set_defaults(dataset="cnn_dailymail", low_bit_level=2)
    ap.add_argument("--reference_model", default=None,
                    help="the pretrained checkpoint MODEL was fine-tuned from: order by router-norm change")
    ap.add_argument("--num_high_bit_experts", type=int, default=None, help="explicit count per level "
                    "(instead of --avg_bits), as the paper repo's Switch script takes")
    ap.add_argument("--num_mid_bit_experts", type=int, default=None, help="explicit count of mid-level experts")
    ap.add_argument("--num_low_bit_experts", type=int, default=None, help="explicit count of low-level experts")
    ap.add_argument("--src_len", type=int, default=256, help="source tokens per calibration pair")
    ap.add_argument("--tgt_len", type=int, default=64, help="target tokens per calibration pair")
    ap.add_argument("--eval", action="store_true", help="held-out target loss and ROUGE after quantization")
    ap.add_argument("--eval_fp", action="store_true", help="also evaluate the unquantized model first")
    ap.add_argument("--eval_samples", type=int, default=64, help="test pairs evaluated")


def quant_config(a) -> QuantConfig:
    counts = None
    if getattr(a, "num_high_bit_experts", None) is not None or getattr(a, "num_low_bit_experts", None) is not None \
            or getattr(a, "num_mid_bit_experts", None) is not None:
        if a.num_mid_bit_experts is not None and a.mid_bit_level is None:
            raise ConfigError("--num_mid_bit_experts needs --mid_bit_level")
        counts = {b: n for b, n in ((a.high_bit_level, a.num_high_bit_experts), (a.mid_bit_level, a.num_mid_bit_experts),
                                    (a.low_bit_level, a.num_low_bit_experts)) if n is not None}
    return QuantConfig(method=a.method, mixed_type=a.mixed_type, order_type=a.order_type, zeta=a.zeta,
                       sensitivity_file=a.sensitivity_file,
                       avg_bits=a.avg_bits, high_bits=a.high_bit_level, mid_bits=a.mid_bit_level,
                       low_bits=a.low_bit_level, level_counts=counts,
                       attn_bits=attn_bits(a.attn_bit_level), groupsize=a.groupsize,
                       shared_bits=attn_bits(a.shared_expert_bit_level, "--shared_expert_bit_level"),
                       dense_bits=attn_bits(a.dense_bit_level, "--dense_bit_level"),
                       sym=a.sym, grid=a.quant_grid, act_order=a.act_order, percdamp=a.percdamp, seed=a.seed,
                       min_expert_tokens=a.min_expert_tokens, batch_size=a.batch_size, expert_batch=a.expert_batch,
                       round_avg_bits=a.round_avg_bits)


def attn_bits(level: int, flag: str = "--attn_bit_level") -> int | None:
    """A fixed-width flag: a supported width, or 16 for unquantized (None)."""
    from .quant.quantizer import SUPPORTED_BITS
    if level == 16:
        return None
    if level not in SUPPORTED_BITS:
        raise ConfigError(f"{flag} {level}: choose one of {', '.join(map(str, SUPPORTED_BITS))}, "
                          f"or 16 to keep these linears unquantized")
    return level


def run_config(a, task: str, command: str) -> RunConfig:
    if a.save and not a.saving_path:
        raise ConfigError("--save needs --saving_path DIR")
    if a.pack and not a.save:
        raise ConfigError("--pack writes a checkpoint: add --save --saving_path DIR")
    if a.saving_path and not a.save:
        raise ConfigError("--saving_path is only used with --save: add --save (and --pack for a packed checkpoint)")
    causal = task == "causal"
    common = dict(model=a.model, quant=quant_config(a), task=task, dataset=a.dataset, nsamples=a.nsamples,
                  seed=a.seed, device=a.device, dtype=a.dtype, attn_implementation=a.attn_implementation,
                  offload_activations=a.offload_activations, saving_path=a.saving_path if a.save else None,
                  pack=a.pack, overwrite=a.overwrite, max_shard_size=a.max_shard_size,
                  allocation_path=a.allocation_path, command=command)
    if causal:
        return RunConfig(**common, seqlen=a.seqlen, router_reference=a.router_reference,
                         eval_datasets=(a.eval_dataset,) if a.eval_dataset else (), evaluate=a.eval_ppl,
                         evaluate_fp=a.eval_ppl_fp)
    return RunConfig(**common, src_len=a.src_len, tgt_len=a.tgt_len,
                     router_reference=a.reference_model or a.router_reference, evaluate=a.eval,
                     evaluate_fp=a.eval_fp, eval_samples=a.eval_samples)


def parser(task: str, description: str = "") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description, formatter_class=_Formatter,
                                 prog=f"python {'quantize_mixtral.py' if task == 'causal' else 'quantize_switch.py'}")
    add_common_args(ap)
    (add_causal_args if task == "causal" else add_seq2seq_args)(ap)
    return ap


def quiet_progress_unless_terminal() -> None:
    """In a log file (stderr not a terminal) no progress bars: theirs (transformers,
    datasets) would land inside our table's lines; ours are off there already."""
    if sys.stderr.isatty():
        return
    import os

    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


def _rank() -> int:
    """This process's rank under torchrun (0 alone)."""
    import os
    return int(os.environ.get("RANK", "0"))


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(task: str, description: str, argv=None) -> int:
    ap = parser(task, description)
    a = ap.parse_args(argv)
    command = " ".join(shlex.quote(x) for x in [ap.prog.split()[-1], *(sys.argv[1:] if argv is None else argv)])
    quiet_progress_unless_terminal()
    # SIGTERM (a job scheduler, kill) unwinds like Ctrl-C: the partial checkpoint is removed.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        from .api import quantize
        quantize(run_config(a, task, f"python {command}"))
    except ConfigError as e:
        from .utils.distributed import RankError
        if _rank() == 0 or isinstance(e, RankError):   # every rank checks the input alike: rank 0 says it
            print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if _rank() == 0:
            print("error: interrupted: nothing was saved (the partial checkpoint was removed)", file=sys.stderr)
        return 130
    except OSError as e:   # the system refused a read or write (disk full, permissions, I/O): no traceback
        where = f" ({e.filename})" if e.filename else ""
        print(f"error: {e.strerror or e}{where}: nothing was saved (the partial checkpoint was removed); "
              f"fix that (free space, permissions) or choose another --saving_path", file=sys.stderr)
        return 1
    return 0

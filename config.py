"""What a quantization run is: two frozen configs, built once (from flags or from Python)
and validated when built, before any model is loaded.

- ``QuantConfig``: how the MoE layers are quantized (the pipeline's view).
- ``RunConfig``: one whole run: model, data, device, output, evaluation, and a QuantConfig.

Messages name the flag a CLI user typed; the Python field has the same name unless noted.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

from .quant.allocation import MEASURED_ORDERS, ORDER_TYPES, level_counts
from .quant.quantizer import SUPPORTED_BITS

METHODS = ("gptq", "rtn")
TASKS = ("causal", "seq2seq")
DTYPES = ("auto", "float16", "bfloat16", "float32")


class ConfigError(ValueError):
    """A setting that cannot work; the message names the flag and the fix."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def check_bits(bits, flag: str) -> int:
    _check(isinstance(bits, int) and not isinstance(bits, bool) and bits in SUPPORTED_BITS,
           f"{flag} {bits!r}: unsupported bit width: choose one of {', '.join(map(str, SUPPORTED_BITS))}")
    return bits


def parse_size(size: str | int) -> int:
    """'5GB', '200MB', '1GiB', '4096' -> bytes."""
    if isinstance(size, int) and not isinstance(size, bool):
        return size
    s = str(size).strip().upper()
    units = (("GIB", 1 << 30), ("MIB", 1 << 20), ("KIB", 1 << 10), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3),
             ("B", 1))
    for unit, mult in units:
        if s.endswith(unit):
            s, scale = s[: -len(unit)].strip(), mult
            break
    else:
        scale = 1
    try:
        value = float(s)
    except ValueError:
        raise ConfigError(f"--max_shard_size {size!r} is not a size: write e.g. 5GB, 500MB or 2GiB") from None
    return int(value * scale)


@dataclass(frozen=True)
class QuantConfig:
    method: str = "gptq"                 # "gptq" | "rtn" (round-to-nearest on the same grid: the baseline)
    mixed_type: str = "mixed"            # "mixed" (levels by expert order) | "uniform" (every expert at avg_bits)
    order_type: str = "combined"         # see quant/allocation.py
    zeta: float = 3.0                    # MaxVar reordering threshold (combined order)
    sensitivity_file: str | None = None  # oracle / anti_oracle: measured per-expert costs (expert_sensitivity.py)
    avg_bits: float = 2.0                # target average bits per expert of a MoE layer
    high_bits: int = 3
    mid_bits: int | None = 2             # None: two levels
    low_bits: int = 1
    level_counts: dict[int, int] | None = None   # explicit experts per level (overrides avg_bits)
    attn_bits: int | None = 4            # attention linears; None keeps them unquantized
    shared_bits: int | None = 4          # a MoE block's shared experts (every token goes through them, like attention)
    dense_bits: int | None = 4           # dense MLPs of blocks without experts (e.g. DeepSeek's first layers)
    groupsize: int = 128                 # -1: one group per row
    sym: bool = False
    grid: str = "search"                 # each group's scale and zero: "search" (quant/quantizer.py) | "minmax"
    act_order: bool = False
    percdamp: float = 0.01
    seed: int = 0                        # random expert orders
    min_expert_tokens: int = 16          # fewer routed tokens: the expert's Hessian uses all tokens (0: never)
    batch_size: int = 8                  # calibration windows per forward batch
    expert_batch: int = 0                # experts quantized at once (0: as many as GPU memory holds)
    round_avg_bits: bool = False         # accept the nearest average the expert count allows

    def __post_init__(self):
        _check(self.method in METHODS, f"--method {self.method!r}: choose one of {', '.join(METHODS)}")
        _check(self.grid in ("search", "minmax"), f"--quant_grid {self.grid!r}: choose search or minmax")
        _check(self.mixed_type in ("mixed", "uniform"),
               f"--mixed_type {self.mixed_type!r}: choose mixed or uniform")
        _check(self.order_type in ORDER_TYPES,
               f"unknown --order_type {self.order_type!r}: choose one of {', '.join(ORDER_TYPES)}")
        _check(math.isfinite(self.zeta) and self.zeta > 0, f"--zeta {self.zeta}: must be a positive number")
        if self.order_type in MEASURED_ORDERS and self.mixed_type == "mixed":
            self._check_sensitivity_file()
        _check(math.isfinite(self.avg_bits) and self.avg_bits > 0, f"--avg_bits {self.avg_bits}: must be positive")
        for value, flag in ((self.attn_bits, "--attn_bit_level"), (self.shared_bits, "--shared_expert_bit_level"),
                            (self.dense_bits, "--dense_bit_level")):
            if value is not None:
                check_bits(value, flag)
        _check(self.groupsize == -1 or self.groupsize > 0,
               f"--groupsize {self.groupsize}: must be positive (e.g. 128), or -1 for one group per row")
        _check(math.isfinite(self.percdamp) and 0 < self.percdamp < 1,
               f"--percdamp {self.percdamp}: must be in (0, 1), e.g. 0.01")
        _check(self.min_expert_tokens >= 0, f"--min_expert_tokens {self.min_expert_tokens}: must be 0 or more")
        _check(self.batch_size >= 1, f"--batch_size {self.batch_size}: must be at least 1")
        _check(self.expert_batch >= 0, f"--expert_batch {self.expert_batch}: must be 0 (automatic) or positive")
        if self.level_counts is not None:
            for b, n in self.level_counts.items():
                check_bits(b, "bit level")
                _check(isinstance(n, int) and n >= 0, f"expert count {n!r} for {b} bits: must be a whole number >= 0")
        elif self.mixed_type == "uniform":
            _check(float(self.avg_bits).is_integer(),
                   f"--mixed_type uniform needs an integer --avg_bits, got {self.avg_bits}")
            check_bits(int(self.avg_bits), "--avg_bits")
        else:
            check_bits(self.high_bits, "--high_bit_level")
            check_bits(self.low_bits, "--low_bit_level")
            if self.mid_bits is not None:
                check_bits(self.mid_bits, "--mid_bit_level")
            try:  # range and spacing do not depend on the expert count: any count checks them
                level_counts(8, self.avg_bits, self.high_bits, self.low_bits, self.mid_bits)
            except ValueError as e:
                raise ConfigError(str(e)) from None

    def _check_sensitivity_file(self) -> None:
        """oracle / anti_oracle read measured costs: the file must hold every level's width."""
        import json
        import os
        path = self.sensitivity_file
        _check(path is not None and os.path.isfile(path),
               f"--order_type {self.order_type} needs --sensitivity_file: the sensitivity.json that "
               f"expert_sensitivity.py measured for this model" + (f" ({path} is not a file)" if path else ""))
        with open(path) as f:
            widths = json.load(f).get("widths", [])
        levels = set(self.level_counts) if self.level_counts is not None else \
            {b for b in (self.high_bits, self.mid_bits, self.low_bits) if b is not None}
        _check(levels <= set(widths), f"--sensitivity_file {path} has costs at {widths} bits, not at every level "
                                      f"{sorted(levels)}: measure those widths (expert_sensitivity.py --widths)")

    def counts_for(self, num_experts: int) -> dict[int, int]:
        """Experts per bit level for a layer of ``num_experts``."""
        if self.level_counts is not None:
            total = sum(self.level_counts.values())
            _check(total == num_experts, f"the per-level expert counts {self.level_counts} add up to {total}, "
                                         f"but the model has {num_experts} experts per layer")
            return dict(self.level_counts)
        if self.mixed_type == "uniform":
            return {int(self.avg_bits): num_experts}
        counts = self._policy(num_experts, self.avg_bits)
        achieved = sum(b * n for b, n in counts.items()) / num_experts
        if abs(achieved - self.avg_bits) > 1e-9 and not self.round_avg_bits:
            reachable = sorted({_average(self._policy(num_experts, k / num_experts), num_experts)
                                for k in range(self.low_bits * num_experts, self.high_bits * num_experts + 1)})
            below = max((r for r in reachable if r < self.avg_bits), default=None)
            above = min((r for r in reachable if r > self.avg_bits), default=None)
            near = " and ".join(f"{r:g}" for r in (below, above) if r is not None)
            raise ConfigError(f"--avg_bits {self.avg_bits:g} cannot be met with {num_experts} experts per layer and "
                              f"levels {self._levels()}: the nearest reachable averages are {near}: pass one of "
                              f"them, or --round_avg_bits to take {achieved:g}")
        return counts

    def _policy(self, num_experts: int, avg_bits: float) -> dict[int, int]:
        try:
            return level_counts(num_experts, avg_bits, self.high_bits, self.low_bits, self.mid_bits)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def _levels(self) -> str:
        return "/".join(str(b) for b in (self.high_bits, self.mid_bits, self.low_bits) if b is not None)

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.level_counts is not None:
            d["level_counts"] = {str(b): n for b, n in self.level_counts.items()}
        return d


def _average(counts: dict[int, int], num_experts: int) -> float:
    return round(sum(b * n for b, n in counts.items()) / num_experts, 9)


HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


@dataclass(frozen=True)
class RunConfig:
    model: str                                   # local directory, hub id or alias (see utils/loading.py)
    quant: QuantConfig = field(default_factory=QuantConfig)
    task: str = "causal"                         # "causal" (quantize_mixtral.py) | "seq2seq" (quantize_switch.py)
    dataset: str = "wikitext2"                   # calibration text / pairs (utils/data.py)
    eval_datasets: tuple[str, ...] = ()          # perplexity on these test splits (default: dataset's)
    nsamples: int = 128
    seqlen: int = 2048                           # causal: tokens per window (capped by the model)
    src_len: int = 256                           # seq2seq: source / target tokens per calibration pair
    tgt_len: int = 64
    seed: int = 0                                # calibration sampling
    router_reference: str | None = None          # checkpoint before training/fine-tuning: order by norm change
    device: str | None = None                    # None: cuda if available, else cpu
    dtype: str = "auto"                          # compute dtype; auto: the checkpoint's on CUDA, float32 on CPU
    attn_implementation: str | None = None       # None: the model's default (sdpa where it supports it)
    offload_activations: bool = False
    evaluate: bool = False                       # perplexity (causal) or loss + ROUGE (seq2seq) after quantizing
    evaluate_fp: bool = False                    # also evaluate the unquantized model first
    eval_samples: int = 64                       # seq2seq: test pairs evaluated
    saving_path: str | None = None               # write a checkpoint here (atomically)
    pack: bool = True                            # packed low-bit checkpoint (else dequantized, stock transformers)
    overwrite: bool = False
    max_shard_size: str = "5GB"
    allocation_path: str | None = None           # bit_allocation.json when nothing is saved
    allocation_png: bool = True                  # draw bit_allocation.png beside bit_allocation.json
    keep_model: bool = False                     # keep the fake-quantized model in memory (result.model)
    verbose: bool = True                         # per-module table and summaries on stdout
    command: str | None = None                   # the command line that made this run (recorded in results)

    def __post_init__(self):
        _check(isinstance(self.model, str) and self.model.strip() != "", "--model is empty: pass a checkpoint")
        _check(self.task in TASKS, f"task {self.task!r}: choose one of {', '.join(TASKS)}")
        _check(self.nsamples >= 1, f"--nsamples {self.nsamples}: must be at least 1")
        _check(self.seqlen >= 2, f"--seqlen {self.seqlen}: must be at least 2 tokens")
        _check(self.src_len >= 1 and self.tgt_len >= 1, f"--src_len {self.src_len} / --tgt_len {self.tgt_len}: "
                                                        f"must be at least 1")
        _check(self.eval_samples >= 1, f"--eval_samples {self.eval_samples}: must be at least 1")
        _check(self.dtype in DTYPES, f"--dtype {self.dtype!r}: choose one of {', '.join(DTYPES)}")
        parse_size(self.max_shard_size)
        _check(parse_size(self.max_shard_size) > 0, f"--max_shard_size {self.max_shard_size}: must be positive")
        if self.device is not None:
            _check(re.fullmatch(r"cpu|cuda(:\d+)?", self.device) is not None,
                   f"--device {self.device!r}: choose cpu, cuda or cuda:N")

    @property
    def causal(self) -> bool:
        return self.task == "causal"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["quant"] = self.quant.to_dict()
        d["eval_datasets"] = list(self.eval_datasets)
        return d

"""What the testbed's training scripts share: determinism, tokenizer, batches, the
training loop, and saving (atomic) checkpoints and loss curves."""
from __future__ import annotations

import json
import math
import os
import random
import time
from contextlib import contextmanager, nullcontext
from typing import Callable, Iterator

# cuBLAS needs this before CUDA is initialised to be deterministic.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch  # noqa: E402
from torch.nn.utils import parametrize  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402


def seed_everything(seed: int) -> None:
    """Same seed, same device: same weights and same loss curve."""
    random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def make_tokenizer(text: str, vocab_size: int, extra_special: list[str] | None = None):
    """Byte-level BPE trained on ``text`` (utils.tiny.train_tokenizer), plus extra special tokens."""
    from ..utils.tiny import train_tokenizer
    tok = train_tokenizer(text, vocab_size)
    if extra_special:
        tok.add_special_tokens({"additional_special_tokens": list(extra_special)})
    return tok


def random_windows(ids: torch.Tensor, batch: int, seqlen: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless (batch, seqlen) windows at random offsets of the token stream, seeded."""
    if ids.numel() <= seqlen + 1:
        raise ValueError(f"the training text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    g = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, ids.numel() - seqlen, (batch,), generator=g)
        yield torch.stack([ids[s:s + seqlen] for s in starts.tolist()])


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(progress * torch.pi)).item()))


def train(model, batches: Iterator, loss_fn: Callable, steps: int, lr: float, device, warmup: int = 0,
          eval_fn: Callable | None = None, eval_every: int = 0, log_every: int = 10, desc: str = "train",
          weight_decay: float = 0.1) -> list[dict]:
    """AdamW with warm-up + cosine, gradient clipping at 1, bf16 autocast on CUDA.

    ``loss_fn(model, batch) -> scalar loss``; ``eval_fn(model) -> float`` (held-out loss)
    every ``eval_every`` steps and at the end. Returns the loss curve: one dict per
    logged step (mean training loss since the previous one, lr, held-out loss, seconds).

    On CUDA (cuda_speed): expert weights in bf16 under autocast, TF32, fused AdamW; the
    CPU computes as it always did. Losses stay on the device until a log line needs them
    (one host sync per log line, not per step); their sum is the same."""
    device = torch.device(device)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay,
                            **({"fused": True} if device.type == "cuda" else {}))
    warmup = warmup or max(1, steps // 20)
    curve, pending, t0 = [], [], time.time()
    bar = tqdm(range(steps), desc=desc, disable=None)  # no bar in a log file: a line per eval instead
    with cuda_speed(model, device):
        for step in bar:
            with deterministic_attention(device):
                pending.append(_step(model, opt, loss_fn, next(batches), step, steps, lr, warmup, device))
            last = step == steps - 1
            if (step + 1) % log_every == 0 or last:
                row = {"step": step + 1, "train_loss": _mean_loss(pending, step + 1, desc),
                       "lr": opt.param_groups[0]["lr"], "seconds": time.time() - t0}
                pending = []
                if eval_fn is not None and ((eval_every and (step + 1) % eval_every == 0) or last):
                    model.eval()
                    row["val_loss"] = eval_fn(model)
                    model.train()
                curve.append(row)
                bar.set_postfix(loss=f"{row['train_loss']:.3f}", **({"val": f"{row['val_loss']:.3f}"}
                                                                     if "val_loss" in row else {}))
                if bar.disable and "val_loss" in row:
                    print(f"{desc}: step {step + 1}/{steps}, train loss {row['train_loss']:.3f}, "
                          f"valid loss {row['val_loss']:.3f}, {row['seconds']:.0f}s", flush=True)
    model.eval()
    return curve


def _mean_loss(losses: list[torch.Tensor], end: int, desc: str) -> float:
    """Mean of the steps' losses (steps end - len(losses) .. end - 1), summed in step order as
    Python floats; a non-finite one stops training, naming its step."""
    total = 0.0
    for k, value in enumerate(torch.stack(losses).tolist()):
        if not math.isfinite(value):
            raise FloatingPointError(f"{desc}: loss became {value} at step {end - len(losses) + k}: lower --lr")
        total += value
    return total / len(losses)


@contextmanager
def cuda_speed(model, device: torch.device):
    """CUDA only, restored afterwards: TF32 for what still multiplies in float32; bf16
    reductions in the math attention kernel (deterministic_attention), whose default
    upcasts bf16 inputs to float32; and the fused experts (autocast_experts) in the autocast
    dtype, as every nn.Linear of the model runs under autocast."""
    if device.type != "cuda":
        yield
        return
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed())
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(True)
    undo = autocast_experts(model, device.type)
    try:
        yield
    finally:
        undo()
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags[:2]
        torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(flags[2])


class _AutocastCast(torch.nn.Module):
    """A parametrization: the weight in the autocast dtype while autocast is on (gradients
    reach the float32 parameter through the cast), unchanged otherwise."""

    def __init__(self, device_type: str):
        super().__init__()
        self.device_type = device_type

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(self.device_type):
            return weight.to(torch.get_autocast_dtype(self.device_type))
        return weight


def autocast_experts(model, device_type: str) -> Callable[[], None]:
    """While autocast is on, the fused experts modules (those holding stacked weights of 3 or
    more dimensions) read their weights and their input hidden states in the autocast dtype,
    as autocast does for an nn.Linear: transformers' grouped experts matmul (torch grouped_mm)
    is not autocast-aware and multiplied in float32. The weights stay the same float32
    Parameter objects (the optimizer's); returns the function that undoes it all (state
    dict keys as before)."""
    stacks = [(m, n) for m in model.modules() for n, p in m.named_parameters(recurse=False) if p.dim() >= 3]
    for module, name in stacks:
        parametrize.register_parametrization(module, name, _AutocastCast(device_type))

    def input_in_autocast_dtype(module, args, kwargs):   # hidden states: the first argument
        if not torch.is_autocast_enabled(device_type):
            return None
        dtype = torch.get_autocast_dtype(device_type)
        if args:
            return (args[0].to(dtype), *args[1:]), kwargs
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": kwargs["hidden_states"].to(dtype)}
        return None

    hooks = [m.register_forward_pre_hook(input_in_autocast_dtype, with_kwargs=True)
             for m in dict.fromkeys(m for m, _ in stacks)]

    def undo() -> None:
        for hook in hooks:
            hook.remove()
        for module, name in stacks:
            parametrize.remove_parametrizations(module, name, leave_parametrized=False)
    return undo


def deterministic_attention(device: torch.device):
    """On CUDA, the math kernel for scaled_dot_product_attention: the cuDNN, flash and
    memory-efficient backward passes accumulate with atomics, so the same seed gave
    different weights (valid loss 3.418 vs 3.422 after 800 steps on an H100)."""
    if device.type != "cuda":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.MATH])


def _step(model, opt, loss_fn, batch, step: int, steps: int, lr: float, warmup: int, device) -> torch.Tensor:
    """One optimizer step; returns the loss, detached, still on the device."""
    for group in opt.param_groups:
        group["lr"] = lr_at(step, steps, lr, warmup)
    # cached: a weight cast for autocast (cuda_speed) is made once per forward, however often
    # the model reads it (transformers' per-expert loop reads the stack once per expert)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"), parametrize.cached():
        loss = loss_fn(model, batch)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.detach()


@torch.no_grad()
def causal_lm_loss(model, windows: torch.Tensor, device, batch: int = 16) -> float:
    """Mean next-token cross entropy of a causal LM over fixed (n, seqlen) windows
    (from the logits: a model's .loss may include a router aux loss)."""
    total, count = 0.0, 0
    dev = torch.device(device)
    for i in range(0, windows.shape[0], batch):
        ids = windows[i:i + batch].to(dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            logits = model(input_ids=ids).logits
        total += torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                                   ids[:, 1:].reshape(-1), reduction="sum").item()
        count += ids[:, 1:].numel()
    return total / count


def save_model(model, tokenizer, path: str) -> None:
    """save_pretrained (safetensors) + tokenizer, written beside ``path`` and renamed into place."""
    from ..utils.checkpoint import replace_dir

    def fill(tmp):
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    replace_dir(path, fill)


def write_json(obj, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")


def device_name(device) -> str:
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"

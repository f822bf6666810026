"""What the testbed's training scripts share: determinism, tokenizer, batches, the
training loop, and saving (atomic) checkpoints and loss curves."""
from __future__ import annotations

import json
import os
import random
import time
from contextlib import nullcontext
from typing import Callable, Iterator

# cuBLAS needs this before CUDA is initialised to be deterministic.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch  # noqa: E402
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
    logged step (mean training loss since the previous one, lr, held-out loss, seconds)."""
    device = torch.device(device)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    warmup = warmup or max(1, steps // 20)
    curve, running, n, t0 = [], 0.0, 0, time.time()
    bar = tqdm(range(steps), desc=desc, disable=None)  # no bar in a log file: a line per eval instead
    for step in bar:
        with deterministic_attention(device):
            running += _step(model, opt, loss_fn, next(batches), step, steps, lr, warmup, device, desc)
        n += 1
        last = step == steps - 1
        if (step + 1) % log_every == 0 or last:
            row = {"step": step + 1, "train_loss": running / n, "lr": opt.param_groups[0]["lr"],
                   "seconds": time.time() - t0}
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
            running, n = 0.0, 0
    model.eval()
    return curve


def deterministic_attention(device: torch.device):
    """On CUDA, the math kernel for scaled_dot_product_attention: the cuDNN, flash and
    memory-efficient backward passes accumulate with atomics, so the same seed gave
    different weights (valid loss 3.418 vs 3.422 after 800 steps on an H100)."""
    if device.type != "cuda":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.MATH])


def _step(model, opt, loss_fn, batch, step: int, steps: int, lr: float, warmup: int, device, desc: str) -> float:
    for group in opt.param_groups:
        group["lr"] = lr_at(step, steps, lr, warmup)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss = loss_fn(model, batch)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"{desc}: loss became {loss.item()} at step {step}: lower --lr")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.item()


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

"""The layer-by-layer driver: capture block inputs, collect Hessians, run blocks.

Only one block's weights need to be on the compute device at a time; the
calibration activations live on ``act_device`` (the GPU, or the host with
``--offload_activations``) and move to the device one batch at a time.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


class _Stop(Exception):
    """Raised by a hook to end a forward pass early (nothing after it is needed)."""


def _to(obj, device):
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


@contextmanager
def _hooks(*handles):
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def capture_block_inputs(model: nn.Module, family, windows: torch.Tensor, batch_size: int,
                         device: torch.device, act_device: torch.device):
    """Run the model's embedding part on ``windows`` (N, S) and keep what the first
    block receives: a list of hidden-state batches and the keyword arguments it was
    called with (attention mask, position embeddings ...)."""
    inputs, kwargs_list = [], []
    first = family.input_layer(model)

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        inputs.append(hidden.to(act_device))
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "use_cache", "hidden_states")}
        kwargs_list.append(_to(kwargs, act_device))
        raise _Stop

    pre = family.pre_block_modules(model)
    homes = [next(m.parameters(), torch.empty(0)).device for m in pre]
    for m in pre:
        m.to(device)
    try:
        with _hooks(first.register_forward_pre_hook(hook, with_kwargs=True)):
            for i in range(0, windows.shape[0], batch_size):
                try:
                    family.embed_forward(model, windows[i:i + batch_size].to(device))
                except _Stop:
                    pass
    finally:
        for m, home in zip(pre, homes):
            if home.type != "meta":
                m.to(home)
    return inputs, kwargs_list


def _out(o):
    return o[0] if isinstance(o, tuple) else o


@torch.no_grad()
def run_block(block: nn.Module, inputs, kwargs_list, device, act_device, stop_at: nn.Module | None = None):
    """Run ``block`` on every batch. With ``stop_at``, the forward ends when that
    module is reached (its hooks have collected what they need) and nothing is returned."""
    def stop(*_):
        raise _Stop

    outs = []
    handle = stop_at.register_forward_pre_hook(stop) if stop_at is not None else None
    try:
        for x, kw in zip(inputs, kwargs_list):
            try:
                y = _out(block(x.to(device), **_to(kw, device)))
                outs.append(y.to(act_device))
            except _Stop:
                pass
    finally:
        if handle is not None:
            handle.remove()
    return None if stop_at is not None else outs


class HessianAccumulator:
    """Sum of x^T x over the rows of every tensor given, in float32; H = sum / n."""

    def __init__(self, dim: int, device, count: int = 1):
        self.sum = torch.zeros(count, dim, dim, device=device, dtype=torch.float32)
        self.n = torch.zeros(count, dtype=torch.long)

    def add(self, x: torch.Tensor, index: int = 0):
        half = x.dtype in (torch.float16, torch.bfloat16)
        x = x.reshape(-1, x.shape[-1]).float()
        # bf16/fp16 values are exact in TF32 and their products exact in fp32, so the
        # tensor cores lose nothing here; fp32 inputs keep full fp32 products.
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = half and x.is_cuda
        try:
            self.sum[index].addmm_(x.T, x)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = prev
        self.n[index] += x.shape[0]

    def hessian(self, index: int | None = None) -> torch.Tensor:
        """H = sum / n, normalised in place on first use (Hessians of down projections are
        large: no second copy); no more ``add`` after this."""
        if not getattr(self, "_normalised", False):
            self.sum /= self.n.clamp(min=1).view(-1, 1, 1).to(self.sum)
            self._normalised = True
        return self.sum if index is None else self.sum[index]


def input_hessian_hook(acc: HessianAccumulator):
    def hook(module, args):
        acc.add(args[0])
    return hook

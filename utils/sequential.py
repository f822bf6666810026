"""The layer-by-layer driver: capture block inputs, collect Hessians, run blocks.

Only one block's weights need to be on the compute device at a time; the
calibration activations live on ``act_device`` (the GPU, or the host with
``--offload_activations``) and move to the device one batch at a time.
"""
from __future__ import annotations

import inspect
import weakref
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
def capture_block_inputs(model: nn.Module, family, calib, batch_size: int, device: torch.device,
                         act_device: torch.device, stage: int = 0, prev: list | None = None,
                         batches: list[int] | None = None):
    """Run the model's part before the first block of ``stage`` on the calibration
    batches and keep what that block receives: a list of hidden-state batches and the
    keyword arguments it was called with (masks, position embeddings or biases ...).
    ``prev``: the previous stage's outputs (an encoder's, for a decoder stage), one per
    batch run; ``batches``: which batches to run (default: all), in this order."""
    inputs, kwargs_list = [], []
    first = family.input_layer(model, stage)
    params = list(inspect.signature(first.forward).parameters)

    def hook(module, args, kwargs):
        bound = dict(zip(params, args), **kwargs)  # blocks may be called positionally (T5 stacks)
        inputs.append(bound.pop(params[0]).to(act_device))
        bound = {k: v for k, v in bound.items() if k not in ("past_key_values", "use_cache")}
        kwargs_list.append(_to(bound, act_device))
        raise _Stop

    pre = family.pre_block_modules(model, stage)
    homes = [next(m.parameters(), torch.empty(0)).device for m in pre]
    for m in pre:
        m.to(device)
    try:
        starts = range(0, family.num_windows(calib), batch_size)
        with _hooks(first.register_forward_pre_hook(hook, with_kwargs=True)):
            for k, b in enumerate(range(len(starts)) if batches is None else batches):
                try:
                    family.embed_forward(model, calib, slice(starts[b], starts[b] + batch_size), device, stage,
                                         None if prev is None else prev[k].to(device))
                except _Stop:
                    pass
    finally:
        for m, home in zip(pre, homes):
            if home.type != "meta":
                m.to(home)
    return inputs, kwargs_list


def _out(o):
    return o[0] if isinstance(o, tuple) else o


def batch_masks(family, calib, batch_size: int, stage: int) -> list[dict | None]:
    """Per calibration batch, which tokens are real (not padding): {"block": (B, T) mask of
    this stage's tokens, "encoder": (B, S) mask of the encoder's}, or None (no padding)."""
    return [family.token_masks(calib, slice(i, i + batch_size), stage)
            for i in range(0, family.num_windows(calib), batch_size)]


@torch.no_grad()
def run_block(block: nn.Module, inputs, kwargs_list, device, act_device, stop_at: nn.Module | None = None,
              family=None, before_batch=None, stop_after: nn.Module | None = None):
    """Run ``block`` on every batch. With ``stop_at`` (``stop_after``), the forward ends when
    that module is reached (has run): hooks have collected what they need, nothing is
    returned. With ``family``, what a block hands to the next (T5's position biases) is
    written into ``kwargs_list`` in place. ``before_batch(i)`` runs before batch i (hooks
    learn which batch they see)."""
    def stop(*_):
        raise _Stop

    outs = []
    handle = stop_at.register_forward_pre_hook(stop) if stop_at is not None else \
        stop_after.register_forward_hook(stop) if stop_after is not None else None
    try:
        for i, (x, kw) in enumerate(zip(inputs, kwargs_list)):
            if before_batch is not None:
                before_batch(i)
            try:
                full = block(x.to(device), **_to(kw, device))
                outs.append(_out(full).to(act_device))
                if family is not None:
                    kw.update(_to(family.passed_on(full), act_device))
            except _Stop:
                pass
    finally:
        if handle is not None:
            handle.remove()
    return None if stop_at is not None or stop_after is not None else outs


class HessianAccumulator:
    """Sum of x^T x over the rows of every tensor given, in float32; H = sum / n."""

    def __init__(self, dim: int, device, count: int = 1):
        self.sum = torch.zeros(count, dim, dim, device=device, dtype=torch.float32)
        self.n = torch.zeros(count, dtype=torch.long)

    def add(self, x: torch.Tensor, index: int = 0, mask: torch.Tensor | None = None):
        """``mask``: which rows of x (its leading dims) are real tokens; others are left out."""
        half = x.dtype in (torch.float16, torch.bfloat16)
        x = real_rows(x, mask).float()
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


class SharedInputHessians:
    """Input Hessians of a set of linears, one per distinct input: linears that read the very
    same tensor in a forward (q, k and v; a shared expert's gate and up) share one, found on
    the first batch. ``masks``: the current batch's token masks (run_block's before_batch
    keeps it pointing there); ``mask_key(name)``: which of them applies to a linear.

    With several ranks (``ranks``), the inputs of this rank's batches are kept (on ``keep``)
    instead, and ``gather`` adds every batch's, in global batch order, to the Hessian of the
    rank that quantizes the group (``ranks.owner(group index)``): the sums one process makes."""

    def __init__(self, linears: list[tuple[str, nn.Module]], device, masks: dict, mask_key=lambda name: "block",
                 ranks=None, keep=None):
        self.device, self.masks, self.mask_key = device, masks, mask_key
        self.group_of: dict[str, int] = {}
        self.groups: list[list[str]] = []
        self.accs: list[HessianAccumulator] = []
        self._reps: dict[int, weakref.ref] = {}   # this batch: group -> the tensor it read
        self._added: set[int] = set()
        self.ranks, self.keep = ranks, keep if keep is not None else device
        self._kept: dict[int, list[tuple[torch.Tensor]]] = {}   # several ranks: group -> real rows per batch
        self._handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in linears]

    def new_batch(self) -> None:
        self._reps, self._added = {}, set()

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0]
            gid = self.group_of.get(name)
            if gid is None:   # first batch: join the group that read this very tensor, or start one
                gid = next((g for g, ref in self._reps.items() if ref() is x), None)
                if gid is None:
                    gid = len(self.groups)
                    self.groups.append([])
                    self.accs.append(HessianAccumulator(x.shape[-1], self.device))
                    self._reps[gid] = weakref.ref(x)
                self.groups[gid].append(name)
                self.group_of[name] = gid
            if gid not in self._added:
                self._added.add(gid)
                mask = self.masks.get(self.mask_key(name))
                if self.ranks is not None and self.ranks.distributed:   # a copy: the forward may change x later
                    self._kept.setdefault(gid, []).append((real_rows(x, mask).to(self.keep, copy=True),))
                else:
                    self.accs[gid].add(x, mask=mask)
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def gather(self) -> None:
        """Several ranks: each group's inputs from every batch, in global batch order, added
        on the rank that owns the group (after the forward passes; nothing for one rank)."""
        for gid, acc in enumerate(self.accs):
            if gid in self._kept:
                for (x,) in self.ranks.in_batch_order(self._kept.pop(gid), dst=self.ranks.owner(gid)):
                    acc.add(x)


def real_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """x (..., d) as (tokens, d), without the rows ``mask`` marks as padding."""
    x = x.reshape(-1, x.shape[-1])
    return x if mask is None else x[mask.reshape(-1).to(x.device)]


def input_hessian_hook(acc: HessianAccumulator, masks: dict | None = None, key: str = "block"):
    """Adds the module's input to ``acc``; ``masks``: a dict the caller keeps pointing at
    the current batch's token masks (run_block's before_batch), ``key`` the one that applies."""
    def hook(module, args):
        acc.add(args[0], mask=None if not masks else masks.get(key))
    return hook

"""Switch Transformer experts run as two batched matmuls instead of a loop over experts.

transformers' ``SwitchTransformersExperts`` runs its experts one by one, and finding each
expert's tokens (``torch.where``) syncs the host with the GPU once per expert and layer: on
an H100 the testbed's 77M-parameter Switch pair trained at 0.28 s per step, most of it
waiting. Here every expert's tokens go to slots of one padded batch and all experts run at
once:

    pos[t]   = rank of token t among the tokens routed to its expert e[t]   (cumsum)
    slot[t]  = e[t] * C + pos[t]          C = the most tokens any expert got (one host sync)
    X[slot]  = x[t]                       (E, C, d), empty slots zero
    Y        = act(X Wi^T) Wo^T           two bmm over the stacked expert weights
    out[t]   = Y[slot[t]] * p[t]          p: the router's weight for e[t]; 0 for dropped tokens

The router is the model's own (its capacity cut, its jitter, its hooks). Its outputs moved
between transformers 5.x releases (5.17: probabilities first, the dispatch mask (N, 1, E)
second, no effective capacity cut; 5.23: the mask (B, S, E) first, per-sequence capacity),
so the dispatch mask is taken as the integer output and the weight as the other one. The
result is the loop's up to float rounding (tests/test_switch_experts.py); the expert weights
are read from the experts' own ``nn.Linear`` modules at every call, so weights written into
them (quantized experts) are what runs.
"""
from __future__ import annotations

import types

import torch
from torch import nn


def dispatch(router_out: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """(dispatch mask (N, E) of 0/1, weight (N,)) from a Switch router's outputs, whichever
    transformers 5.x order they come in (see the module docstring)."""
    first, second = router_out[0], router_out[1]
    mask, weight = (first, second) if not first.is_floating_point() else (second, first)
    return mask.reshape(-1, mask.shape[-1]).long(), weight.reshape(-1)


class _Move(torch.autograd.Function):
    """rows = cat(x, 0)[index]: x's rows moved to new places (index == len(x): a zero row),
    where ``inverse`` says where each place's row went (len(rows): nowhere). The gradient
    moves back with ``inverse``, a gather too: autograd's own backward of x[index] adds rows
    with a sort-based kernel that took 29 ms a layer on an H100 (every empty slot points at
    the same zero row)."""

    @staticmethod
    def forward(ctx, x, index, inverse):
        ctx.save_for_backward(inverse)
        return torch.cat([x, x.new_zeros(1, x.shape[1])]).index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return torch.cat([grad, grad.new_zeros(1, grad.shape[1])]).index_select(0, inverse), None, None


def _batched_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """SwitchTransformersSparseMLP.forward with the experts batched (see the module docstring)."""
    B, S, d = hidden_states.shape
    selected, weight = dispatch(self.router(hidden_states))
    N, E = selected.shape
    x = hidden_states.reshape(N, d)
    expert = selected.argmax(-1)                                   # (N,)
    kept = selected.sum(-1) > 0                                    # not cut by the expert capacity
    ranks = selected.t().to(torch.int32).cumsum(1)                 # (E, N): along the rows, a fast scan
    C = max(1, int(ranks[:, -1].max()))                            # the one host sync
    pos = ranks.gather(0, expert[None])[0].to(torch.int64) - 1
    slot = torch.where(kept, expert * C + pos, E * C)              # dropped tokens: E * C, a zero row
    # which token fills each slot (N: none); the dropped tokens' writes land in slot E * C, cut off
    filled = torch.full((E * C + 1,), N, dtype=torch.long, device=x.device)
    filled.scatter_(0, slot, torch.arange(N, device=x.device))
    filled = filled[:-1]
    experts = [self.experts[f"expert_{e}"] for e in range(E)]
    wi = torch.stack([ex.wi.weight for ex in experts])             # (E, ff, d)
    wo = torch.stack([ex.wo.weight for ex in experts])             # (E, d, ff)
    xs = _Move.apply(x, filled, slot).view(E, C, d)
    h = experts[0].act(torch.bmm(xs, wi.transpose(1, 2)))
    y = torch.bmm(h.to(wo.dtype), wo.transpose(1, 2))             # as the expert casts before wo
    y = _Move.apply(y.reshape(E * C, d), slot, filled)
    out = (y * weight[:, None]).to(hidden_states.dtype)
    return out.view(B, S, d)


def batched_switch_experts(model: nn.Module) -> int:
    """Makes every Switch sparse MLP of ``model`` run its experts batched; returns how many.
    Experts with dropout (training with ``dropout_rate`` > 0) keep the loop (the batched path
    has no dropout between the two matmuls), and so do experts that are not plain
    ``nn.Linear`` (packed ones): there are no weights to stack."""
    from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersSparseMLP
    count = 0
    for module in model.modules():
        if not isinstance(module, SwitchTransformersSparseMLP):
            continue
        experts = list(module.experts.values())
        if all(type(ex.wi) is nn.Linear and type(ex.wo) is nn.Linear and ex.dropout.p == 0 for ex in experts):
            module.forward = types.MethodType(_batched_forward, module)
            count += 1
    return count

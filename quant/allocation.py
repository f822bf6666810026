"""Expert scores -> expert order -> bits per expert.

An *order* lists the experts of one MoE layer from most to least sensitive: rank 0
gets the highest bit width. Orders (``ORDER_TYPES``):

- ``router``: ascending router-row l2 norm (or, with a reference checkpoint, ascending
  norm change ||w_e|| - ||w_ref,e||): small change = rare but critical features.
- ``variance`` (MaxVar): descending max over neurons of the variance of the neuron's
  input weights (rows of the gate / first projection).
- ``combined``: the router order, then MaxVar reordering with threshold zeta.
- baselines: ``random`` (seeded), ``frequency`` (more routed calibration tokens first),
  ``routing_weight`` (higher mean router probability first), ``reverse_router``.

Cost orders (``COST_ORDERS``) do not rank by one score: each expert has a cost at each
width, and ``assign_levels`` gives the layer's level counts to the experts so that the
summed cost is smallest (an exact DP):

- ``sensitivity``: the predicted increase of the layer's output error, from each expert's
  GPTQ error at each width, its routed tokens and routing weights (``predicted_cost``);
- ``oracle`` / ``anti_oracle``: measured costs (the loss increase with only that expert
  quantized, expert_sensitivity.py), smallest / largest sum: the best and the worst any
  order can do at these counts, as far as the experts' damages add up.

Bit counts follow the paper repo's policy so its configurations reproduce (see
``level_counts``).
"""
from __future__ import annotations

import random

import torch

MEASURED_ORDERS = ("oracle", "anti_oracle")     # costs read from --sensitivity_file
COST_ORDERS = ("sensitivity",) + MEASURED_ORDERS
ORDER_TYPES = ("router", "variance", "combined", "random", "frequency", "routing_weight", "reverse_router") \
    + COST_ORDERS


def router_norm(router_weight: torch.Tensor, reference: torch.Tensor | None = None) -> list[float]:
    """l2 norm of each expert's router row, or its change from ``reference``."""
    norms = router_weight.float().norm(dim=1)
    if reference is not None:
        if reference.shape != router_weight.shape:
            raise ValueError(f"router reference has shape {tuple(reference.shape)}, the model's router "
                             f"{tuple(router_weight.shape)}: pass a checkpoint of the same architecture")
        norms = norms - reference.to(norms.device).float().norm(dim=1)  # references are read to the host
    return norms.tolist()


def max_var(first_proj: torch.Tensor) -> list[float]:
    """MaxVar per expert. first_proj: (E, neurons, in) input weights of each neuron."""
    return first_proj.float().var(dim=2).amax(dim=1).tolist()


def _argsort(values: list[float], descending: bool = False) -> list[int]:
    # Stable: ties keep expert-id order, so orders are reproducible.
    return sorted(range(len(values)), key=lambda e: -values[e] if descending else values[e])


def maxvar_reorder(order: list[int], maxvar: list[float], zeta: float) -> list[int]:
    """Walk the experts from the back of ``order``; move an expert up to the first
    position whose expert has MaxVar below its own divided by zeta, if that is earlier."""
    out = list(order)
    for expert in reversed(order):
        pos = out.index(expert)
        first = next((j for j, other in enumerate(out) if zeta * maxvar[other] < maxvar[expert]), None)
        if first is not None and first < pos:
            out.insert(first, out.pop(pos))
    return out


def expert_order(order_type: str, scores: dict[str, list[float]], zeta: float = 3.0, seed: int = 0) -> list[int]:
    """scores: ``router_norm`` (norm or norm change), ``max_var``, ``tokens``, ``routing_weight``."""
    if order_type not in ORDER_TYPES or order_type in COST_ORDERS:
        raise ValueError(f"unknown order type {order_type!r}: choose one of {', '.join(ORDER_TYPES)}")
    n = len(scores["router_norm"])
    if order_type == "router":
        return _argsort(scores["router_norm"])
    if order_type == "reverse_router":
        return _argsort(scores["router_norm"], descending=True)
    if order_type == "variance":
        return _argsort(scores["max_var"], descending=True)
    if order_type == "combined":
        return maxvar_reorder(_argsort(scores["router_norm"]), scores["max_var"], zeta)
    if order_type == "frequency":
        return _argsort(scores["tokens"], descending=True)
    if order_type == "routing_weight":
        return _argsort(scores["routing_weight"], descending=True)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


def level_counts(num_experts: int, avg_bits: float, high: int, low: int, mid: int | None = None) -> dict[int, int]:
    """How many experts get each bit level (the paper repo's counts policy).

    Two levels: n_high = round(clamp((b - low) / (high - low)) * E).
    Three equally spaced levels: two levels around ``mid``, then pairs of mid experts
    become one high + one low while the average's region allows it.
    """
    if not low < high:
        raise ValueError(f"the high bit level ({high}) must exceed the low one ({low})")
    if not low <= avg_bits <= high:
        raise ValueError(f"--avg_bits {avg_bits} is outside [{low}, {high}] (the low and high bit levels): "
                         f"choose an average between them or change the levels")
    clamp = lambda x: max(0.0, min(1.0, x))
    E = num_experts
    if mid is None:
        n_high = round(clamp((avg_bits - low) / (high - low)) * E)
        return {high: n_high, low: E - n_high}
    if not low < mid < high or high - mid != mid - low:
        raise ValueError(f"three bit levels must be equally spaced (high - mid == mid - low), got "
                         f"{high}/{mid}/{low}: e.g. 3/2/1 or 4/3/2, or drop --mid_bit_level for two levels")
    if avg_bits >= mid:
        n_h = round(clamp((avg_bits - mid) / (high - mid)) * E)
        n_m, n_l = E - n_h, 0
    else:
        n_m = round(clamp((avg_bits - low) / (mid - low)) * E)
        n_h, n_l = 0, E - n_m
    base_h = n_h
    span = high - low
    region = "high" if avg_bits > high - span / 3 else "mid" if avg_bits >= high - 2 * span / 3 else "low"
    while n_m >= 2 and region != "low":
        if region == "mid" and n_m - 2 < n_h + 1 - base_h:
            break
        n_h, n_m, n_l = n_h + 1, n_m - 2, n_l + 1
    return {high: n_h, mid: n_m, low: n_l}


def bits_per_expert(order: list[int], counts: dict[int, int]) -> list[int]:
    """Experts in ``order`` take the levels from highest to lowest; returns bits indexed by expert id."""
    levels = [b for b in sorted(counts, reverse=True) for _ in range(counts[b])]
    if len(levels) != len(order):
        raise ValueError("level counts do not add up to the number of experts")
    bits = [0] * len(order)
    for rank, expert in enumerate(order):
        bits[expert] = levels[rank]
    return bits


def predicted_cost(rel_error: dict[int, list[float]], weight_sq: list[float], output_energy: list[float]
                   ) -> dict[int, list[float]]:
    """What quantizing expert e at width b adds to the MoE layer's output error, per token:

        cost_e(b) = (sum over tokens t routed to e of g_t^2) / N  *  E||y_e||^2  *  rel_e(b)

    g_t the routing weight the token's output is scaled by, N the layer's tokens, E||y_e||^2
    the expert's mean squared output on its tokens (tr(W_down H W_down^T)), rel_e(b) its
    relative output error at b bits (GPTQ's tr(dW H dW^T) / tr(W H W^T), summed over the
    expert's matrices: to first order their errors add). ``weight_sq`` is the first factor.
    With a loss whose curvature in the layer output is the same for every expert, this is
    proportional to the expert's share of the loss increase."""
    return {b: [w * y * r for w, y, r in zip(weight_sq, output_energy, errs)] for b, errs in rel_error.items()}


def assign_levels(costs: dict[int, list[float]], counts: dict[int, int], maximize: bool = False) -> list[int]:
    """Bits by expert id: ``counts[b]`` experts at each width b, chosen to minimise (or with
    ``maximize``, maximise) the summed ``costs[b][e]``. Exact: a DP over the experts whose
    state is how many have taken each level so far (the last level's count follows), so
    O(E * prod(counts + 1)) -- 8 experts in 3 levels: 8 * 27 states."""
    levels = [b for b in sorted(counts, reverse=True) if counts[b] > 0]
    missing = [b for b in levels if b not in costs]
    if missing:
        raise ValueError(f"no costs for {missing} bits (costs are given for {sorted(costs)})")
    num = sum(counts[b] for b in levels)
    if any(len(costs[b]) != num for b in levels):
        raise ValueError(f"costs must have one value per expert ({num})")
    sign = -1.0 if maximize else 1.0
    free, last = levels[:-1], levels[-1]
    best = {(0,) * len(free): 0.0}       # state -> smallest signed cost so far
    back = []                            # per expert: state -> (previous state, bits)
    for e in range(num):
        nxt, choice = {}, {}
        for state, total in best.items():
            for k, b in enumerate(levels):
                if k < len(free):
                    if state[k] == counts[b]:
                        continue
                    new = state[:k] + (state[k] + 1,) + state[k + 1:]
                elif e - sum(state) == counts[last]:
                    continue
                else:
                    new = state
                value = total + sign * costs[b][e]
                if new not in nxt or value < nxt[new]:
                    nxt[new], choice[new] = value, (state, b)
        best = nxt
        back.append(choice)
    state, bits = tuple(counts[b] for b in free), [0] * num
    for e in reversed(range(num)):
        state, bits[e] = back[e][state]
    return bits


def order_from_bits(bits: list[int], costs: dict[int, list[float]]) -> list[int]:
    """An expert order that gives ``bits`` (most bits first; within a width, the expert
    that would cost most at the lowest width first): what bit_allocation.json reports."""
    low = min(costs)
    return sorted(range(len(bits)), key=lambda e: (-bits[e], -costs[low][e]))

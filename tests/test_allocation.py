import pytest

from moeq.quant.allocation import bits_per_expert, expert_order, level_counts, maxvar_reorder


def test_two_levels():
    assert level_counts(8, 2.0, 3, 1) == {3: 4, 1: 4}
    assert level_counts(8, 2.5, 3, 1) == {3: 6, 1: 2}
    # (1.625 - 1) / 2 * 8 = 2.5: Python's round is half to even -> 2
    assert level_counts(8, 1.625, 3, 1) == {3: 2, 1: 6}
    assert level_counts(8, 2.5, 3, 2) == {3: 4, 2: 4}


def test_three_levels_regions():
    # region mid (5/3 <= 2.0 <= 7/3): start 0/8/0, move pairs while mid stays >= promoted
    assert level_counts(8, 2.0, 3, 1, 2) == {3: 2, 2: 4, 1: 2}
    # region high (2.5 > 7/3): start 4/4/0, move pairs while two are mid
    assert level_counts(8, 2.5, 3, 1, 2) == {3: 6, 2: 0, 1: 2}
    # region low (1.5 < 5/3): no moves, two levels mid/low
    assert level_counts(8, 1.5, 3, 1, 2) == {3: 0, 2: 4, 1: 4}
    assert level_counts(64, 2.0, 3, 1, 2) == {3: 21, 2: 22, 1: 21}
    for b in (1.0, 1.25, 2.0, 2.25, 2.5, 3.0):
        c = level_counts(8, b, 3, 1, 2)
        assert sum(c.values()) == 8


def test_rejected_budgets():
    with pytest.raises(ValueError, match="outside"):
        level_counts(8, 3.5, 3, 1, 2)
    with pytest.raises(ValueError, match="outside"):
        level_counts(8, 0.5, 3, 1)
    with pytest.raises(ValueError, match="equally spaced"):
        level_counts(8, 2.0, 4, 1, 2)


def test_router_order_ascending_norm_and_reverse():
    scores = {"router_norm": [3.0, 1.0, 2.0, 0.5], "max_var": [0, 0, 0, 0]}
    assert expert_order("router", scores) == [3, 1, 2, 0]
    assert expert_order("reverse_router", scores) == [0, 2, 1, 3]


def test_variance_order_descending():
    assert expert_order("variance", {"router_norm": [0] * 4, "max_var": [0.1, 0.4, 0.2, 0.3]}) == [1, 3, 2, 0]


def test_combined_reordering_by_hand():
    # router order 0,1,2,3; expert 3's MaxVar (4) exceeds 3x expert 0's (1): it moves to the front.
    mv = [1.0, 2.0, 0.5, 4.0]
    assert maxvar_reorder([0, 1, 2, 3], mv, 3.0) == [3, 0, 1, 2]
    # zeta 1.5: then expert 1 (2.0 > 1.5 * 1.0) also moves ahead of expert 0.
    assert maxvar_reorder([0, 1, 2, 3], mv, 1.5) == [3, 1, 0, 2]
    # a huge zeta leaves the router order alone
    assert maxvar_reorder([0, 1, 2, 3], mv, 100.0) == [0, 1, 2, 3]
    scores = {"router_norm": [0.1, 0.2, 0.3, 0.4], "max_var": mv}
    assert expert_order("combined", scores, zeta=3.0) == [3, 0, 1, 2]


def test_frequency_and_routing_weight_orders():
    s = {"router_norm": [0] * 3, "max_var": [0] * 3, "tokens": [5, 50, 10], "routing_weight": [0.5, 0.2, 0.3]}
    assert expert_order("frequency", s) == [1, 2, 0]
    assert expert_order("routing_weight", s) == [0, 2, 1]


def test_random_order_is_seeded_permutation():
    s = {"router_norm": [0] * 16}
    a, b, c = expert_order("random", s, seed=1), expert_order("random", s, seed=1), expert_order("random", s, seed=2)
    assert a == b and sorted(a) == list(range(16)) and a != c


def test_unknown_order_type():
    with pytest.raises(ValueError, match="unknown order type"):
        expert_order("norm", {"router_norm": [1.0]})


def test_bits_follow_order():
    order = [2, 0, 3, 1]
    assert bits_per_expert(order, {3: 1, 2: 2, 1: 1}) == [2, 1, 3, 2]


def test_uniform_allocation_and_explicit_counts():
    from moeq.config import ConfigError, QuantConfig
    assert QuantConfig(mixed_type="uniform", avg_bits=3).counts_for(8) == {3: 8}
    with pytest.raises(ConfigError, match="integer"):
        QuantConfig(mixed_type="uniform", avg_bits=2.5)
    assert QuantConfig(level_counts={3: 32, 2: 32}).counts_for(64) == {3: 32, 2: 32}
    with pytest.raises(ConfigError, match="add up to 63"):
        QuantConfig(level_counts={3: 32, 2: 31}).counts_for(64)

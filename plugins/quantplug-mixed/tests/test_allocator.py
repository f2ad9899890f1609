"""The exact bit allocator: optimal against brute force, budget respected, ties, errors, realistic sizes."""

from __future__ import annotations

import itertools
import math
import random
import time

import pytest
from quantplug_mixed.allocator import minimum_cost, solve

from quantplug.errors import ConfigError


def brute_force(costs: list[list[int]], values: list[list[float]], budget: int) -> tuple[float, int] | None:
    """(least total sensitivity, least cost among those) over every allocation within ``budget``."""
    best: tuple[float, int] | None = None
    for choice in itertools.product(*(range(len(c)) for c in costs)):
        cost = sum(c[k] for c, k in zip(costs, choice))
        if cost > budget:
            continue
        value = sum(v[k] for v, k in zip(values, choice))
        if best is None or value < best[0] - 1e-12 or (abs(value - best[0]) <= 1e-12 and cost < best[1]):
            best = (value, cost)
    return best


def random_instance(rng: random.Random, bit_like: bool) -> tuple[list[list[int]], list[list[float]], int]:
    layers = rng.randint(1, 7)
    costs, values = [], []
    for _ in range(layers):
        if bit_like:  # cost numel * bits, error decreasing ~4x per bit (as quantization noise does)
            numel = rng.randint(1, 50)
            bits = sorted(rng.sample([2, 3, 4, 5, 6, 8], rng.randint(1, 4)))
            costs.append([numel * b for b in bits])
            scale = rng.lognormvariate(0, 2)
            values.append([scale * numel * 4.0 ** -b * rng.uniform(0.5, 1.5) for b in bits])
        else:  # arbitrary options: costs and values unrelated, repeated values allowed
            k = rng.randint(1, 4)
            costs.append([rng.randint(0, 20) for _ in range(k)])
            values.append([float(rng.randint(0, 5)) if rng.random() < 0.3 else rng.uniform(-1, 10) for _ in range(k)])
    low, high = minimum_cost(costs), sum(max(c) for c in costs)
    return costs, values, rng.randint(low, high)


@pytest.mark.parametrize("bit_like", [True, False])
def test_allocation_is_optimal_against_brute_force(bit_like: bool) -> None:
    rng = random.Random(7 if bit_like else 11)
    for _ in range(300):
        costs, values, budget = random_instance(rng, bit_like)
        answer = solve(costs, values, budget)
        expected = brute_force(costs, values, budget)
        assert expected is not None
        got_cost = sum(c[k] for c, k in zip(costs, answer.choice))
        got_value = sum(v[k] for v, k in zip(values, answer.choice))
        assert got_cost <= budget
        assert got_cost == answer.cost
        assert math.isclose(got_value, answer.sensitivity, rel_tol=1e-12, abs_tol=1e-12)
        assert math.isclose(got_value, expected[0], rel_tol=1e-9, abs_tol=1e-9)
        assert got_cost == expected[1]  # ties go to the cheaper allocation


def test_budget_is_respected_and_binding() -> None:
    # three layers, costs = bits x size; more budget never hurts and the answer always fits
    sizes = [10, 30, 20]
    bits = [2, 3, 4, 8]
    costs = [[n * b for b in bits] for n in sizes]
    values = [[n * 4.0 ** -b for b in bits] for n in sizes]
    previous = math.inf
    for budget in range(minimum_cost(costs), sum(max(c) for c in costs) + 1, 7):
        answer = solve(costs, values, budget)
        assert answer.cost <= budget
        assert answer.sensitivity <= previous + 1e-15
        previous = answer.sensitivity
    assert solve(costs, values, sum(max(c) for c in costs)).choice == (3, 3, 3)
    assert solve(costs, values, minimum_cost(costs)).choice == (0, 0, 0)


def test_exact_where_greedy_is_not() -> None:
    # a greedy by sensitivity-per-cost would upgrade the small layer first and then miss the big one's upgrade
    costs = [[2, 4], [10, 20]]
    values = [[5.0, 0.0], [100.0, 90.0]]
    answer = solve(costs, values, 22)
    assert answer.choice == (0, 1) and answer.sensitivity == 95.0


def test_infeasible_budget_and_bad_input_raise_clear_errors() -> None:
    with pytest.raises(ConfigError, match="below the cheapest allocation"):
        solve([[4, 8]], [[1.0, 0.5]], 3)
    with pytest.raises(ConfigError, match="non-negative integers"):
        solve([[1.5]], [[1.0]], 3)
    with pytest.raises(ConfigError, match="finite"):
        solve([[1]], [[math.nan]], 3)
    with pytest.raises(ConfigError, match="one cost list per layer"):
        solve([[1]], [[1.0], [2.0]], 3)


def test_realistic_network_size_solves_fast() -> None:
    # 52 layers with MobileNetV2-like sizes and 6 candidates: still exact, well under a second
    rng = random.Random(0)
    sizes = [rng.choice([288, 432, 864, 1536, 3456, 9216, 24576, 61440, 153600, 409600]) for _ in range(52)]
    bits = [2, 3, 4, 5, 6, 8]
    costs = [[n * b for b in bits] for n in sizes]
    values = [[rng.lognormvariate(0, 1) * n * 4.0 ** -b for b in bits] for n in sizes]
    start = time.perf_counter()
    answer = solve(costs, values, 3 * sum(sizes))
    assert time.perf_counter() - start < 5.0
    assert answer.cost <= 3 * sum(sizes)
    # the answer cannot be improved by moving any single layer to another width within the budget
    for i, (c, v) in enumerate(zip(costs, values)):
        k = answer.choice[i]
        for j in range(len(bits)):
            if answer.cost - c[k] + c[j] <= 3 * sum(sizes):
                assert v[j] >= v[k] - 1e-12 * abs(answer.sensitivity)

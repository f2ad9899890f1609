"""Exact multiple-choice knapsack: one bit width per layer, least total sensitivity within a budget.

Given layers ``i = 1..L``, each with options ``k`` of integer cost ``c_ik`` (weight bits, or bit operations)
and sensitivity ``s_ik``, choose one option per layer to

    minimize  sum_i s_i,k(i)    subject to    sum_i c_i,k(i) <= B.

This is the integer program of HAWQ-V3 (Yao et al., ICML 2021, eq. for model size / BOPs constraints), solved
here without a solver and without discretizing the budget: a dynamic programme over the layers that keeps,
after each layer, the Pareto frontier of partial allocations, i.e. the (cost, sensitivity) pairs no other
pair beats in both (Nemhauser and Ullmann, "Discrete dynamic programming and capital allocation", Management
Science 1969). A dominated partial allocation can never be completed into a better full one than the
allocation dominating it, so the minimum over the final frontier is the exact optimum. Partial allocations
whose cost plus the cheapest completion already exceeds ``B`` are dropped too. Costs are integers, so
there is no rounding anywhere; the frontier holds at most one entry per distinct partial cost.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from quantplug.errors import ConfigError

logger = logging.getLogger(__name__)

#: frontier size above which the solver gives up with an error instead of exhausting memory
MAX_STATES = 5_000_000


@dataclass(frozen=True)
class Allocation:
    """The solver's answer: one option index per layer, the total cost and sensitivity, the largest frontier."""

    choice: tuple[int, ...]
    cost: int
    sensitivity: float
    max_frontier: int


def _check(costs: Sequence[Sequence[int]], sensitivities: Sequence[Sequence[float]]) -> None:
    if len(costs) != len(sensitivities):
        raise ConfigError(f"one cost list per layer: {len(costs)} cost lists for {len(sensitivities)} layers")
    for i, (c, s) in enumerate(zip(costs, sensitivities)):
        if not len(c) or len(c) != len(s):
            raise ConfigError(f"layer {i}: needs at least one option and as many costs as sensitivities")
        if any(int(x) != x or x < 0 for x in c):
            raise ConfigError(f"layer {i}: costs must be non-negative integers, got {list(c)}")
        if not all(np.isfinite(float(x)) for x in s):
            raise ConfigError(f"layer {i}: sensitivities must be finite, got {list(s)}")


def minimum_cost(costs: Sequence[Sequence[int]]) -> int:
    """The cheapest allocation's cost (every layer at its cheapest option)."""
    return int(sum(min(int(x) for x in c) for c in costs))


def solve(costs: Sequence[Sequence[int]], sensitivities: Sequence[Sequence[float]], budget: int,
          max_states: int = MAX_STATES) -> Allocation:
    """The exact minimizer of ``sum_i s[i][k_i]`` subject to ``sum_i c[i][k_i] <= budget`` (see module docstring).

    Ties (equal total sensitivity) go to the cheaper allocation. Raises ``ConfigError`` when even the cheapest
    allocation exceeds ``budget``.
    """
    _check(costs, sensitivities)
    budget = int(budget)
    floor = minimum_cost(costs)
    if floor > budget:
        raise ConfigError(f"the budget ({budget}) is below the cheapest allocation ({floor}): raise the budget or "
                          "add smaller candidate bit widths")
    layer_costs = [np.asarray(c, dtype=np.int64) for c in costs]
    layer_sens = [np.asarray(s, dtype=np.float64) for s in sensitivities]
    cheapest = np.array([c.min() for c in layer_costs], dtype=np.int64)
    rest = np.concatenate([np.cumsum(cheapest[::-1])[::-1][1:], [0]])  # cheapest completion after layer i
    cost = np.zeros(1, dtype=np.int64)
    sens = np.zeros(1, dtype=np.float64)
    parents: list[np.ndarray] = []
    options: list[np.ndarray] = []
    largest = 1
    for i, (c, s) in enumerate(zip(layer_costs, layer_sens)):
        k = len(c)
        new_cost = (cost[:, None] + c[None, :]).reshape(-1)
        new_sens = (sens[:, None] + s[None, :]).reshape(-1)
        parent = np.repeat(np.arange(len(cost)), k)
        option = np.tile(np.arange(k), len(cost))
        fits = new_cost + rest[i] <= budget
        new_cost, new_sens, parent, option = new_cost[fits], new_sens[fits], parent[fits], option[fits]
        order = np.lexsort((new_sens, new_cost))  # by cost, then sensitivity; stable for exact ties
        new_cost, new_sens, parent, option = new_cost[order], new_sens[order], parent[order], option[order]
        # keep an entry only if its sensitivity is strictly below that of every cheaper-or-equal entry before it
        best_before = np.concatenate([[np.inf], np.minimum.accumulate(new_sens)[:-1]])
        keep = new_sens < best_before
        cost, sens = new_cost[keep], new_sens[keep]
        parents.append(parent[keep])
        options.append(option[keep])
        largest = max(largest, len(cost))
        if len(cost) > max_states:
            raise ConfigError(f"the allocation frontier grew to {len(cost)} states at layer {i}; use fewer candidate "
                              "bit widths or a coarser budget kind")
    # the frontier is sorted by cost with strictly decreasing sensitivity: the last entry is the optimum
    index = len(cost) - 1
    best_cost, best_sens = int(cost[index]), float(sens[index])
    choice = [0] * len(layer_costs)
    for i in range(len(layer_costs) - 1, -1, -1):
        choice[i] = int(options[i][index])
        index = int(parents[i][index])
    return Allocation(tuple(choice), best_cost, best_sens, largest)

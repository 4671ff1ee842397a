"""The bit allocator: optimal against brute force on small tables and against the exact DP on medium ones,
within the budget and proven optimal on tables of real shape, monotone in the budget."""
import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bitsmith.formats.errors import InputError
from bitsmith.quantize import allocate as allocator
from bitsmith.quantize.allocate import Allocation, InfeasibleBudget, achieved, allocate, solve

METHODS = ["auto", "dp", "lagrangian"]

# SmolLM2-135M: 30 blocks of q, k, v, o, gate, up, down as (out, in)
SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
CONFIGS = [(bits, group, sym) for bits in (2, 3, 4, 8) for group in (32, 64, 128, -1) for sym in (True, False)]
GROUP_PENALTY = {32: 1.0, 64: 1.08, 128: 1.18, -1: 1.7}


def stored_bits(out: int, inp: int, bits: int, group: int, sym: bool) -> int:
    """Codes, fp16 scales, zero points when asymmetric, int32 g_idx when grouped."""
    groups = 1 if group == -1 else inp // group
    return (out * inp * bits + groups * out * 16 + (0 if sym else groups * out * bits)
            + (0 if group == -1 else 32 * inp))


def real_table(seed: int, blocks: int = 30) -> tuple[list[list[int]], list[list[float]], int]:
    """(costs, errors, weights) of 7 x `blocks` linears x 32 configurations: exact stored bits, and errors
    falling 4x per bit, scaled by a log-normal sensitivity per linear, with 10% noise per configuration."""
    rng = np.random.default_rng(seed)
    costs, errors, weights = [], [], 0
    for out, inp in SHAPES * blocks:
        weights += out * inp
        sensitivity = out * inp * rng.lognormal(0, 1.5)
        costs.append([stored_bits(out, inp, *config) for config in CONFIGS])
        errors.append([sensitivity * 4.0**-bits * GROUP_PENALTY[group] * (1.3 if sym else 1.0)
                       * rng.lognormal(0, 0.1) for bits, group, sym in CONFIGS])
    return costs, errors, weights


def brute_force(costs, errors, budget) -> float | None:
    """Least summed error of any choice within the budget (None if there is none)."""
    choices = np.array(list(itertools.product(*(range(len(row)) for row in costs))))
    cost = sum(np.array(row)[choices[:, layer]] for layer, row in enumerate(costs))
    error = sum(np.array(row, dtype=float)[choices[:, layer]] for layer, row in enumerate(errors))
    return float(error[cost <= budget].min()) if (cost <= budget).any() else None


@st.composite
def tables(draw, integral: bool):
    """Up to 6 linears x 5 candidates (ragged), costs 0..40 bits, a budget around the feasible range."""
    costs, errors = [], []
    value = st.integers(0, 30).map(float) if integral else st.floats(-10, 100, allow_nan=False)
    for _ in range(draw(st.integers(1, 6))):
        m = draw(st.integers(1, 5))
        costs.append(draw(st.lists(st.integers(0, 40), min_size=m, max_size=m)))
        errors.append(draw(st.lists(value, min_size=m, max_size=m)))
    least, most = sum(min(row) for row in costs), sum(max(row) for row in costs)
    return costs, errors, draw(st.integers(least - 3, most + 3))


def check_optimal(costs, errors, budget, method, tolerance):
    """solve() either refuses an infeasible budget naming the minimum, or is within it and optimal."""
    best = brute_force(costs, errors, budget)
    least = sum(min(row) for row in costs)
    if best is None:
        with pytest.raises(InfeasibleBudget, match=f"below the minimum achievable: {least} bits"):
            solve(costs, errors, budget, method)
        return
    result = solve(costs, errors, budget, method)
    assert (result.cost, result.error) == achieved(costs, errors, result.choice)
    assert result.cost <= budget
    assert result.optimal and result.bound == result.error
    assert abs(result.error - best) <= tolerance * (1 + sum(map(abs, itertools.chain(*errors))))


@pytest.mark.parametrize("method", METHODS)
@settings(max_examples=150, deadline=None)
@given(table=tables(integral=True))
def test_optimal_on_small_tables_with_ties(method, table):
    check_optimal(*table, method, tolerance=0.0)


@pytest.mark.parametrize("method", METHODS)
@settings(max_examples=100, deadline=None)
@given(table=tables(integral=False))
def test_optimal_on_small_tables(method, table):
    check_optimal(*table, method, tolerance=1e-12)


@pytest.mark.parametrize("method", METHODS)
@settings(max_examples=60, deadline=None)
@given(table=tables(integral=True))
def test_error_never_rises_with_the_budget(method, table):
    costs, errors, _ = table
    least, most = sum(min(row) for row in costs), sum(max(row) for row in costs)
    found = [solve(costs, errors, budget, method).error for budget in range(least, most + 2)]
    assert found == sorted(found, reverse=True)
    assert found[-1] == sum(min(row) for row in errors)


@pytest.mark.parametrize("method", METHODS)
def test_ties_go_to_the_lower_index_then_the_cheaper(method):
    assert solve([[5, 5, 5]], [[1.0, 1.0, 2.0]], 10, method).choice == [0]
    assert solve([[7, 5]], [[1.0, 1.0]], 10, method).choice == [1]
    # two optimal choices, costing 4 and 6 bits: the cheaper one
    assert solve([[0, 4], [0, 6]], [[1.0, 0.0], [1.0, 0.0]], 6, method) == Allocation([1, 0], 4, 1.0, 1.0, True)


@pytest.mark.parametrize("seed", range(4))
def test_lagrangian_search_matches_the_exact_dp(seed, monkeypatch):
    rng = np.random.default_rng(seed)
    costs = rng.integers(0, 1500, (40, 8))
    # errors fall with cost, as measured ones do, plus noise that breaks convexity
    errors = 1e3 / (1 + costs) * rng.lognormal(0, 0.3, costs.shape)
    least, most = int(costs.min(axis=1).sum()), int(costs.max(axis=1).sum())
    for budget in (least + (most - least) // 4, (least + most) // 2, least + 4 * (most - least) // 5):
        exact = solve(costs, errors, budget, "dp")
        found = solve(costs, errors, budget, "lagrangian")
        assert exact.optimal and found.optimal and found.cost <= budget
        assert found.error == pytest.approx(exact.error, rel=1e-12)
        # cut short, the search answers the greedy choice with a true lower bound
        monkeypatch.setattr(allocator, "MAX_WORK", 0)
        greedy = solve(costs, errors, budget, "lagrangian")
        monkeypatch.undo()
        assert not greedy.optimal and greedy.cost <= budget
        assert greedy.bound <= exact.error * (1 + 1e-12) and greedy.error >= exact.error * (1 - 1e-12)


@pytest.mark.parametrize("seed, bpw", [(0, 2.5), (1, 3.0), (2, 4.25)])
def test_real_shaped_table_lands_on_the_budget_and_is_proven_optimal(seed, bpw):
    costs, errors, weights = real_table(seed)
    budget = int(bpw * weights)
    result = solve(costs, errors, budget)
    assert result.optimal and result.bound == result.error
    assert result.cost <= budget and budget - result.cost < 0.001 * weights
    assert allocate(costs, errors, budget) == result.choice
    assert solve(np.array(costs), np.array(errors), np.int64(budget)) == result


def test_real_shaped_table_error_never_rises_with_the_budget():
    costs, errors, weights = real_table(3)
    results = [solve(costs, errors, bpw * weights) for bpw in np.arange(2.1, 9.6, 0.5)]
    assert all(r.optimal for r in results)
    found = [r.error for r in results]
    assert found == sorted(found, reverse=True)
    assert results[-1].error == math.fsum(min(row) for row in errors)


def test_infeasible_budget_names_the_minimum():
    with pytest.raises(InfeasibleBudget) as caught:
        allocate([[10, 20], [5]], [[1.0, 0.5], [0.0]], 14)
    assert str(caught.value) == ("a budget of 14 bits is below the minimum achievable: 15 bits "
                                 "(the cheapest candidate of every linear)")
    assert isinstance(caught.value, InputError) and isinstance(caught.value, ValueError)
    with pytest.raises(InfeasibleBudget, match="minimum achievable: 0 bits"):
        allocate([], [], -1)


def test_no_linears_and_real_budgets():
    assert solve([], [], 0) == Allocation([], 0, 0.0, 0.0, True)
    assert allocate([[3, 4]], [[2.0, 1.0]], 3.99) == [0]      # a real budget is floored
    assert allocate([[3, 4]], [[2.0, 1.0]], np.int64(4)) == [1]


@pytest.mark.parametrize("costs, errors, budget, message", [
    ([[1, 2]], [[1.0]], 5, "linear 0: costs and errors must be non-empty lists of one length"),
    ([[1], []], [[1.0], []], 5, "linear 1: costs and errors must be non-empty lists of one length"),
    ([[1.5, 2]], [[1.0, 0.5]], 5, "linear 0: costs must be non-negative integers (bits)"),
    ([[-1, 2]], [[1.0, 0.5]], 5, "linear 0: costs must be non-negative integers (bits)"),
    ([[1, 2]], [[math.nan, 0.5]], 5, "linear 0: errors must be finite"),
    ([[1]], [[1.0], [2.0]], 5, "1 rows of costs but 2 rows of errors"),
    ([[1]], [[1.0]], math.nan, "budget must be a finite number of bits, got nan"),
    ([[1]], [[1.0]], "8", "budget must be a finite number of bits, got '8'"),
    ([[1]], [[1.0]], True, "budget must be a finite number of bits, got True"),
])
def test_malformed_tables_are_refused(costs, errors, budget, message):
    with pytest.raises(ValueError) as caught:
        allocate(costs, errors, budget)
    assert str(caught.value).startswith(message) and not isinstance(caught.value, InputError)


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="method must be 'auto', 'dp' or 'lagrangian', got 'anneal'"):
        solve([[1]], [[1.0]], 1, "anneal")


def test_achieved_totals_a_choice():
    assert achieved([[3, 4], [5]], [[0.1, 0.2], [0.7]], [1, 0]) == (9, math.fsum([0.2, 0.7]))
    with pytest.raises(ValueError, match="linear 0: choice 2 is not one of its 2 candidates"):
        achieved([[3, 4]], [[0.1, 0.2]], [2])
    with pytest.raises(ValueError, match="2 choices for 1 rows of costs and 1 rows of errors"):
        achieved([[3, 4]], [[0.1, 0.2]], [0, 0])

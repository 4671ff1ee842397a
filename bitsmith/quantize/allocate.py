"""Bit allocation: one quantization configuration per linear, the least predicted loss within a bit budget.

The measurement gives, for linear l and candidate configuration j, the exact stored cost c[l][j] in bits
(codes, scales, zeros, g_idx, everything stored) and the predicted loss increase e[l][j], comparable across
linears. The plan picks one candidate x_l per linear:

    minimise  sum_l e[l][x_l]   subject to   sum_l c[l][x_l] <= budget,

a multiple-choice knapsack. EXL2 measures the same table per option (`total_bits`, error) and searches it by
simulated annealing; here it is solved exactly:

1. Per linear, drop every candidate another one beats (no costlier and no worse). What is left, the frontier,
   gets strictly costlier and strictly better from one point to the next.
2. Small tables: an exact dynamic program over the total extra cost above each linear's cheapest point, in
   units of the gcd of those extra costs (`DP_MAX_WORK` bounds its cells times frontier points).
3. Otherwise: the Lagrangian relaxation over each linear's lower convex hull gives a multiplier lambda (bits
   are bought wherever a hull step lowers the error by more than lambda per bit) and a lower bound on the
   optimum; a greedy pass gives a feasible choice (hull steps by falling slope while they fit, then the
   leftover budget on the best error drop per bit); a search over Pareto-optimal partial (cost, error)
   states, pruned by the Lagrangian reduced costs, then proves that choice optimal or finds the optimum.

Guarantees: the total cost never exceeds the budget; the answer depends only on the table and the budget.
The answer is optimal (least summed error, up to floating-point rounding of the sums) in step 2, and in
step 3 whenever the search builds at most `MAX_WORK` partial states (about a second); on tables of real
shape (210 linears x 32 configurations) it builds at most a few million, most often about 1e5, in well
under a second. An optimal answer's error is non-increasing in the budget. If the search is cut short, the
answer is the greedy one, `Allocation.optimal` is False and `Allocation.bound` (the Lagrangian bound) says
how far from optimal it can be. Ties: among candidates of equal cost and error the lower index, among
equal errors the cheaper candidate; among optimal choices the cheapest total.

The model assumes errors add across linears; EvoPress shows this holds only roughly, so a search on the
whole model's loss can refine what this picks.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Real

import numpy as np

from ..formats.errors import InputError

DP_MAX_WORK = 20_000_000    # cost cells x frontier points of the exact DP, about 0.1 s on one core
MAX_WORK = 10_000_000       # partial states the Lagrangian search may build before it settles for greedy
PAD = np.iinfo(np.int64).max // 4   # cost of the padding after a short frontier: never fits any budget


class InfeasibleBudget(InputError, ValueError):
    """The budget is below the cheapest candidate of every linear together."""


@dataclass(frozen=True)
class Allocation:
    """The chosen candidate per linear, its totals, and a lower bound on the error of any choice."""
    choice: list[int]
    cost: int               # total stored bits
    error: float            # summed predicted error (exactly rounded sum)
    bound: float            # no choice within the budget has less summed error
    optimal: bool           # proven optimal: then bound == error


@dataclass(frozen=True)
class _Frontier:
    """Per linear the candidates no other beats, cheapest first, rows padded to one width."""
    cost: np.ndarray        # int64 [n, m], PAD after the frontier
    error: np.ndarray       # float64 [n, m], +inf after the frontier
    index: np.ndarray       # int64 [n, m], the candidate's index in the caller's table
    size: np.ndarray        # int64 [n], frontier points per linear


def allocate(costs: Sequence[Sequence[int]], errors: Sequence[Sequence[float]], budget: int) -> list[int]:
    """Index of the chosen candidate per linear: least sum of errors with sum of costs <= budget (see `solve`)."""
    return solve(costs, errors, budget).choice


def solve(costs: Sequence[Sequence[int]], errors: Sequence[Sequence[float]], budget: int,
          method: str = "auto") -> Allocation:
    """The allocation of the module docstring. `method`: "auto" (the exact DP when small, else Lagrangian),
    "dp" (always the exact DP: time and memory grow with budget / gcd of the costs) or "lagrangian".

    costs[l][j] are non-negative integers (bits), errors[l][j] finite floats; a real budget is floored.
    Raises InfeasibleBudget (an InputError and a ValueError) naming the minimum achievable budget.
    """
    if method not in ("auto", "dp", "lagrangian"):
        raise ValueError(f"method must be 'auto', 'dp' or 'lagrangian', got {method!r}")
    front = _frontier(costs, errors)
    budget = _floor_budget(budget)
    least = int(front.cost[:, 0].sum())
    if budget < least:
        raise InfeasibleBudget(f"a budget of {budget} bits is below the minimum achievable: {least} bits "
                               "(the cheapest candidate of every linear)")
    pos, bound = None, None
    if method != "lagrangian":
        pos = _exact_dp(front, budget, None if method == "dp" else DP_MAX_WORK)
    if pos is None:
        pos, bound = _lagrangian(front, budget)
    choice = front.index[np.arange(len(pos)), pos].tolist()
    cost, error = achieved(costs, errors, choice)
    return Allocation(choice, cost, error, error if bound is None else bound, bound is None)


def achieved(costs: Sequence[Sequence[int]], errors: Sequence[Sequence[float]],
             choice: Sequence[int]) -> tuple[int, float]:
    """(total cost, summed error) of one candidate per linear; the sum is exactly rounded (math.fsum)."""
    if len(choice) != len(costs) or len(costs) != len(errors):
        raise ValueError(f"{len(choice)} choices for {len(costs)} rows of costs and {len(errors)} rows of errors")
    for layer, j in enumerate(choice):
        if not 0 <= j < len(costs[layer]):
            raise ValueError(f"linear {layer}: choice {j} is not one of its {len(costs[layer])} candidates")
    return (int(sum(int(costs[layer][j]) for layer, j in enumerate(choice))),
            math.fsum(float(errors[layer][j]) for layer, j in enumerate(choice)))


def _floor_budget(budget) -> int:
    """The budget as whole bits: floored, so the total never exceeds the budget the caller meant."""
    if isinstance(budget, bool) or not isinstance(budget, Real) or not math.isfinite(budget):
        raise ValueError(f"budget must be a finite number of bits, got {budget!r}")
    return math.floor(budget)


def _frontier(costs, errors) -> _Frontier:
    """Check the table and keep, per linear, its Pareto frontier (the order is cost, error, index)."""
    if len(costs) != len(errors):
        raise ValueError(f"{len(costs)} rows of costs but {len(errors)} rows of errors")
    rows = []
    for layer, (cost_row, error_row) in enumerate(zip(costs, errors)):
        c, e = np.asarray(cost_row), np.asarray(error_row, dtype=np.float64)
        if c.ndim != 1 or c.shape != e.shape or c.size == 0:
            raise ValueError(f"linear {layer}: costs and errors must be non-empty lists of one length, "
                             f"got shapes {c.shape} and {e.shape}")
        if c.dtype.kind not in "iu" or (c < 0).any():
            raise ValueError(f"linear {layer}: costs must be non-negative integers (bits), got {cost_row!r}")
        if not np.isfinite(e).all():
            raise ValueError(f"linear {layer}: errors must be finite, got {error_row!r}")
        c = c.astype(np.int64)
        order = np.lexsort((np.arange(c.size), e, c))
        # a candidate beaten by a cheaper-or-equal one never helps (MCKP dominance, Sinha & Zoltners 1979)
        kept = np.ones(c.size, dtype=bool)
        kept[1:] = e[order][1:] < np.minimum.accumulate(e[order])[:-1]
        rows.append((c[order][kept], e[order][kept], order[kept]))
    width = max((len(r[0]) for r in rows), default=1)
    front = _Frontier(np.full((len(rows), width), PAD, dtype=np.int64), np.full((len(rows), width), np.inf),
                      np.zeros((len(rows), width), dtype=np.int64), np.array([len(r[0]) for r in rows], np.int64))
    for layer, (c, e, index) in enumerate(rows):
        front.cost[layer, :len(c)], front.error[layer, :len(c)], front.index[layer, :len(c)] = c, e, index
    return front


def _exact_dp(front: _Frontier, budget: int, max_work: int | None) -> np.ndarray | None:
    """Frontier position per linear of an optimal choice, by a DP over the total extra cost in gcd units:
    best[w] = least error of the linears so far with extra cost exactly w units. None if over max_work."""
    # the multiple-choice knapsack recursion over capacities (Dudzinski & Walukiewicz 1987)
    n = len(front.size)
    valid = np.arange(front.cost.shape[1]) < front.size[:, None]
    extra = np.where(valid, front.cost - front.cost[:, :1], 0)
    unit = int(np.gcd.reduce(extra[valid])) or 1
    steps = extra // unit
    width = min((budget - int(front.cost[:, 0].sum())) // unit, int(steps.max(axis=1).sum())) + 1
    if max_work is not None and int(front.size.sum()) * width > max_work:
        return None
    best = np.full(width, np.inf)
    best[0] = 0.0
    pick = np.zeros((n, width), dtype=np.min_scalar_type(front.cost.shape[1]))
    for layer in range(n):
        new = np.full(width, np.inf)
        for p in range(front.size[layer]):
            s = steps[layer, p]
            if s >= width:
                break
            candidate = best[:width - s] + front.error[layer, p]
            better = candidate < new[s:]        # strict: among equal errors the cheaper point stays
            new[s:][better] = candidate[better]
            pick[layer, s:][better] = p
        best = new
    w = int(np.argmin(best))                    # the first minimum: the cheapest optimal total
    pos = np.zeros(n, dtype=np.int64)
    for layer in reversed(range(n)):
        pos[layer] = pick[layer, w]
        w -= steps[layer, pos[layer]]
    return pos


def _hull(cost: list[int], error: list[float]) -> list[int]:
    """Positions on the lower convex hull of one frontier, cheapest first; collinear points stay."""
    hull: list[int] = []
    for p in range(len(cost)):
        while len(hull) >= 2 and ((error[hull[-1]] - error[hull[-2]]) * (cost[p] - cost[hull[-2]])
                                  > (error[p] - error[hull[-2]]) * (cost[hull[-1]] - cost[hull[-2]])):
            hull.pop()
        hull.append(p)
    return hull


def _greedy(front: _Frontier, budget: int) -> tuple[np.ndarray, float]:
    """A feasible choice (frontier positions) and the Lagrange multiplier lambda of the LP relaxation."""
    # Lagrangian allocation over each quantizer's lower convex hull: Shoham & Gersho 1988; the equal
    # slope lambda at the optimum is BAQ's equal-loss condition, taken per linear over measured points
    steps = []
    for layer in range(len(front.size)):
        cost, error = front.cost[layer].tolist(), front.error[layer].tolist()
        hull = _hull(cost[:front.size[layer]], error[:front.size[layer]])
        for a, b in itertools.pairwise(hull):
            steps.append(((error[b] - error[a]) / (cost[b] - cost[a]), layer, a, b, cost[b] - cost[a]))
    pos = np.zeros(len(front.size), dtype=np.int64)
    left = budget - int(front.cost[:, 0].sum())
    lam = None
    for slope, layer, a, b, extra in sorted(steps):      # steepest error drop per bit first
        if pos[layer] != a:
            continue
        if extra <= left:
            pos[layer], left = b, left - extra
        elif lam is None:
            lam = -slope                                  # the LP relaxation's one fractional step
    return _fill(front, pos, left), 0.0 if lam is None else lam


def _fill(front: _Frontier, pos: np.ndarray, left: int) -> np.ndarray:
    """Spend the leftover budget: the upgrade with the largest error drop per extra bit, until none fits."""
    rows = np.arange(len(pos))
    while True:
        extra = front.cost - front.cost[rows, pos][:, None]
        fits = (extra > 0) & (extra <= left)
        if not fits.any():
            return pos
        rate = np.where(fits, (front.error[rows, pos][:, None] - front.error) / np.where(fits, extra, 1), -np.inf)
        layer, p = np.unravel_index(np.argmax(rate), rate.shape)   # ties: first linear, cheapest point
        pos[layer], left = p, left - int(extra[layer, p])


def _lagrangian(front: _Frontier, budget: int) -> tuple[np.ndarray, float | None]:
    """Frontier positions of an optimal choice and None, or of the greedy choice and the Lagrangian bound
    when the search would build more than MAX_WORK partial states."""
    greedy, lam = _greedy(front, budget)
    n = len(front.size)
    score = front.error + lam * np.where(np.isfinite(front.error), front.cost, 0)
    least = score.min(axis=1)
    reduced = score - least[:, None]            # >= 0; +inf after the frontier
    # for every choice x within the budget: error(x) = bound + sum_l reduced[l, x_l] + lam * (budget - cost(x))
    bound = math.fsum(least) - lam * budget
    upper = math.fsum(front.error[np.arange(n), greedy])
    slack = (max(upper - bound, float(reduced[np.arange(n), greedy].sum()))
             + 1e-9 * (math.fsum(np.abs(least)) + lam * budget + abs(upper)))
    # the optimum is within slack of the bound (the greedy choice is); look within slack/16 first and
    # widen: the first search that finds a choice has found the optimum
    allowance = MAX_WORK
    try:
        for limit in (slack / 16, slack / 4, slack):
            pos, work = _search(front, budget, reduced, lam, limit, allowance)
            if pos is not None:
                return pos, None
            allowance -= work
    except _OutOfWork:
        pass
    return greedy, bound


class _OutOfWork(Exception):
    """The search would build more partial states than it is allowed."""


def _search(front: _Frontier, budget: int, reduced: np.ndarray, lam: float, limit: float,
            allowance: int) -> tuple[np.ndarray | None, int]:
    """Frontier positions of the least-error choice among those with error <= bound + limit (or None), and
    the number of partial states built; raises _OutOfWork past `allowance` of them."""
    # error(x) - bound = sum_l reduced[l, x_l] + lam * (unspent bits) >= 0 term by term, so such a choice uses
    # only points of reduced cost <= limit (reduced-cost fixing), and partial sums over limit are cut; the
    # search keeps Pareto-optimal partial (cost, error) sums (Nemhauser & Ullmann 1969), as the core
    # algorithms for this knapsack do (Pisinger 1995)
    free = reduced <= limit
    least_rest = _after(np.where(free, front.cost, PAD).min(axis=1))
    most_rest = _after(np.where(free, front.cost, 0).max(axis=1))
    cost, error, red = np.zeros(1, dtype=np.int64), np.zeros(1), np.zeros(1)
    trail, work = [], 0
    for layer in range(len(front.size)):
        points = np.flatnonzero(free[layer])
        work += len(cost) * len(points)
        if work > allowance:
            raise _OutOfWork
        parent = np.repeat(np.arange(len(cost)), len(points))
        p = np.tile(points, len(cost))
        cost, error = cost[parent] + front.cost[layer, p], error[parent] + front.error[layer, p]
        red = red[parent] + reduced[layer, p]
        unspent = np.maximum(budget - cost - most_rest[layer], 0)   # bits no completion can spend
        order = np.flatnonzero((cost + least_rest[layer] <= budget) & (red + lam * unspent <= limit))
        order = order[np.lexsort((error[order], cost[order]))]
        kept = np.ones(len(order), dtype=bool)
        kept[1:] = error[order][1:] < np.minimum.accumulate(error[order])[:-1]
        order = order[kept]
        if len(order) == 0:
            return None, work
        cost, error, red = cost[order], error[order], red[order]
        trail.append((parent[order], p[order]))
    pos = np.zeros(len(front.size), dtype=np.int64)
    k = len(cost) - 1                           # Pareto order: the costliest state has the least error
    for layer in reversed(range(len(front.size))):
        parent, p = trail[layer]
        pos[layer], k = p[k], parent[k]
    return pos, work


def _after(per_layer: np.ndarray) -> np.ndarray:
    """For each linear l, the sum of per_layer over the linears after l."""
    return np.concatenate([np.cumsum(per_layer[::-1])[::-1][1:], [0]]).astype(np.int64)

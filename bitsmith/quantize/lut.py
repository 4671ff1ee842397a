"""Non-uniform quantization with a lookup table per output row (SqueezeLLM, Kim et al. 2023, section 3).

Each row o keeps 2^bits centroids c_o (fp16) and every weight stores the index of one of them: W_oj = c_o[q_oj].
The centroids are the weighted k-means of the row's weights, the weight of w_oj being its sensitivity. SqueezeLLM
takes the diagonal Fisher of the weights, F_oj = mean_t (dL/dy_o)^2 x_tj^2; under the factorisation the
measurement already uses (calibration/fisher.py) that is F_o times H_jj / 2, and a factor shared by a whole
row does not move its centroids, so the sensitivity of w_oj is the Hessian diagonal H_jj (H = 2 X X^T / n).

The codes are then chosen by GPTQ's loop (quantize/gptq.py) with the table as its column quantizer: each column
rounds to the nearest centroid of its row and the error is compensated in the columns after it, which SqueezeLLM
itself does not do (it rounds to nearest). The table is fitted once on the unquantized row, before the loop.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .gptq import gptq_loop, prepare

KMEANS_ITERS = 25          # Lloyd steps; the assignments of a 1-D weighted k-means settle within ~10 on LLM rows


@dataclass
class LutWeight:
    """A quantized [out, in] matrix as codes into per-row tables; `Q` is exactly what the checkpoint holds."""
    codes: torch.Tensor            # uint8 [out, in]
    lut: torch.Tensor              # fp16 [out, 2^bits], ascending in every row
    bits: int
    Q: torch.Tensor                # float32 [out, in] = lut[o, codes[o, j]]
    loss: float = 0.0              # GPTQ's sum of (w-q)^2 / [H^-1]_jj^2 / 2
    group_size: int = -1           # one table per row: what reports print for a grid's groups
    sym: bool = False


def weighted_kmeans(W: torch.Tensor, weight: torch.Tensor, k: int, iters: int = KMEANS_ITERS) -> torch.Tensor:
    """Centroids [rows, k], ascending, of every row of W [rows, n] under the sensitivities `weight` [n] (or
    [rows, n]), minimising sum_j weight_j (w_j - c(w_j))^2: Lloyd's algorithm (`lloyd`) from each of `starts`,
    every row keeping the centroids of least error among them (restarts, as k-means implementations do: one start
    settles in a local minimum; scikit-learn's n_init). The equal-mass quantiles alone leave the tails short of
    levels: on SmolLM2's linears, under their Hessian diagonals, the best of the four starts cuts GPTQ's loss with
    the tables by 10-30 % at 3 bits (3-6 % on down_proj), 21-39 % at 4 bits and 10-17 % at 2 bits on q/k/v
    (bench/results/lut-starts.md)."""
    W = W.to(torch.float32)
    weight = torch.broadcast_to(weight.to(torch.float32).clamp(min=0), W.shape) + 1e-12   # no empty-mass rows
    order = torch.argsort(W, dim=1)
    sorted_w, sorted_m = W.gather(1, order), weight.gather(1, order)
    best, least = None, None
    for start in starts(sorted_w, sorted_m, k):
        centroids = lloyd(W, weight, sorted_w, order, start, iters)
        error = (weight * (W - centroids.gather(1, _nearest_in_sorted(sorted_w, order, centroids))) ** 2).sum(dim=1)
        if best is None:
            best, least = centroids, error
        else:
            better = error < least
            best, least = torch.where(better[:, None], centroids, best), torch.minimum(error, least)
    return best


QUANTILE_EXPONENTS = (1.0, 0.7, 0.5)   # p of the quantile starts: 1 is equal mass, less spreads toward the tails


def starts(sorted_w: torch.Tensor, sorted_m: torch.Tensor, k: int) -> list[torch.Tensor]:
    """Starting centroids [rows, k] for Lloyd's steps, from every row's ascending weights and their sensitivities:
    the weighted quantiles 1/2 + sign(u - 1/2) |2u - 1|^p / 2 of u = (i + 1/2) / k for each p of
    `QUANTILE_EXPONENTS` (p = 1 the k bins of equal sensitivity mass; p < 1 toward the tails, where the levels of a
    least-squares quantizer of a bell-shaped density lie), and k levels evenly over the row's range."""
    mass = torch.cumsum(sorted_m, dim=1)
    u = (torch.arange(k, dtype=torch.float32) + 0.5) / k
    found = []
    for p in QUANTILE_EXPONENTS:
        v = 0.5 + torch.sign(u - 0.5) * (2 * u - 1).abs() ** p / 2
        at = torch.searchsorted(mass, v * mass[:, -1:]).clamp(max=sorted_w.shape[1] - 1)
        found.append(sorted_w.gather(1, at))
    low, high = sorted_w[:, :1], sorted_w[:, -1:]
    found.append(low + (high - low) * u)
    return found


def lloyd(W: torch.Tensor, weight: torch.Tensor, sorted_w: torch.Tensor, order: torch.Tensor,
          centroids: torch.Tensor, iters: int) -> torch.Tensor:
    """Lloyd's steps (one dimension: each assignment a search among the midpoints) from `centroids` [rows, k], at
    most `iters` of them; a centroid left without weights (a duplicate of the start, or one that lost them all)
    moves onto the row's weight of largest weighted error, one per row and step, so no level is wasted."""
    rows = torch.arange(W.shape[0])
    centroids = torch.sort(centroids, dim=1).values
    for _ in range(iters):
        codes = _nearest_in_sorted(sorted_w, order, centroids)
        total = torch.zeros_like(centroids).scatter_add_(1, codes, weight * W)
        count = torch.zeros_like(centroids).scatter_add_(1, codes, weight)
        moved = torch.where(count > 0, total / count.clamp(min=1e-30), centroids)
        empty = torch.zeros_like(count).scatter_add_(1, codes, torch.ones_like(W)) == 0
        if empty.any():
            worst = (weight * (W - centroids.gather(1, codes)) ** 2).argmax(dim=1)
            reseed = empty.any(dim=1)
            first = empty.float().argmax(dim=1)
            moved[rows[reseed], first[reseed]] = W[rows[reseed], worst[reseed]]
        moved = torch.sort(moved, dim=1).values
        if torch.equal(moved, centroids):
            break
        centroids = moved
    return centroids


def nearest(w: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index (int64) of the nearest of each row's ascending centroids [rows, k] for w [rows, n] (or [rows]),
    ties to the lower one."""
    mid = (centroids[:, 1:] + centroids[:, :-1]) / 2
    if w.dim() == 1:              # one column: counting the midpoints below w is searchsorted's answer, at less cost
        return (mid < w[:, None]).sum(dim=1)
    return torch.searchsorted(mid.contiguous(), w.contiguous(), right=False)


def _nearest_in_sorted(sorted_w: torch.Tensor, order: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """`nearest(W, centroids)` from W's rows sorted (sorted_w = W.gather(1, order)): each midpoint is searched
    among the row's weights instead of each weight among the midpoints. The weights above midpoint i are those
    from position p_i on, p_i = how many are <= it; so a sorted weight's code is the number of p_i at or
    before its position (a cumulative count), put back in W's order."""
    mid = (centroids[:, 1:] + centroids[:, :-1]) / 2
    p = torch.searchsorted(sorted_w, mid.contiguous(), right=True)
    steps = torch.zeros(sorted_w.shape[0], sorted_w.shape[1] + 1, dtype=torch.int64).scatter_add_(
        1, p, torch.ones_like(p))
    codes = steps.cumsum(dim=1)[:, :-1]
    return torch.empty_like(codes).scatter_(1, order, codes)


class ColumnLUT:
    """GPTQ's column quantizer for tables: every row rounds to the nearest of its own centroids (`gptq_loop`
    calls `round` on each permuted column)."""

    kept = None                                   # no outliers in this layout

    def __init__(self, lut: torch.Tensor):
        self.lut = lut.to(torch.float32)          # the stored (fp16) values: the loop sees what the file holds

    def round(self, col: int, W: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        q = nearest(w, self.lut)
        return q.to(torch.uint8), self.lut.gather(1, q[:, None])[:, 0], None


def lut_tables(W: torch.Tensor, H: torch.Tensor, bits: int) -> torch.Tensor:
    """The fp16 tables [out, 2^bits] of W [out, in], fitted with H's diagonal as the sensitivities."""
    return weighted_kmeans(W, torch.diag(H), 1 << bits).to(torch.float16)


def gptq_lut(W: torch.Tensor, H: torch.Tensor, bits: int, act_order: bool = False, damp: float = 0.01,
             blocksize: int = 128) -> LutWeight:
    """W [out, in] as codes into per-row tables of 2^bits centroids, chosen by GPTQ given H = 2 X X^T / n."""
    (qw,), _ = gptq_lut_configs(W, H, [bits], act_order, damp, blocksize)
    return qw


def gptq_lut_configs(W: torch.Tensor, H: torch.Tensor, bits: list[int], act_order: bool = False,
                     damp: float = 0.01, blocksize: int = 128,
                     keep: bool = True) -> tuple[list[LutWeight], torch.Tensor]:
    """GPTQ with tables of each bit width in `bits` at once (their rows stacked, as `gptq_configs` stacks its
    grids); returns the weights (empty unless `keep`) and every row's loss, [len(bits), out]."""
    rows = W.shape[0]
    W, H, perm, Hinv = prepare(W, H, act_order, damp)
    tables = [lut_tables(W, H, b) for b in bits]
    stack = torch.cat([_pad(t, 1 << max(bits)) for t in tables])
    work = W[:, perm].repeat(len(bits), 1)
    codes = torch.zeros(work.shape, dtype=torch.uint8) if keep else None
    losses = gptq_loop(work, Hinv, ColumnLUT(stack), blocksize, codes).reshape(len(bits), rows)
    if not keep:
        return [], losses
    inv = torch.argsort(perm)
    out = []
    for c, (b, table) in enumerate(zip(bits, tables)):
        own = codes[c * rows:(c + 1) * rows][:, inv]
        Q = table.float().gather(1, own.long())
        out.append(LutWeight(own, table, b, Q, float(losses[c].sum())))
    return out, losses


def _pad(table: torch.Tensor, k: int) -> torch.Tensor:
    """A table widened to k entries with +inf (a midpoint past the last real centroid is +inf, so no weight is
    ever coded past the table's own 2^bits entries)."""
    return torch.cat([table.float(), torch.full((table.shape[0], k - table.shape[1]), float("inf"))], dim=1)

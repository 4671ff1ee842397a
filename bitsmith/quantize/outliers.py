"""Dense-and-sparse weights: a few weights per row kept exactly in fp16 next to the quantized grid.

SpQR (Dettmers et al. 2023, section 4, Algorithm 1) keeps inside GPTQ's column loop the weights whose GPTQ loss
(w - q)^2 / [H^-1]_jj^2 is largest in fp16, fits each grid without them, and quantizes the rest; SqueezeLLM
(Kim et al. 2023) calls the split dense-and-sparse. SpQR selects by a loss threshold; here every row keeps a fixed
count, round(fraction * in_features), so a configuration's bytes are known before it is quantized.

The dense codes at an outlier position are the grid's zero point, which dequantizes to exactly 0: the matrix is
the dequantized codes with the outliers written over them, or equally the two added.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .rtn import QuantizedWeight


def outlier_count(fraction: float, in_features: int) -> int:
    """Outliers kept per row: round(fraction * in_features), halves rounded up."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"outlier fraction {fraction} is not in [0, 1)")
    return min(in_features, math.floor(fraction * in_features + 0.5))


def top_per_row(score: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Mask of the k[r] largest scores of each row r of score [rows, n]; ties go to the lower column."""
    order = torch.sort(score, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(score.shape[1]).expand_as(order))
    return rank < k[:, None]


def narrowest_range(x: torch.Tensor, s: torch.Tensor, sym: torch.Tensor) -> torch.Tensor:
    """Mask of the s[r] weights of each row of x [rows, n] whose removal narrows its min-max grid the most.

    A min-max grid depends on the row's range only, so the candidates are the a largest and s - a smallest
    weights; a is chosen per row to minimise max(x, 0) - min(x, 0) (asymmetric) or max(|x|) (symmetric) of what
    remains. Needs 2 s < n so that the two ends never meet."""
    rows, n = x.shape
    top = int(s.max()) if rows else 0
    if top == 0:
        return torch.zeros_like(x, dtype=torch.bool)
    if 2 * top >= n:
        raise ValueError(f"cannot leave out {top} of {n} weights per row")
    value, order = torch.sort(x, dim=1, stable=True)
    a = torch.arange(top + 1)
    hi = value[:, n - 1 - a].clamp(min=0)                                    # largest left after removing a from top
    lo = value.gather(1, (s[:, None] - a).clamp(min=0)).clamp(max=0)         # smallest left after s - a from bottom
    width = torch.where(sym[:, None], torch.maximum(hi, -lo), hi - lo)
    width = width.masked_fill(a > s[:, None], float("inf"))
    best = width.argmin(dim=1, keepdim=True)                                 # first minimum: deterministic
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(n).expand_as(order))
    return (rank < s[:, None] - best) | (rank >= n - best)


@dataclass
class Outliers:
    """The sparse part of an [out, in] matrix with k weights per row: columns (ascending, original order) and
    their fp16 values."""
    cols: torch.Tensor         # int64 [out, k]
    values: torch.Tensor       # fp16 [out, k]

    @classmethod
    def from_mask(cls, mask: torch.Tensor, values: torch.Tensor) -> Outliers:
        """From a mask [out, in] with the same count in every row and dense values [out, in]."""
        k = int(mask[0].sum()) if mask.shape[0] else 0
        rows = mask.shape[0]
        return cls(mask.nonzero()[:, 1].reshape(rows, k), values[mask].to(torch.float16).reshape(rows, k))

    def mask(self, in_features: int) -> torch.Tensor:
        return torch.zeros(self.cols.shape[0], in_features, dtype=torch.bool).scatter_(1, self.cols, True)

    def dense(self, in_features: int) -> torch.Tensor:
        """The values at their positions, zero elsewhere: fp16 [out, in]."""
        return torch.zeros(self.cols.shape[0], in_features, dtype=torch.float16).scatter_(1, self.cols, self.values)

    def overwrite(self, Q: torch.Tensor) -> torch.Tensor:
        """Q [out, in] with the outlier positions replaced by their values."""
        return Q.scatter(1, self.cols, self.values.to(Q.dtype))


@dataclass
class DenseSparseWeight(QuantizedWeight):
    """A `QuantizedWeight` whose codes at the outlier positions are zero points and whose Q holds the outliers."""
    outliers: Outliers | None = None

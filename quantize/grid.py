"""Uniform integer grids: fitting (scale, zero) per row, rounding onto them, and what they dequantize to.

The grid is GPTQ's `Quantizer` (Frantar et al. 2022, code `quant.py`): asymmetric min-max with the range
forced to contain 0, integer zero point round(-xmin/scale); symmetric: zero = (maxq+1)/2. Scales are
rounded to fp16 *before* quantizing, so the codes are fitted to the grid that is actually stored.

Bits and symmetry may differ from row to row (`RowGrid`): one call then fits a stack of candidate
configurations of the same matrix at once, which is how a measurement tries every configuration.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

FP16_TINY = 2.0**-24   # smallest positive fp16: a scale may not round to zero
SHRINK_STEPS, MAX_SHRINK, ERROR_NORM = 100, 0.8, 2.4     # GPTQ code quant.py: grid, maxshrink, norm
SEARCH_ELEMENTS = 1 << 18                                 # candidate codes a shrink search holds at once


@dataclass(frozen=True)
class RowGrid:
    """Bits and symmetry of each row: ints/bools for all rows alike, or tensors [rows]."""
    bits: int | torch.Tensor
    sym: bool | torch.Tensor

    def maxq(self, like: torch.Tensor) -> torch.Tensor:
        """2**bits - 1, as a float tensor broadcastable against per-row vectors like `like`."""
        return (2 ** torch.as_tensor(self.bits, dtype=torch.float32) - 1).expand_as(like)

    def symmetric(self, like: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(self.sym, dtype=torch.bool).expand_as(like)

    def rows(self, index) -> RowGrid:
        """The grid of a subset of rows."""
        pick = lambda v: v[index] if isinstance(v, torch.Tensor) else v
        return RowGrid(pick(self.bits), pick(self.sym))


def fit_grid(x: torch.Tensor, bits: int | RowGrid, sym: bool = False, mse: bool = False,
             shrink_every: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (scale fp16, zero int32) of the min-max grid covering the rows of x [rows, n]; with `mse`,
    the range shrunk by the factor that minimizes each row's quantization error (`shrink_search`, trying
    every `shrink_every`-th factor)."""
    grid = bits if isinstance(bits, RowGrid) else RowGrid(bits, sym)
    x = x.to(torch.float32)
    xmin = x.min(dim=1).values.clamp(max=0)
    xmax = x.max(dim=1).values.clamp(min=0)
    symmetric = grid.symmetric(xmin)
    peak = torch.maximum(xmin.abs(), xmax)
    xmax = torch.where(symmetric, peak, xmax)
    xmin = torch.where(symmetric & (xmin < 0), -peak, xmin)
    flat = (xmin == 0) & (xmax == 0)
    xmin, xmax = torch.where(flat, -1.0, xmin), torch.where(flat, 1.0, xmax)
    if not mse:
        return _grid(xmin, xmax, grid)
    return shrink_search(x, xmin, xmax, grid, shrink_every)


def _grid(xmin: torch.Tensor, xmax: torch.Tensor, grid: RowGrid) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp16 scale, integer zero) of the grid of 2^bits points spanning [xmin, xmax] per row."""
    maxq = grid.maxq(xmin)
    scale = ((xmax - xmin) / maxq).to(torch.float16)
    if torch.isinf(scale).any():
        raise ValueError("weight magnitude overflows an fp16 scale")
    scale = torch.where(scale == 0, torch.tensor(FP16_TINY, dtype=torch.float16), scale)
    asym = torch.round(-xmin / scale.float()).clamp(min=0).minimum(maxq)
    zero = torch.where(grid.symmetric(xmin), torch.div(maxq + 1, 2, rounding_mode="floor"), asym)
    return scale, zero.to(torch.int32)


def shrink_search(x: torch.Tensor, xmin: torch.Tensor, xmax: torch.Tensor, grid: RowGrid, every: int = 1):
    """The grid of [p xmin, p xmax], p = 1 - i/100 for i < 80, with the least sum |x - q(x)|^2.4 per row
    (GPTQ code quant.py, `Quantizer(mse=True)`); the error is measured on the stored fp16-scale grid. The
    factors are tried SEARCH_ELEMENTS codes at a time; ties go to the larger range, as in the GPTQ loop."""
    factors = torch.tensor([1 - i / SHRINK_STEPS for i in range(0, int(MAX_SHRINK * SHRINK_STEPS), every)])
    best_scale, best_zero = _grid(xmin, xmax, grid)
    best = torch.full_like(xmin, float("inf"))
    maxq = grid.maxq(xmin)[:, None]
    rows = torch.arange(xmin.numel())
    step = max(1, SEARCH_ELEMENTS // max(x.numel(), 1))
    for start in range(0, len(factors), step):
        p = factors[start:start + step, None]                                   # [P, 1]
        scale, zero = _grid(p * xmin, p * xmax, grid)                           # [P, rows]
        q = quantize_codes(x, scale[..., None], zero[..., None], maxq)          # [P, rows, n]
        err = ((q.float() - zero[..., None]) * scale.float()[..., None] - x).abs_().pow_(ERROR_NORM).sum(dim=-1)
        first = err.argmin(dim=0)                                               # first least error of the batch
        least = err[first, rows]
        better = least < best
        best = torch.where(better, least, best)
        best_scale = torch.where(better, scale[first, rows], best_scale)
        best_zero = torch.where(better, zero[first, rows], best_zero)
    return best_scale, best_zero


def quantize_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                   bits: int | torch.Tensor) -> torch.Tensor:
    """q = clamp(round(x / scale) + zero, 0, maxq), broadcasting scale/zero over the last dim of x. `bits` is
    a bit width, or (a tensor) maxq itself, per row."""
    maxq = bits if isinstance(bits, torch.Tensor) else torch.tensor(2.0**bits - 1)
    return torch.minimum(torch.round(x / scale.float()).add_(zero).clamp_(min=0), maxq).to(torch.uint8)


def fake_quantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """What stored codes dequantize to: scale * (q - zero) in float32."""
    return scale.to(torch.float32) * (q.to(torch.float32) - zero.to(torch.float32))


def group_index(in_features: int, group_size: int) -> torch.Tensor:
    """g_idx of contiguous groups: input channel i belongs to group i // group_size (-1 = one group)."""
    g = in_features if group_size == -1 else group_size
    return torch.arange(in_features, dtype=torch.int32) // g


def check_finite(W: torch.Tensor) -> None:
    if not torch.isfinite(W).all():
        bad = (~torch.isfinite(W)).sum().item()
        raise ValueError(f"weight has {bad} NaN/Inf values")

"""Uniform integer grids: fitting (scale, zero) per row, rounding onto them, and what they dequantize to.

The grid is GPTQ's `Quantizer` (Frantar et al. 2022, code `quant.py`): asymmetric min-max with the range
forced to contain 0, integer zero point round(-xmin/scale); symmetric: zero = (maxq+1)/2. Scales are
rounded to fp16 *before* quantizing, so the codes are fitted to the grid that is actually stored.

An asymmetric zero point is never 0 (`ZERO_MIN`): GPTQ checkpoints (v1) store zero - 1 in `bits` bits, and a true
0 is then stored as maxq, which readers take three ways: bitsmith and GPTQModel's own dequantizers as 0 (mod
2^bits), vLLM's gptq_gemm as maxq + 1 (stored + 1, no wrap), GPTQModel's v1 -> v2 conversion as a carry into
the next channel's zero (it adds 0x11111111 to each packed word at 4 bits). With zeros in [1, maxq] every reader
sees the same numbers. A row whose grid would put its zero at 0 (its minimum within half a step of 0: mostly
rows with no negative weight) keeps its zero at 1 instead and gets one grid point below 0 (`_grid`).

Bits and symmetry may differ from row to row (`RowGrid`): one call then fits a stack of candidate
configurations of the same matrix at once, which is how a measurement tries every configuration.

Double-quantized scales (the group scales of QLoRA's double quantization, Dettmers et al. 2023, and of llama.cpp's
K-quants): a row with a `unit` u > 0 takes only the scales fp16(c u), c = 1..SCALE_CODES, so that its groups store an
8-bit c each and the row one fp16 u (`scale_unit`: the row's whole range over (maxq - 1) SCALE_CODES, so that every
group's min-max scale, a raised zero's too, has a code). The grids are fitted on that lattice, like the fp16
rounding above, so the codes fit the scales that are stored.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

FP16_TINY = 2.0**-24   # smallest positive fp16: a scale may not round to zero
SHRINK_STEPS, MAX_SHRINK, ERROR_NORM = 100, 0.8, 2.4     # GPTQ code quant.py: grid, maxshrink, norm
SEARCH_ELEMENTS = 1 << 18                                 # candidate codes a shrink search holds at once
SCALE_CODES = 255           # codes 1..255 of a double-quantized scale (uint8; 0 would be no scale)
ZERO_MIN = 1                # least asymmetric zero point: zero - 1 is stored (GPTQ v1) and must not wrap
RAISE_STEPS = 8             # grids tried between rescaling and shifting a row whose zero is raised to 1


@dataclass(frozen=True)
class RowGrid:
    """Bits and symmetry of each row: ints/bools for all rows alike, or tensors [rows]; `unit` [rows], where given,
    the unit of each row's double-quantized scales (0: an fp16 scale)."""
    bits: int | torch.Tensor
    sym: bool | torch.Tensor
    unit: torch.Tensor | None = None

    def maxq(self, like: torch.Tensor) -> torch.Tensor:
        """2**bits - 1, as a float tensor broadcastable against per-row vectors like `like`."""
        return (2 ** torch.as_tensor(self.bits, dtype=torch.float32) - 1).expand_as(like)

    def symmetric(self, like: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(self.sym, dtype=torch.bool).expand_as(like)

    def rows(self, index) -> RowGrid:
        """The grid of a subset of rows."""
        pick = lambda v: v[index] if isinstance(v, torch.Tensor) else v
        return RowGrid(pick(self.bits), pick(self.sym), pick(self.unit))


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
    if mse:
        return shrink_search(x, xmin, xmax, grid, shrink_every)      # every candidate keeps its zero >= 1
    scale, zero = _grid(xmin, xmax, grid)
    raised = _zero_raised(xmin, xmax, grid).nonzero().squeeze(1)
    if raised.numel():
        # A row whose zero is raised to 1 can keep its whole range on a coarser grid (`_grid`: step
        # xmax / (maxq - 1), maxq / (maxq - 1) times the min-max step) or keep the min-max step and clip its
        # top step to the grid's top, (maxq - 1) * step (a shift by one step); which costs less depends on how
        # many weights sit in the top step. Both, and RAISE_STEPS - 1 grids between them (the range's top
        # scaled by p from 1 down to 1 - 1/maxq), are tried, and the one with the least error in the shrink
        # search's norm is kept; ties go to the larger range.
        maxq = grid.maxq(xmin)[raised]
        factors = 1 - torch.linspace(0, 1, RAISE_STEPS + 1)[:, None] / maxq                      # [P, rows]
        scale[raised], zero[raised] = shrink_search(x[raised], xmin[raised], xmax[raised], grid.rows(raised),
                                                    factors=factors)
    return scale, zero


def _fp16_scale(scale: torch.Tensor, check: bool = True) -> torch.Tensor:
    """The scale as stored: fp16, never 0 (`check`: refused when it overflows fp16)."""
    scale = scale.to(torch.float16)
    if check and torch.isinf(scale).any():
        raise ValueError("weight magnitude overflows an fp16 scale")
    return torch.where(scale == 0, _FP16_TINY, scale)


_FP16_TINY = torch.tensor(FP16_TINY, dtype=torch.float16)


def _stored_scale(scale: torch.Tensor, grid: RowGrid, check: bool = True) -> torch.Tensor:
    """The scale as stored: fp16 (`_fp16_scale`), or on a row's lattice fp16(c u) where it has a unit u > 0."""
    if grid.unit is None:
        return _fp16_scale(scale, check)
    unit = grid.unit.float()
    codes = torch.round(scale / unit.clamp(min=FP16_TINY)).clamp_(1, SCALE_CODES)
    return torch.where(unit > 0, _fp16_scale(codes * unit, check), _fp16_scale(scale, check))


def scale_unit(W: torch.Tensor, bits: int) -> torch.Tensor:
    """fp16 [rows]: the unit u of each row's double-quantized scales, its range (0 included) over (maxq - 1)
    SCALE_CODES rounded up to an fp16 (so that SCALE_CODES u still covers the range where u is subnormal), never
    0."""
    maxq = 2 ** bits - 1
    span = W.amax(dim=1).clamp(min=0) - W.amin(dim=1).clamp(max=0)
    exact = (span / (max(maxq - 1, 1) * SCALE_CODES)).clamp(min=FP16_TINY)
    unit = exact.to(torch.float16)
    up = torch.nextafter(unit, torch.tensor(float("inf"), dtype=torch.float16))
    return torch.where(unit.float() < exact, up, unit)


def scale_codes(scales: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """uint8 [G, rows]: the code c of each double-quantized scale fp16(c u) (scales [G, rows], unit [rows])."""
    codes = torch.round(scales.float() / unit.float())
    if codes.numel() and not (1 <= float(codes.min()) and float(codes.max()) <= SCALE_CODES
                              and torch.equal(coded_scales(codes, unit), scales.to(torch.float16))):
        raise ValueError("a scale is off its row's double-quantized lattice")
    return codes.to(torch.uint8)


def coded_scales(codes: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """fp16 [G, rows]: the scales fp16(c u) that codes [G, rows] and units [rows] stand for."""
    return (codes.float() * unit.float()).to(torch.float16)


def _zero_raised(xmin: torch.Tensor, xmax: torch.Tensor, grid: RowGrid) -> torch.Tensor:
    """Rows whose min-max grid over [xmin, xmax] would have an asymmetric zero point below ZERO_MIN."""
    scale = _stored_scale((xmax - xmin) / grid.maxq(xmin), grid)
    return ~grid.symmetric(xmin) & (torch.round(-xmin / scale.float()) < ZERO_MIN)


def _grid(xmin: torch.Tensor, xmax: torch.Tensor, grid: RowGrid, maxq: torch.Tensor | None = None,
          symmetric: torch.Tensor | None = None, check: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp16 scale, integer zero) of the grid of 2^bits points spanning [xmin, xmax] per row. An asymmetric row
    whose zero would round to 0 spans [-xmax / (maxq - 1), xmax] instead (it still holds xmin, which is within
    half a step of 0), so that its zero is 1: the same number of points, one below 0. `maxq` and `symmetric`
    (per row) may be given, computed once for many calls."""
    maxq = grid.maxq(xmin) if maxq is None else maxq
    symmetric = grid.symmetric(xmin) if symmetric is None else symmetric
    scale = _stored_scale((xmax - xmin) / maxq, grid, check)
    raised = ~symmetric & (torch.round(-xmin / scale.float()) < ZERO_MIN)          # `_zero_raised`
    if raised.any():
        xmin = torch.where(raised, torch.minimum(xmin, -xmax / (maxq - 1)), xmin)
        scale = _stored_scale((xmax - xmin) / maxq, grid, check)
    asym = torch.round(-xmin / scale.float()).clamp(min=ZERO_MIN).minimum(maxq)
    zero = torch.where(symmetric, torch.div(maxq + 1, 2, rounding_mode="floor"), asym)
    return scale, zero.to(torch.int32)


def shrink_search(x: torch.Tensor, xmin: torch.Tensor, xmax: torch.Tensor, grid: RowGrid, every: int = 1,
                  factors: torch.Tensor | None = None):
    """The grid of [p xmin, p xmax], p = 1 - i/100 for i < 80, with the least sum |x - q(x)|^2.4 per row
    (GPTQ code quant.py, `Quantizer(mse=True)`); the error is measured on the stored fp16-scale grid. The
    factors are tried SEARCH_ELEMENTS codes at a time; ties go to the larger range, as in the GPTQ loop.
    `factors` ([P], or [P, rows]: each row its own) replaces the p tried."""
    if factors is None:
        factors = torch.tensor([1 - i / SHRINK_STEPS for i in range(0, int(MAX_SHRINK * SHRINK_STEPS), every)])
    factors = factors if factors.dim() == 2 else factors[:, None]
    row_maxq, symmetric = grid.maxq(xmin), grid.symmetric(xmin)
    best_scale, best_zero = _grid(xmin, xmax, grid, row_maxq, symmetric)     # checked: the widest range
    best = torch.full_like(xmin, float("inf"))
    maxq = row_maxq[:, None]
    rows = torch.arange(xmin.numel())
    step = max(1, SEARCH_ELEMENTS // max(x.numel(), 1))
    for start in range(0, len(factors), step):
        p = factors[start:start + step]                                         # [P, 1] or [P, rows]
        scale, zero = _grid(p * xmin, p * xmax, grid, row_maxq, symmetric, check=False)     # [P, rows]
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
    return grid_points(x, scale.float(), zero, maxq).to(torch.uint8)


def grid_points(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: torch.Tensor) -> torch.Tensor:
    """clamp(round(x / scale) + zero, 0, maxq) in float32 (scale float32): the codes, before their cast."""
    return torch.minimum(torch.round(x / scale).add_(zero).clamp_(min=0), maxq)


def fake_quantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """What stored codes dequantize to: scale * (q - zero) in float32."""
    return scale.to(torch.float32) * (q.to(torch.float32) - zero.to(torch.float32))


def stored_ste(x: torch.Tensor, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """x rounded to `dtype` forward (the value that is stored: a scale, a centroid, a norm weight), identity
    backward (straight-through estimator); float32 out."""
    return x + (x.to(dtype).float() - x).detach()


def whole_ste(x: torch.Tensor) -> torch.Tensor:
    """x rounded to a whole code 1..SCALE_CODES of a double-quantized scale forward, identity backward."""
    return x + (x.round().clamp(1, SCALE_CODES) - x).detach()


def group_index(in_features: int, group_size: int) -> torch.Tensor:
    """g_idx of contiguous groups: input channel i belongs to group i // group_size (-1 = one group)."""
    g = in_features if group_size == -1 else group_size
    return torch.arange(in_features, dtype=torch.int32) // g


def check_finite(W: torch.Tensor) -> None:
    if not torch.isfinite(W).all():
        bad = (~torch.isfinite(W)).sum().item()
        raise ValueError(f"weight has {bad} NaN/Inf values")

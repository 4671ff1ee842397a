"""Uniform min-max quantization grids and round-to-nearest (RTN).

The grid is GPTQ's `Quantizer` (Frantar et al. 2022, code `quant.py`): asymmetric min-max with the range
forced to contain 0, integer zero point round(-xmin/scale); symmetric: zero = (maxq+1)/2. Scales are
rounded to fp16 *before* quantizing, so the codes are fitted to the grid that is actually stored.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.reference import fake_quantize, group_index

FP16_TINY = 2.0**-24   # smallest positive fp16: a scale may not round to zero


@dataclass
class QuantizedWeight:
    """A quantized [out, in] matrix in unpacked form; `Q` is exactly what the checkpoint dequantizes to."""
    codes: torch.Tensor            # uint8 [out, in]
    scales: torch.Tensor           # fp16 [G, out]
    zeros: torch.Tensor            # int32 [G, out], true zero points
    g_idx: torch.Tensor | None     # int32 [in] when groups are not contiguous runs of input channels
    bits: int
    group_size: int
    sym: bool
    Q: torch.Tensor                # float32 [out, in] = scale * (q - zero)
    loss: float = 0.0              # GPTQ's sum of (w-q)^2 / [H^-1]_ii^2 / 2 (0 for RTN)

    def group_index(self) -> torch.Tensor:
        return self.g_idx if self.g_idx is not None else group_index(self.codes.shape[1], self.group_size)


def fit_grid(x: torch.Tensor, bits: int, sym: bool, mse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (scale fp16, zero int32) of the min-max grid covering the rows of x [rows, n]; with `mse`,
    the range shrunk by the factor that minimizes each row's quantization error (`shrink_search`)."""
    x = x.to(torch.float32)
    xmin = x.min(dim=1).values.clamp(max=0)
    xmax = x.max(dim=1).values.clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    flat = (xmin == 0) & (xmax == 0)
    xmin, xmax = torch.where(flat, -1.0, xmin), torch.where(flat, 1.0, xmax)
    if not mse:
        return _grid(xmin, xmax, bits, sym)
    return shrink_search(x, xmin, xmax, bits, sym)


def _grid(xmin: torch.Tensor, xmax: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp16 scale, integer zero) of the grid of 2^bits points spanning [xmin, xmax] per row."""
    maxq = 2**bits - 1
    scale = ((xmax - xmin) / maxq).to(torch.float16)
    if torch.isinf(scale).any():
        raise ValueError("weight magnitude overflows an fp16 scale")
    scale = torch.where(scale == 0, torch.tensor(FP16_TINY, dtype=torch.float16), scale)
    if sym:
        zero = torch.full_like(xmin, (maxq + 1) // 2, dtype=torch.int32)
    else:
        zero = torch.round(-xmin / scale.float()).clamp(0, maxq).to(torch.int32)
    return scale, zero


SHRINK_STEPS, MAX_SHRINK, ERROR_NORM = 100, 0.8, 2.4     # GPTQ code quant.py: grid, maxshrink, norm


def shrink_search(x: torch.Tensor, xmin: torch.Tensor, xmax: torch.Tensor, bits: int, sym: bool):
    """The grid of [p xmin, p xmax], p = 1 - i/100 for i < 80, with the least sum |x - q(x)|^2.4 per row
    (GPTQ code quant.py, `Quantizer(mse=True)`); the error is measured on the stored fp16-scale grid."""
    best_scale, best_zero = _grid(xmin, xmax, bits, sym)
    best = torch.full_like(xmin, float("inf"))
    for i in range(int(MAX_SHRINK * SHRINK_STEPS)):
        p = 1 - i / SHRINK_STEPS
        scale, zero = _grid(p * xmin, p * xmax, bits, sym)
        q = quantize_codes(x, scale[:, None], zero[:, None], bits)
        err = ((q.float() - zero[:, None]) * scale.float()[:, None] - x).abs_().pow_(ERROR_NORM).sum(dim=1)
        better = err < best
        best = torch.where(better, err, best)
        best_scale, best_zero = torch.where(better, scale, best_scale), torch.where(better, zero, best_zero)
    return best_scale, best_zero


def quantize_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """q = clamp(round(x / scale) + zero, 0, maxq), broadcasting scale/zero over the last dim of x."""
    maxq = 2**bits - 1
    return torch.clamp(torch.round(x / scale.float()) + zero, 0, maxq).to(torch.uint8)


def check_finite(W: torch.Tensor) -> None:
    if not torch.isfinite(W).all():
        bad = (~torch.isfinite(W)).sum().item()
        raise ValueError(f"weight has {bad} NaN/Inf values")


def rtn_quantize(W: torch.Tensor, bits: int, group_size: int = -1, sym: bool = False,
                 mse: bool = False) -> QuantizedWeight:
    """Round each weight to the nearest point of its (row, group) min-max grid."""
    check_finite(W)
    W = W.to(torch.float32)
    rows, cols = W.shape
    g = cols if group_size == -1 else group_size
    codes = torch.empty(rows, cols, dtype=torch.uint8)
    scales, zeros = [], []
    for start in range(0, cols, g):
        block = W[:, start:start + g]
        scale, zero = fit_grid(block, bits, sym, mse)
        codes[:, start:start + g] = quantize_codes(block, scale[:, None], zero[:, None], bits)
        scales.append(scale)
        zeros.append(zero)
    scales, zeros = torch.stack(scales), torch.stack(zeros)
    gi = group_index(cols, group_size).long()
    Q = fake_quantize(codes, scales[gi].t(), zeros[gi].t())
    return QuantizedWeight(codes, scales, zeros, None, bits, group_size, sym, Q)

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


def fit_grid(x: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (scale fp16, zero int32) of the min-max grid covering the rows of x [rows, n]."""
    maxq = 2**bits - 1
    x = x.to(torch.float32)
    xmin = x.min(dim=1).values.clamp(max=0)
    xmax = x.max(dim=1).values.clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    flat = (xmin == 0) & (xmax == 0)
    xmin, xmax = torch.where(flat, -1.0, xmin), torch.where(flat, 1.0, xmax)
    scale = ((xmax - xmin) / maxq).to(torch.float16)
    if torch.isinf(scale).any():
        raise ValueError("weight magnitude overflows an fp16 scale")
    scale = torch.where(scale == 0, torch.tensor(FP16_TINY, dtype=torch.float16), scale)
    if sym:
        zero = torch.full_like(xmin, (maxq + 1) // 2, dtype=torch.int32)
    else:
        zero = torch.round(-xmin / scale.float()).clamp(0, maxq).to(torch.int32)
    return scale, zero


def quantize_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """q = clamp(round(x / scale) + zero, 0, maxq), broadcasting scale/zero over the last dim of x."""
    maxq = 2**bits - 1
    return torch.clamp(torch.round(x / scale.float()) + zero, 0, maxq).to(torch.uint8)


def check_finite(W: torch.Tensor) -> None:
    if not torch.isfinite(W).all():
        bad = (~torch.isfinite(W)).sum().item()
        raise ValueError(f"weight has {bad} NaN/Inf values")


def rtn_quantize(W: torch.Tensor, bits: int, group_size: int = -1, sym: bool = False) -> QuantizedWeight:
    """Round each weight to the nearest point of its (row, group) min-max grid."""
    check_finite(W)
    W = W.to(torch.float32)
    rows, cols = W.shape
    g = cols if group_size == -1 else group_size
    codes = torch.empty(rows, cols, dtype=torch.uint8)
    scales, zeros = [], []
    for start in range(0, cols, g):
        block = W[:, start:start + g]
        scale, zero = fit_grid(block, bits, sym)
        codes[:, start:start + g] = quantize_codes(block, scale[:, None], zero[:, None], bits)
        scales.append(scale)
        zeros.append(zero)
    scales, zeros = torch.stack(scales), torch.stack(zeros)
    gi = group_index(cols, group_size).long()
    Q = fake_quantize(codes, scales[gi].t(), zeros[gi].t())
    return QuantizedWeight(codes, scales, zeros, None, bits, group_size, sym, Q)

"""Per-input-channel grouping (AdaDim, Heo et al. 2024 / "Rethinking channel dimensions to isolate outliers for
low-bit weight quantization"): one grid per input channel and run of `group_size` output rows, instead of one per
output row and run of input channels.

A few input channels with large activations or weights widen every per-output-row group that holds them; with
groups along the output dimension such a channel gets grids of its own and the others keep their fine steps. In
GPTQ's column loop the grids of column j are fitted when j is reached, on its error-updated values, so the error
compensation sees exactly the stored grid (the GPTQ paper's groups are fitted the same way, one run of columns
at a time).

Stored: scales fp16 [G, in] and zeros [G, in], G = ceil(out / group_size) (-1: one group of all rows); rows
[k g, (k+1) g) of column j dequantize as scale[k, j] * (q - zero[k, j]).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .grid import RowGrid, fake_quantize, fit_grid
from .rtn import QuantizedWeight


def row_span(group_size: int, rows: int) -> int:
    """Rows per group: `group_size`, or all of them for -1."""
    return rows if group_size == -1 else group_size


def fit_column(w: torch.Tensor, group_size: int, grid: RowGrid, mse: bool = False,
               shrink_every: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale fp16 [G], zero int32 [G]) of the runs of `group_size` consecutive values of the column w [rows];
    a last, shorter run gets a grid of its own."""
    g = row_span(group_size, w.shape[0])
    full = w.shape[0] // g * g
    fits = []
    if full:
        fits.append(fit_grid(w[:full].reshape(-1, g), grid, mse=mse, shrink_every=shrink_every))
    if full < w.shape[0]:
        fits.append(fit_grid(w[full:][None], grid, mse=mse, shrink_every=shrink_every))
    return torch.cat([s for s, _ in fits]), torch.cat([z for _, z in fits])


def expand_rows(per_group: torch.Tensor, group_size: int, rows: int) -> torch.Tensor:
    """A tensor [G, ...] of per-group values as one per row [rows, ...]."""
    return per_group.repeat_interleave(row_span(group_size, rows), dim=0)[:rows]


@dataclass
class PerICWeight(QuantizedWeight):
    """A per-input-channel quantized matrix: `scales` fp16 [G, in], `zeros` int32 [G, in] (module docstring);
    `g_idx` is None."""

    @staticmethod
    def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
        rows = codes.shape[0]
        return fake_quantize(codes, expand_rows(scales, group_size, rows), expand_rows(zeros, group_size, rows))

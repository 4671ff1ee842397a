"""Round-to-nearest (RTN) onto the min-max grids of `grid.py`, and the unpacked result every quantizer
returns (`QuantizedWeight`)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .grid import check_finite, fake_quantize, fit_grid, group_index, quantize_codes


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
    loss: float | None = None      # GPTQ's sum of (w-q)^2 / [H^-1]_ii^2 / 2 (None: RTN has no Hessian to weigh by)

    def group_index(self) -> torch.Tensor:
        return self.g_idx if self.g_idx is not None else group_index(self.codes.shape[1], self.group_size)


@dataclass
class ColumnBitsWeight(QuantizedWeight):
    """A `QuantizedWeight` whose groups of columns have bits of their own (quantize/column_bits.py): group k's codes
    and grid have `widths[k]` bits, `bits` their mean."""
    widths: torch.Tensor | None = None     # int [G]

    def maxq(self) -> torch.Tensor:
        """2^width - 1 of every group, float [G]."""
        return (2.0 ** self.widths.float() - 1)


@dataclass
class DQWeight(QuantizedWeight):
    """A `QuantizedWeight` whose group scales are double-quantized (grid.py): each is fp16(c u) for an 8-bit code c
    and its row's unit u, `unit` fp16 [out]."""
    unit: torch.Tensor | None = None


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

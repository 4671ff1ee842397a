"""Bits per group of columns inside one linear (BAQ: Zhang et al. 2025, "BAQ: Efficient Bit Allocation
Quantization for Large Language Models", arXiv 2506.05664).

BAQ models a column's GPTQ loss at b bits as L_j(b) = c_j 2^(-theta b) and, for a fixed total of bits, puts
every column at the same loss: b_j = R + (1/theta) log2(L_j / geomean L), theta = 1.95 (BAQ's code). Packed
kernels want whole widths on runs of columns, so here the unit is a group of `group_size` columns in GPTQ's
order (act-order: descending H_jj, EXL2's arrangement, so that a group holds columns of like importance), and a
group takes R - 1, R or R + 1 bits. A first GPTQ pass at R bits gives each group's loss L_k; under the model,
raising group h to R + 1 saves L_h (1 - 2^-theta) and lowering group l to R - 1 costs L_l (2^theta - 1), so the
groups are paired, the largest loss with the smallest, while a pair saves more than it costs. The number of
groups raised equals the number lowered: the linear keeps exactly R bits per weight of codes, whatever the
weights, so a plan prices it before it is quantized. A last, shorter group stays at R bits. Then GPTQ again,
each group on its own width (`GridConfig.widths`, one loop for every configuration).

On SmolLM2-135M widths R - 1, R, R + 1 cut the Fisher-weighted GPTQ error at equal bits by 16-19 % in total at
R = 2, 3 and 4 (`bench/results/column-bits.md`); here R is 3, 4 or 5, whose neighbours the packing stores.
"""
from __future__ import annotations

import torch

from ..formats.packing import SUPPORTED_BITS
from .gptq import GridConfig, gptq_configs
from .rtn import ColumnBitsWeight

THETA = 1.95                 # BAQ's rate-distortion exponent: a bit more divides a column's loss by 2^theta
COLUMN_BITS = tuple(b for b in SUPPORTED_BITS if {b - 1, b + 1} <= set(SUPPORTED_BITS))   # 3, 4, 5: R -/+ 1 stored


def allocate_widths(group_losses: torch.Tensor, bits: int, full: int) -> list[int]:
    """Widths R - 1, R, R + 1 of the groups whose GPTQ losses at R = `bits` are `group_losses` [G], the first
    `full` of them whole groups (a last, shorter group stays at R): as many raised as lowered, the largest losses
    raised and the smallest lowered while a pair saves more than it costs under L(b) ~ 2^(-theta b)."""
    widths = [bits] * len(group_losses)
    order = torch.argsort(group_losses[:full], descending=True, stable=True).tolist()
    up, down = 1 - 2.0 ** -THETA, 2.0 ** THETA - 1
    for i in range(full // 2):
        high, low = order[i], order[full - 1 - i]
        if float(group_losses[high]) * up <= float(group_losses[low]) * down:
            break
        widths[high], widths[low] = bits + 1, bits - 1
    return widths


def group_losses(score: torch.Tensor, group_size: int, row_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Each group's GPTQ loss [G] from every weight's loss `score` [rows, in] (columns in the loop's order), its
    rows weighted by `row_weight` (a sample's Horvitz-Thompson weights) when given."""
    per_column = score.sum(0) if row_weight is None else row_weight @ score
    groups = -(-per_column.numel() // group_size)
    return torch.zeros(groups).index_add_(0, torch.arange(per_column.numel()) // group_size, per_column) / 2


def with_widths(bits: int, group: int, score: torch.Tensor,
                row_weight: torch.Tensor | None = None) -> GridConfig:
    """The configuration (bits R, group size) with its groups' widths (`allocate_widths`) from every weight's loss
    at R bits, `score` [rows, in] in the loop's column order (`gptq_loop`), rows weighted by `row_weight`."""
    losses = group_losses(score, group, row_weight)
    return GridConfig(bits, group, widths=tuple(allocate_widths(losses, bits, score.shape[1] // group)))


def column_widths(W: torch.Tensor, H: torch.Tensor, configs: list[tuple[int, int]], act_order: bool, damp: float,
                  mse: bool, shrink_every: int = 1, blocksize: int = 128,
                  row_weight: torch.Tensor | None = None) -> list[GridConfig]:
    """The configurations (bits R, group size) of W [out, in] with their groups' widths, from one GPTQ pass of W
    at R bits under every configuration at once."""
    rows, cols = W.shape
    uniform = [GridConfig(bits, group) for bits, group in configs]
    score = torch.zeros(len(configs) * rows, cols)
    gptq_configs(W, H, uniform, act_order, False, damp, blocksize, mse, shrink_every, keep=False, score=score)
    return [with_widths(bits, group, score[c * rows:(c + 1) * rows], row_weight)
            for c, (bits, group) in enumerate(configs)]


def gptq_column_bits_configs(W: torch.Tensor, H: torch.Tensor, configs: list[tuple[int, int]], act_order: bool,
                             damp: float, mse: bool, shrink_every: int = 1, blocksize: int = 128,
                             row_weight: torch.Tensor | None = None, keep: bool = True,
                             widths: list[GridConfig] | None = None):
    """GPTQ of W under each configuration (bits R, group size) with bits per group of columns: the widths from a
    first pass (`column_widths`; or `widths`, the configurations with theirs from a pass made already), then GPTQ
    on them. Returns (`ColumnBitsWeight`s (empty unless `keep`), the loss of every row of every configuration
    [len(configs), out]), as `gptq_configs`."""
    if any(bits not in COLUMN_BITS or group < 1 for bits, group in configs):
        raise ValueError(f"bits per group of columns around {configs}: choose bits among {COLUMN_BITS} and "
                         "groups along the input")
    if widths is None:
        widths = column_widths(W, H, configs, act_order, damp, mse, shrink_every, blocksize, row_weight)
    return gptq_configs(W, H, widths, act_order, False, damp, blocksize, mse, shrink_every, keep)


def gptq_column_bits(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int, act_order: bool = True,
                     damp: float = 0.01, mse: bool = True) -> ColumnBitsWeight:
    """W [out, in] quantized with `bits` bits per weight on average, each group of `group_size` columns on
    bits - 1, bits or bits + 1 (module docstring)."""
    (qw,), _ = gptq_column_bits_configs(W, H, [(bits, group_size)], act_order, damp, mse)
    return qw

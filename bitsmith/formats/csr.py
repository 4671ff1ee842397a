"""Compressed sparse rows (CSR): the sparse part of a dense-and-sparse weight as a checkpoint stores it.

An [out, in] matrix with nnz kept entries becomes three tensors, as in SpQR's and SqueezeLLM's kernels:
  values   fp16  [nnz]      row by row, ascending column within a row
  cols     int16 [nnz]      when in <= 32767, else int32
  row_ptr  int32 [out + 1]  row r holds entries row_ptr[r] .. row_ptr[r+1] - 1
"""
from __future__ import annotations

from typing import NamedTuple

import torch

INT16_COLUMNS = 32767          # widest input that int16 column indices are used for


class CSR(NamedTuple):
    values: torch.Tensor       # fp16 [nnz]
    cols: torch.Tensor         # int16 or int32 [nnz]
    row_ptr: torch.Tensor      # int32 [out + 1]
    in_features: int

    def positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, column) of every entry, int64 [nnz] each."""
        counts = (self.row_ptr[1:] - self.row_ptr[:-1]).long()
        return torch.repeat_interleave(torch.arange(len(counts)), counts), self.cols.long()


def index_dtype(in_features: int) -> torch.dtype:
    """Dtype of the column indices: int16 when in_features <= 32767, else int32."""
    return torch.int16 if in_features <= INT16_COLUMNS else torch.int32


def to_csr(mask: torch.Tensor, values: torch.Tensor) -> CSR:
    """The entries of values [out, in] where mask [out, in] is set."""
    out, inp = mask.shape
    rows, cols = mask.nonzero(as_tuple=True)                 # row-major: rows ascending, then columns
    row_ptr = torch.zeros(out + 1, dtype=torch.int64)
    row_ptr[1:] = torch.cumsum(torch.bincount(rows, minlength=out), 0)
    return CSR(values[rows, cols].to(torch.float16), cols.to(index_dtype(inp)), row_ptr.to(torch.int32), inp)


def from_csr(csr: CSR) -> torch.Tensor:
    """The dense fp16 [out, in] matrix: the entries at their positions, zero elsewhere."""
    dense = torch.zeros(len(csr.row_ptr) - 1, csr.in_features, dtype=torch.float16)
    dense[csr.positions()] = csr.values
    return dense


def csr_bits(out_features: int, in_features: int, nnz: int) -> int:
    """Exact stored bits of an [out, in] CSR with nnz entries."""
    index = 16 if index_dtype(in_features) == torch.int16 else 32
    return (16 + index) * nnz + 32 * (out_features + 1)

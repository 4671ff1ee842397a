"""VQLinear: an nn.Linear replacement for codebooks of pairs of weights (quantize/vq.py; GPTVQ's layout in two
dimensions).

  qweight    int32 [packed(in / 2), out]   each pair's index, 2 x bits wide, packed along the pairs as the GPTQ
                                           layout packs its codes along in_features
  codebooks  fp16  [G, 2^(2 bits), 2]      one codebook per block of `group_size` inputs
  row_scales fp16  [out]                   each output row's factor
W[o, 2p + t] = row_scales[o] * codebooks[2p // span, index[o, p], t], span = group_size (in_features for -1). Decode on CPU runs torch's int8 GEMM on
each row's values put on a 255-level grid (kernels/cpu.py TableWeights: a row's table is its scale times every
codebook entry); otherwise the forward dequantizes W (kernels/dequantizing.py); `cache_dequantized` keeps it.
"""
from __future__ import annotations

import torch

from ..formats.packing import packed_length, unpack
from ..quantize.vq import dequantize, entries, flat_index, index_bits, span
from .cpu import TableWeights
from .dequantizing import DequantizingLinear


def vq_dequantize(qweight: torch.Tensor, codebooks: torch.Tensor, row_scales: torch.Tensor, bits: float,
                  in_features: int, group_size: int) -> torch.Tensor:
    """W [out, in] in float32 from the stored tensors (module docstring)."""
    return dequantize(unpack(qweight, index_bits(bits), in_features // 2, dim=0).t(), codebooks, row_scales, group_size)


def vq_table(qweight: torch.Tensor, codebooks: torch.Tensor, row_scales: torch.Tensor, bits: float, in_features: int,
             group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """W as codes [out, in] into a table per row [out, G * 2^(2 bits) * 2]: row o's table is s_o times every entry
    of every codebook, and weight (o, 2p + t) points at entry (block of 2p, its pair's index, t)."""
    codes = flat_index(unpack(qweight, index_bits(bits), in_features // 2, dim=0).t(), entries(bits), group_size)
    table = row_scales.to(torch.float32)[:, None] * codebooks.to(torch.float32).reshape(1, -1)
    return codes, table


class VQLinear(DequantizingLinear):
    """y = x W^T + b with W of codebooks of pairs (module docstring)."""

    def __init__(self, in_features: int, out_features: int, bits: float, group_size: int, bias: bool = False):
        super().__init__(in_features, out_features, bits, bias)
        self.group_size = group_size
        blocks = -(-in_features // span(group_size, in_features))
        self.register_buffer("qweight", torch.zeros(packed_length(in_features // 2, index_bits(bits)), out_features,
                                                    dtype=torch.int32))
        self.register_buffer("codebooks", torch.zeros(blocks, entries(bits), 2, dtype=torch.float16))
        self.register_buffer("row_scales", torch.zeros(out_features, dtype=torch.float16))

    def _stored(self) -> tuple:
        return self.qweight, self.codebooks, self.row_scales, self.bits, self.in_features, self.group_size

    def decode(self, rows: torch.Tensor) -> torch.Tensor:
        """torch's int8 GEMM on each row's values as 8-bit levels (cpu.TableWeights: a byte per weight)."""
        return self.decode_form(lambda: TableWeights(*vq_table(*self._stored())))(rows)

    def dequantize(self) -> torch.Tensor:
        return vq_dequantize(*self._stored())

    def dequantize_cuda(self, dtype: torch.dtype) -> torch.Tensor:
        from .triton_dequant import vq_dequantize as triton_vq
        return triton_vq(*self._stored(), dtype).t()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"codebooks of pairs per {self.group_size} inputs")

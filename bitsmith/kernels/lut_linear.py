"""LUTLinear: an nn.Linear replacement for lookup-table weights (quantize/lut.py; SqueezeLLM's layout).

  qweight int32 [packed(in), out]   codes packed along in_features, as the GPTQ layout packs them
  lut     fp16  [out, 2^bits]       each output row's centroids
W[o, j] = lut[o, code[o, j]]. Decode on CPU runs torch's int8 GEMM on each row's table put on a 255-level grid
(kernels/cpu.py TableWeights); otherwise the forward dequantizes W (kernels/dequantizing.py); `cache_dequantized`
keeps it.
"""
from __future__ import annotations

import torch

from ..formats.packing import packed_length, unpack
from .cpu import TableWeights
from .dequantizing import DequantizingLinear


def lut_dequantize(qweight: torch.Tensor, lut: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """W [out, in] in float32 from packed codes [packed(in), out] and tables [out, 2^bits]."""
    codes = unpack(qweight, bits, in_features, dim=0).t().long()
    return lut.to(torch.float32).gather(1, codes)


class LUTLinear(DequantizingLinear):
    """y = x W^T + b with W = lut[o, code[o, j]] (module docstring)."""

    def __init__(self, in_features: int, out_features: int, bits: int, bias: bool = False):
        super().__init__(in_features, out_features, bits, bias)
        self.register_buffer("qweight", torch.zeros(packed_length(in_features, bits), out_features, dtype=torch.int32))
        self.register_buffer("lut", torch.zeros(out_features, 1 << bits, dtype=torch.float16))

    def decode(self, rows: torch.Tensor) -> torch.Tensor:
        """torch's int8 GEMM on the rows' tables as 8-bit levels (cpu.TableWeights: a byte per weight)."""
        return self.decode_form(lambda: TableWeights(
            unpack(self.qweight, self.bits, self.in_features, dim=0).t(), self.lut))(rows)

    def dequantize(self) -> torch.Tensor:
        return lut_dequantize(self.qweight, self.lut, self.bits, self.in_features)

    def dequantize_cuda(self, dtype: torch.dtype) -> torch.Tensor:
        from .triton_dequant import lut_dequantize as triton_lut
        return triton_lut(self.qweight, self.lut, self.bits, self.in_features, dtype).t()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, lut=per row"

"""LUTLinear: an nn.Linear replacement for lookup-table weights (quantize/lut.py; SqueezeLLM's layout).

  qweight int32 [packed(in), out]   codes packed along in_features, as the GPTQ layout packs them
  lut     fp16  [out, 2^bits]       each output row's centroids
W[o, j] = lut[o, code[o, j]]. The forward dequantizes W (the torch reference); `cache_dequantized` keeps it.
"""
from __future__ import annotations

import torch

from ..formats.packing import packed_length, unpack
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

    def dequantize(self) -> torch.Tensor:
        return lut_dequantize(self.qweight, self.lut, self.bits, self.in_features)

    def dequantize_cuda(self, dtype: torch.dtype) -> torch.Tensor:
        from .triton_dequant import lut_dequantize as triton_lut
        return triton_lut(self.qweight, self.lut, self.bits, self.in_features, dtype).t()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, lut=per row"

"""PerICLinear: an nn.Linear replacement for per-input-channel grids (quantize/per_ic.py; AdaDim's grouping).

  qweight int32 [packed(in), out]   codes packed along in_features, as the GPTQ layout packs them
  scales  fp16  [G, in]             one scale per input channel and group of `group_size` output rows
  qzeros  int32 [G, packed(in)]     the zero points (true zeros, not GPTQ's zero - 1), packed along in_features
W[o, j] = scales[o // g, j] * (code[o, j] - zero[o // g, j]). Decode on CPU runs torch's int4 GEMM (up to 4 bits) or
int8 GEMM (8 bits) per group of rows (kernels/cpu.py); otherwise the forward dequantizes W (kernels/dequantizing.py).
"""
from __future__ import annotations

import torch

from ..formats.packing import packed_length, unpack
from ..quantize.per_ic import PerICWeight, row_span
from .cpu import PerICWeights
from .dequantizing import DequantizingLinear


def per_ic_dequantize(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor, bits: int, in_features: int,
                      group_size: int) -> torch.Tensor:
    """W [out, in] in float32 from the stored tensors (module docstring)."""
    codes = unpack(qweight, bits, in_features, dim=0).t()
    zeros = unpack(qzeros, bits, in_features, dim=1)
    return PerICWeight.dequantize(codes, scales, zeros, group_size)


class PerICLinear(DequantizingLinear):
    """y = x W^T + b with W of per-input-channel grids (module docstring)."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool = False):
        super().__init__(in_features, out_features, bits, bias)
        self.group_size = group_size
        groups = -(-out_features // row_span(group_size, out_features))
        self.register_buffer("qweight", torch.zeros(packed_length(in_features, bits), out_features, dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(groups, in_features, dtype=torch.float16))
        self.register_buffer("qzeros", torch.zeros(groups, packed_length(in_features, bits), dtype=torch.int32))

    def decode(self, rows: torch.Tensor) -> torch.Tensor:
        """torch's int4 (up to 4 bits) or int8 GEMM on the codes, one call per group of output rows
        (cpu.PerICWeights: half a byte or a byte per weight)."""
        return self.decode_form(lambda: PerICWeights(
            unpack(self.qweight, self.bits, self.in_features, dim=0).t(), self.scales,
            unpack(self.qzeros, self.bits, self.in_features, dim=1), self.bits,
            row_span(self.group_size, self.out_features)))(rows)

    def dequantize(self) -> torch.Tensor:
        return per_ic_dequantize(self.qweight, self.scales, self.qzeros, self.bits, self.in_features, self.group_size)

    def dequantize_cuda(self, dtype: torch.dtype) -> torch.Tensor:
        from .triton_dequant import per_ic_dequantize as triton_per_ic
        zeros = unpack(self.qzeros, self.bits, self.in_features, dim=1).to(self.scales.dtype)
        return triton_per_ic(self.qweight, self.scales, zeros, self.bits, self.in_features,
                             row_span(self.group_size, self.out_features), dtype).t()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size} rows per input channel")

"""The runtime of layouts without a fused kernel yet (lookup tables, per-input-channel groups): the forward
dequantizes W with the layout's torch reference; `cache_dequantized` keeps a dense copy for repeated calls."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DequantizingLinear(nn.Module):
    """y = x W^T + b, W = `dequantize()` (each subclass's layout) on the CPU, and on CUDA `dequantize_cuda(dtype)`
    (Triton, kernels/triton_dequant.py) in the activations' dtype."""

    def __init__(self, in_features: int, out_features: int, bits: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16) if bias else None)
        self._dense = None

    def dequantize(self) -> torch.Tensor:
        raise NotImplementedError

    def dequantize_cuda(self, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def cache_dequantized(self, dtype: torch.dtype = torch.float32) -> None:
        """Keep a dense copy of W for repeated forwards (evaluation); trades memory for speed."""
        self._dense = self.dequantize().to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._dense is not None:
            W = self._dense
        else:
            W = self.dequantize_cuda(x.dtype) if x.is_cuda else self.dequantize()
        return F.linear(x, W.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

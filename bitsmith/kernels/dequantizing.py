"""The runtime of layouts without a fused kernel yet (lookup tables, per-input-channel groups).

On CUDA the forward dequantizes W with Triton (kernels/triton_dequant.py) in the activations' dtype. On the CPU,
a call of up to CPU_INT4_MAX_M rows (decode) goes through `decode`: the layout's form for one of torch's weight-only
GEMMs (kernels/cpu.py; per-input-channel grids: int4 or int8 codes, lookup tables: int8 levels), made once and
read at every step (dequantizing W on every step costs 40 times the float32 product on one core); a longer call
dequantizes W once for the call with the torch reference, exact in float32. `cache_dequantized` keeps a dense copy
in any dtype for every call instead.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import nn

from ..memory import release_freed_memory
from .dispatch import CPU_INT4_MAX_M


class DequantizingLinear(nn.Module, ABC):
    """y = x W^T + b, W = `dequantize()` (each subclass's layout; module docstring)."""

    def __init__(self, in_features: int, out_features: int, bits: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16) if bias else None)
        self._dense = None
        self._decode = None                     # (key of the weights it was made from, the decode form)
        self.register_load_state_dict_post_hook(lambda module, keys: setattr(module, "_decode", None))

    @abstractmethod
    def dequantize(self) -> torch.Tensor:
        """W [out, in] in float32, through the layout's torch reference."""

    @abstractmethod
    def dequantize_cuda(self, dtype: torch.dtype) -> torch.Tensor:
        """W [out, in] in `dtype` on CUDA, through the layout's Triton kernel."""

    def cache_dequantized(self, dtype: torch.dtype = torch.float32) -> None:
        """Keep a dense copy of W for repeated forwards (evaluation); trades memory for speed."""
        self._dense = self.dequantize().to(dtype)

    @abstractmethod
    def decode(self, rows: torch.Tensor) -> torch.Tensor:
        """rows [M, in] W^T on the CPU for a few rows (decode), through the layout's CPU form (`decode_form`)."""

    def decode_form(self, make):
        """The CPU decode form `make()` builds, kept and made again when the packed weights change. Its temporaries
        (unpacked codes, int64 indices: several times the form) are given back to the system once it is made: left
        in the heap between the forms that stay, they would take more memory than the forms (SmolLM2 with lookup
        tables: 1,044 MB peak, 674 MB with the heap trimmed)."""
        key = tuple(b.data_ptr() for b in self.buffers())
        if self._decode is None or self._decode[0] != key:
            self._decode = (key, make())
            release_freed_memory()
        return self._decode[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self._dense is not None:
            return F.linear(x, self._dense.to(x.dtype), bias)
        if x.is_cuda:
            return F.linear(x, self.dequantize_cuda(x.dtype), bias)
        if x.numel() // self.in_features <= CPU_INT4_MAX_M:
            y = self.decode(x.reshape(-1, self.in_features)).reshape(*x.shape[:-1], self.out_features)
            return y if bias is None else y + bias
        return F.linear(x, self.dequantize().to(x.dtype), bias)

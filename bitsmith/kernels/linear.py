"""QuantizedLinear: an nn.Linear replacement holding GPTQ-layout packed weights; DenseSparseLinear: the same
with outliers in CSR added (bitsmith/layouts.py)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..formats.csr import index_dtype
from ..formats.packing import packed_length
from . import dispatch, reference


class QuantizedLinear(nn.Module):
    """y = x W^T + b with W = scale * (q - zero) stored packed (see kernels/reference.py for the layout)."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int,
                 bias: bool = False, has_g_idx: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        groups = 1 if group_size == -1 else -(-in_features // group_size)
        self.register_buffer("qweight", torch.zeros(packed_length(in_features, bits), out_features, dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=torch.float16))
        self.register_buffer("qzeros", torch.zeros(groups, packed_length(out_features, bits), dtype=torch.int32))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32) if has_g_idx else None)
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16) if bias else None)
        self._dense = None
        self._runtime = None
        self.register_load_state_dict_post_hook(dispatch.forget_runtime)

    def group_index(self) -> torch.Tensor:
        return self.g_idx if self.g_idx is not None else reference.group_index(self.in_features, self.group_size)

    def dequantize(self) -> torch.Tensor:
        """W [out, in] in float32, through the torch reference."""
        return reference.dequantize(self.qweight, self.scales, self.qzeros, self.group_index(),
                                    self.bits, self.in_features)

    def cache_dequantized(self, dtype: torch.dtype = torch.float32) -> None:
        """Keep a dense copy of W for repeated CPU forwards (evaluation); trades memory for speed."""
        self._dense = self.dequantize().to(dtype)

    def runtime(self) -> dispatch.W4A16Runtime:
        """The load-time form of the weights (kernels/dispatch.py), built on first use and again when
        `qweight` is replaced or moves to another device."""
        qweight = self._buffers["qweight"]              # (not through Module.__getattr__: this runs per call)
        made = self._runtime
        if made is None or made[0] is not qweight or made[1] != qweight.data_ptr():
            self._runtime = made = (qweight, qweight.data_ptr(), self._make_runtime())
        return made[2]

    def _make_runtime(self):
        return dispatch.W4A16Runtime(self.qweight, self.scales, self.qzeros, self.g_idx, self.bits,
                                     self.in_features, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self._buffers["bias"]
        if bias is not None:
            bias = bias.to(x.dtype)
        if self._dense is not None:
            return F.linear(x, self._dense.to(x.dtype), bias)
        y = self.runtime()(x.reshape(-1, self.in_features)).reshape(*x.shape[:-1], self.out_features)
        return y if bias is None else y + bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, act_order={self.g_idx is not None}")


class DenseSparseLinear(QuantizedLinear):
    """A QuantizedLinear whose codes at `nnz` positions are zero points, the weights there kept in fp16 as CSR:
    W = the dequantized codes with the outliers written over them (kernels/reference.py)."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, nnz: int,
                 bias: bool = False, has_g_idx: bool = False):
        super().__init__(in_features, out_features, bits, group_size, bias=bias, has_g_idx=has_g_idx)
        self.register_buffer("outlier_values", torch.zeros(nnz, dtype=torch.float16))
        self.register_buffer("outlier_cols", torch.zeros(nnz, dtype=index_dtype(in_features)))
        self.register_buffer("outlier_row_ptr", torch.zeros(out_features + 1, dtype=torch.int32))

    def csr(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.outlier_values, self.outlier_cols, self.outlier_row_ptr

    def dequantize(self) -> torch.Tensor:
        return reference.dense_sparse_dequantize(self.qweight, self.scales, self.qzeros, self.group_index(),
                                                 self.bits, self.in_features, *self.csr())

    def _make_runtime(self):
        return dispatch.DenseSparseRuntime(super()._make_runtime(), *self.csr())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, outliers={self.outlier_values.numel()}"


def cache_dequantized(model: nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """Dense copies of every QuantizedLinear (and lookup-table or per-input-channel linear, and a held bf16
    output projection, kernels/vocab.py) of `model`, for repeated CPU forwards (evaluation): exact in `dtype` at
    any M, at the unquantized model's memory. Returns the bytes the copies hold."""
    from .dequantizing import DequantizingLinear
    from .vocab import HeldProjection
    held = 0
    for m in model.modules():
        if isinstance(m, (QuantizedLinear, DequantizingLinear, HeldProjection)):
            m.cache_dequantized(dtype)
            held += m._dense.numel() * m._dense.element_size()
    return held

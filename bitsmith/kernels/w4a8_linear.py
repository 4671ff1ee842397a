"""W4A8Linear: an nn.Linear replacement for QoQ weights (4-bit codes, 8-bit activations)."""
from __future__ import annotations

import torch
from torch import nn

from ..formats.packing import packed_length, trim_earlier_padding
from . import dispatch, reference


class W4A8Linear(nn.Module):
    """y = x W^T + b with W = channel_scale * (q - group_zero) * group_scale (QServe section 4.1) and x
    quantized per token to int8 at run time; the layout is in kernels/reference.py (W4A8 section)."""

    def __init__(self, in_features: int, out_features: int, group_size: int = 128, bias: bool = False):
        super().__init__()
        if group_size != -1 and in_features % group_size:
            raise ValueError(f"in_features {in_features} is not a multiple of the group size {group_size}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = 1 if group_size == -1 else in_features // group_size
        packed = packed_length(in_features, 4)
        self.register_buffer("qweight", torch.zeros(packed, out_features, dtype=torch.int32))
        self.register_buffer("channel_scale", torch.zeros(out_features, dtype=torch.float16))
        self.register_buffer("group_scale", torch.zeros(groups, out_features, dtype=torch.int8))
        self.register_buffer("group_zero", torch.zeros(groups, out_features, dtype=torch.int8))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16) if bias else None)
        self._runtime = None
        self.register_load_state_dict_post_hook(dispatch.forget_runtime)
        self._register_load_state_dict_pre_hook(_read_earlier_padding, with_module=True)

    @classmethod
    def from_quantized(cls, qoq, bias: torch.Tensor | None = None) -> W4A8Linear:
        """A layer holding the result of `bitsmith.quantize.qoq.qoq_quantize` (and an optional bias)."""
        out_features, in_features = qoq.Q.shape
        layer = cls(in_features, out_features, qoq.group_size, bias=bias is not None)
        for name, tensor in qoq.tensors().items():
            getattr(layer, name).copy_(tensor)
        if bias is not None:
            layer.bias.copy_(bias)
        return layer

    def dequantize(self) -> torch.Tensor:
        """W [out, in] in float32, through the torch reference."""
        return reference.qoq_dequantize(self.qweight, self.channel_scale, self.group_scale, self.group_zero,
                                        self.in_features, self.group_size)

    def runtime(self) -> dispatch.W4A8Runtime:
        """The load-time form of the weights, built on first use and again when `qweight` is replaced or moves."""
        key = (self.qweight.device, self.qweight.data_ptr())
        if self._runtime is None or self._runtime[0] != key:
            self._runtime = (key, dispatch.W4A8Runtime(self.qweight, self.channel_scale, self.group_scale,
                                                       self.group_zero, self.in_features, self.group_size))
        return self._runtime[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.runtime()(x.reshape(-1, self.in_features)).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, w4a8=qoq")


def _read_earlier_padding(module: W4A8Linear, state_dict, prefix, *args) -> None:
    """Load-time: a qweight packed in whole runs of 32 codes (earlier versions) loads as it is packed now."""
    if prefix + "qweight" in state_dict:
        state_dict[prefix + "qweight"] = trim_earlier_padding(state_dict[prefix + "qweight"], module.in_features, 4,
                                                              dim=0)

"""DQLinear: a QuantizedLinear whose group scales are stored double-quantized (bitsmith/layouts.py `DQLayout`):
an 8-bit code c per group and row and an fp16 unit u per row, scale = fp16(c u) (quantize/grid.py). The scales
are expanded once, at load, so that every kernel of the GPTQ layout runs it unchanged; the group index is stored
in the narrowest integer type that holds the groups."""
from __future__ import annotations

import torch

from ..formats.errors import InputError
from ..quantize.grid import SCALE_CODES, coded_scales
from . import dispatch, reference
from .linear import QuantizedLinear


def group_index_dtype(groups: int) -> torch.dtype:
    """The narrowest stored type of a group index over `groups` groups."""
    return torch.uint8 if groups <= 256 else torch.int16 if groups <= 32768 else torch.int32


def dq_dequantize(qweight, scale_codes, scale_unit, qzeros, g_idx, bits: int, in_features: int) -> torch.Tensor:
    """W [out, in] float32: the GPTQ dequantization with scales fp16(c u) (kernels/reference.py)."""
    return reference.dequantize(qweight, coded_scales(scale_codes, scale_unit), qzeros, g_idx.to(torch.int32), bits,
                                in_features)


class DQLinear(QuantizedLinear):
    """y = x W^T + b, W = fp16(c u) * (q - zero): the GPTQ tensors but the scales, held as `scale_codes` uint8 [G, out]
    and `scale_unit` fp16 [out], and `g_idx` in `group_index_dtype`."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool = False):
        super().__init__(in_features, out_features, bits, group_size, bias=bias, has_g_idx=True)
        groups = self.scales.shape[0]
        self.register_buffer("scales", self.scales, persistent=False)      # fp16(c u), made at load
        self.register_buffer("scale_codes", torch.ones(groups, out_features, dtype=torch.uint8))
        self.register_buffer("scale_unit", torch.zeros(out_features, dtype=torch.float16))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=group_index_dtype(groups)))
        self.shapes = {name: buffer.shape for name, buffer in self.named_buffers() if buffer is not None}
        self.register_load_state_dict_post_hook(DQLinear._expand)

    @staticmethod
    def _expand(module: DQLinear, _keys) -> None:
        """Check what was loaded and make the scales; a tensor of another shape is left to the loader, which names
        it (torch reports size mismatches after this hook)."""
        if any(getattr(module, name).shape != shape for name, shape in module.shapes.items()):
            return
        where = f"a dq linear [{module.out_features}, {module.in_features}]"
        codes, unit, g_idx = module.scale_codes, module.scale_unit, module.g_idx
        if codes.dtype.is_floating_point or g_idx.dtype.is_floating_point:
            raise InputError(f"{where}: scale_codes and g_idx must be integers (got {codes.dtype}, {g_idx.dtype})")
        if codes.numel() and (int(codes.min()) < 1 or int(codes.max()) > SCALE_CODES):
            raise InputError(f"{where}: scale codes outside 1..{SCALE_CODES}")
        if not (torch.isfinite(unit.float()).all() and (unit.float() > 0).all()):
            raise InputError(f"{where}: a scale unit is not a positive finite number")
        groups = codes.shape[0]
        if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
            raise InputError(f"{where}: g_idx names groups outside 0..{groups - 1}")
        module.scales = coded_scales(codes, unit)

    def group_index(self) -> torch.Tensor:
        return self.g_idx.to(torch.int32)

    def _make_runtime(self):
        return dispatch.W4A16Runtime(self.qweight, self.scales, self.qzeros, self.group_index(), self.bits,
                                     self.in_features, self.group_size)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scales=double-quantized"

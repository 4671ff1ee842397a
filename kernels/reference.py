"""Torch reference ops for GPTQ-layout weights: the ground truth every fast kernel is tested against,
and the CPU inference path.

Layout (DESIGN.md section 1, GPTQ v1 convention):
  qweight int32 [packed(in), out]   codes packed along in_features (formats.packing)
  scales  fp16  [G, out]            G = number of groups along in_features
  qzeros  int32 [G, packed(out)]    zero points packed along out_features, stored as zero - 1 (GPTQ v1)
  g_idx   int32 [in]                group of each input channel (i // group_size when absent)
"""
from __future__ import annotations

import torch

from ..formats.packing import unpack


def group_index(in_features: int, group_size: int) -> torch.Tensor:
    """g_idx of contiguous groups: input channel i belongs to group i // group_size (-1 = one group)."""
    g = in_features if group_size == -1 else group_size
    return torch.arange(in_features, dtype=torch.int32) // g


def unpack_zeros(qzeros: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    """True zero points [G, out] from GPTQ v1 `qzeros` (stored minus one, modulo 2**bits)."""
    stored = unpack(qzeros, bits, out_features, dim=1).to(torch.int32)
    return (stored + 1) & ((1 << bits) - 1)


def dequantize(qweight, scales, qzeros, g_idx, bits: int, in_features: int) -> torch.Tensor:
    """W [out, in] in float32: scale * (q - zero), per input channel's group."""
    out_features = scales.shape[1]
    q = unpack(qweight, bits, in_features, dim=0)                              # [in, out]
    zeros = unpack_zeros(qzeros, bits, out_features)                           # [G, out]
    g = g_idx.long()
    return fake_quantize(q, scales[g], zeros[g]).t().contiguous()


def fake_quantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The same arithmetic as `dequantize`, on unpacked codes: scale * (q - zero) in float32."""
    return scale.to(torch.float32) * (q.to(torch.float32) - zero.to(torch.float32))

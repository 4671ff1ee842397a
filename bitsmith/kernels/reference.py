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
from ..quantize.grid import fake_quantize, group_index


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


# ---------------------------------------------------------------------------------------------------
# W4A16 (weight-only): y = x W^T + b with W from the GPTQ layout above.

def weight_only_linear(x: torch.Tensor, qweight, scales, qzeros, g_idx, bits: int, in_features: int,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T (+ b), accumulated in float32 on the dequantized W; returned in x.dtype."""
    W = dequantize(qweight, scales, qzeros, g_idx, bits, in_features)
    y = x.to(torch.float32) @ W.t()
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)


# ---------------------------------------------------------------------------------------------------
# Dense-and-sparse (bitsmith/layouts.py; SpQR, Dettmers et al. 2023, section 4): the GPTQ layout above, whose
# codes at the outlier positions are zero points (they dequantize to 0), and the outliers in CSR
# (formats/csr.py): values fp16 [nnz], cols int16/int32 [nnz], row_ptr int32 [out + 1].

def csr_rows(row_ptr: torch.Tensor) -> torch.Tensor:
    """Row of every CSR entry, int64 [nnz]."""
    counts = (row_ptr[1:] - row_ptr[:-1]).long()
    return torch.repeat_interleave(torch.arange(len(counts), device=row_ptr.device), counts)


def dense_sparse_dequantize(qweight, scales, qzeros, g_idx, bits: int, in_features: int, values, cols,
                            row_ptr) -> torch.Tensor:
    """W [out, in] in float32: the dequantized codes with the outliers written over them."""
    W = dequantize(qweight, scales, qzeros, g_idx, bits, in_features)
    W[csr_rows(row_ptr), cols.long()] = values.to(torch.float32)
    return W


def dense_sparse_linear(x: torch.Tensor, qweight, scales, qzeros, g_idx, bits: int, in_features: int, values,
                        cols, row_ptr) -> torch.Tensor:
    """y = x W^T on the whole dequantized W (`dense_sparse_dequantize`), accumulated in float32; x.dtype out."""
    W = dense_sparse_dequantize(qweight, scales, qzeros, g_idx, bits, in_features, values, cols, row_ptr)
    return (x.to(torch.float32) @ W.t()).to(x.dtype)


CSR_ADD_CHUNK = 1 << 22     # gathered products held at once by `csr_add`


def csr_add(y: torch.Tensor, x: torch.Tensor, values, cols, row_ptr) -> torch.Tensor:
    """y + x S^T for the CSR matrix S [N, K] (y [M, N], x [M, K]), summed in float32; y.dtype out. The
    reference of the sparse half of a dense-and-sparse product."""
    rows, cols = csr_rows(row_ptr), cols.long()
    out = y.to(torch.float32, copy=True)               # y itself is left as it was
    step = max(1, CSR_ADD_CHUNK // max(len(cols), 1))
    for m in range(0, x.shape[0], step):
        out[m:m + step].index_add_(1, rows, x[m:m + step, cols].to(torch.float32) * values.to(torch.float32))
    return out.to(y.dtype)


# ---------------------------------------------------------------------------------------------------
# W4A8 after QoQ (Lin et al. 2024, "QServe", section 4.1 progressive group quantization):
#   level 0: W  ~ channel_scale[o] * W8[o, i]            W8 int8 in the protective range +-119
#   level 1: W8 = (q[o, i] - zero[g, o]) * group_scale[g, o]   q uint4, zero and group_scale 8-bit integers
# Activations are quantized per token to int8; the product runs on int8 with int32 accumulation.
# Layout (quant_method "bitsmith"):
#   qweight        int32 [packed(in), out]   uint4 codes packed along in_features (formats.packing)
#   channel_scale  fp16  [out]
#   group_scale    int8  [G, out]            G = in / group_size, groups contiguous along in_features
#   group_zero     int8  [G, out]            true zero point in [0, 15]

ACT_QMAX = 127          # symmetric int8 activations, per token
ACT_MIN_SCALE = 1e-8    # an all-zero token keeps a finite scale


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric int8 per row of x [M, K]: (x_q int8 [M, K], scale fp32 [M]), x ~ scale * x_q."""
    x = x.to(torch.float32)
    scale = torch.clamp(x.abs().amax(dim=1) / ACT_QMAX, min=ACT_MIN_SCALE)
    x_q = torch.clamp(torch.round(x / scale[:, None]), -ACT_QMAX, ACT_QMAX).to(torch.int8)
    return x_q, scale


def qoq_int8_weight(qweight, group_scale, group_zero, in_features: int, group_size: int) -> torch.Tensor:
    """W8 = (q - zero) * group_scale as int8 [out, in] (fits int8 by the protective range)."""
    q = unpack(qweight, 4, in_features, dim=0).to(torch.int32)                 # [in, out]
    g = group_index(in_features, group_size).long()
    W8 = (q - group_zero[g].to(torch.int32)) * group_scale[g].to(torch.int32)
    return W8.t().to(torch.int8).contiguous()


def qoq_dequantize(qweight, channel_scale, group_scale, group_zero, in_features: int,
                   group_size: int) -> torch.Tensor:
    """W [out, in] in float32 from the QoQ layout."""
    W8 = qoq_int8_weight(qweight, group_scale, group_zero, in_features, group_size)
    return channel_scale.to(torch.float32)[:, None] * W8.to(torch.float32)


def w4a8_linear(x: torch.Tensor, W8: torch.Tensor, channel_scale: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = (s_tok * s_ch) * (x_q @ W8^T) (+ b): int8 x int8 -> int32, then the float epilogue; x.dtype out."""
    x2 = x.reshape(-1, x.shape[-1])
    x_q, s_tok = quantize_per_token(x2)
    acc = int8_matmul(x_q, W8.t())
    y = acc.to(torch.float32) * s_tok[:, None] * channel_scale.to(torch.float32)[None, :]
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype).reshape(*x.shape[:-1], W8.shape[0])


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [M, K] int8 @ b [K, N] int8 -> int32, exact (torch's int8 GEMM on CPU, float64 elsewhere)."""
    if a.device.type == "cpu" and a.shape[0] > 0:
        return torch._int_mm(a, b)
    return (a.to(torch.float64) @ b.to(torch.float64)).to(torch.int32)

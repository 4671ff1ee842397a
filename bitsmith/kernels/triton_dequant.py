"""Triton dequantization of the layouts whose grids are not GPTQ's: lookup tables (kernels/lut_linear.py),
per-input-channel grids (kernels/per_ic_linear.py), codebooks of pairs (kernels/vq_linear.py) and bits per group
of columns (kernels/column_bits_linear.py). All but the last keep GPTQ's
qweight (codes packed along K, one little-endian bit stream per output column; triton_w4a16.py reads it; codebooks
of pairs pack one index of 2 x bits bits per pair of inputs p = k // 2), and write W [K, N] in the activation dtype for
torch.matmul, one [BLOCK_K, BLOCK_N] tile per program:

  lookup table        W[k, n] = lut[n, code[k, n]]                          lut [N, 2^bits]
  per input channel   W[k, n] = scale[n // g, k] * (code[k, n] - zero[n // g, k])   scales, zeros [G, K]
  codebooks of pairs  W[k, n] = s[n] * C[2p // g, index[p, n], k % 2],  p = k // 2   C [G, 2^(2 bits), 2], s [N]

Bits per group of columns pack each group at its own width, one group after the other: a code sits at a bit offset
of its own in its output column's stream, which the host computes per input position (the group's first word, the
position within the group times its width) along with the input channel the position stands for; the kernel reads
the two words the code may straddle as one 64-bit stream and writes row `src[p]` of W:
  bits per group      W[src[p], n] = scale[g_p, n] * (code[p, n] - zero[g_p, n])   scales, zeros [G, N]

The per-input-channel zeros are unpacked once at load time (as the GPTQ runtime unpacks its group metadata).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..quantize.vq import index_bits
from .triton_w4a16 import _codes3, _codes_stream, _load_runs3, _unpack

BLOCK_K, BLOCK_N = 64, 64          # a whole number of packed words at every bit width (32 codes: 3 words at 3 bits;
                                   # 32 pairs: 6 words of 6-bit indices)


@triton.jit
def _codes(qweight_ptr, offs_k, offs_n, mask, K, N, BITS: tl.constexpr, BLOCK_K: tl.constexpr):
    """Codes [BLOCK_K, BLOCK_N] of the tile at rows offs_k (starting at a multiple of BLOCK_K), columns offs_n."""
    if BITS == 3:
        runs = tl.program_id(0) * (BLOCK_K // 32) + tl.arange(0, BLOCK_K // 32)
        codes = _codes3(*_load_runs3(qweight_ptr, runs, offs_n, offs_n < N, K, N))
    else:
        PER_WORD: tl.constexpr = 32 // BITS
        words = tl.load(qweight_ptr + (offs_k // PER_WORD)[:, None] * N + offs_n[None, :], mask=mask, other=0)
        codes = _unpack(words, ((offs_k % PER_WORD) * BITS)[:, None], BITS)
    return codes


@triton.jit
def _lut_kernel(qweight_ptr, lut_ptr, w_ptr, K, N, BITS: tl.constexpr, BLOCK_K: tl.constexpr,
                BLOCK_N: tl.constexpr):
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_k < K)[:, None] & (offs_n < N)[None, :]
    codes = _codes(qweight_ptr, offs_k, offs_n, mask, K, N, BITS, BLOCK_K)
    w = tl.load(lut_ptr + offs_n[None, :] * (1 << BITS) + codes, mask=mask, other=0.0)
    tl.store(w_ptr + offs_k[:, None] * N + offs_n[None, :], w.to(w_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _per_ic_kernel(qweight_ptr, scales_ptr, zeros_ptr, w_ptr, K, N, GROUP_ROWS, BITS: tl.constexpr,
                   BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_k < K)[:, None] & (offs_n < N)[None, :]
    codes = _codes(qweight_ptr, offs_k, offs_n, mask, K, N, BITS, BLOCK_K)
    meta = (offs_n // GROUP_ROWS)[None, :] * K + offs_k[:, None]
    scale = tl.load(scales_ptr + meta, mask=mask, other=0.0).to(tl.float32)
    zero = tl.load(zeros_ptr + meta, mask=mask, other=0.0).to(tl.float32)
    w = (codes.to(tl.float32) - zero) * scale
    tl.store(w_ptr + offs_k[:, None] * N + offs_n[None, :], w.to(w_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _vq_kernel(qweight_ptr, codebooks_ptr, scales_ptr, w_ptr, K, N, SPAN, INDEX_BITS: tl.constexpr,
               BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """W[k, n] = s[n] * C[2p // SPAN, index[p, n], k % 2] (p = k // 2) for one [BLOCK_K, BLOCK_N] tile."""
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_k < K)[:, None] & (offs_n < N)[None, :]
    pairs = offs_k // 2                                  # each index read for both rows of its pair
    if 32 % INDEX_BITS:
        index = _codes_stream(qweight_ptr, pairs, offs_n, mask, K // 2, N, INDEX_BITS)
    else:
        PER_WORD: tl.constexpr = 32 // INDEX_BITS
        words = tl.load(qweight_ptr + (pairs // PER_WORD)[:, None] * N + offs_n[None, :], mask=mask, other=0)
        index = _unpack(words, ((pairs % PER_WORD) * INDEX_BITS)[:, None], INDEX_BITS)
    entry = ((pairs * 2 // SPAN)[:, None] << INDEX_BITS) + index
    value = tl.load(codebooks_ptr + entry * 2 + (offs_k % 2)[:, None], mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scales_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
    w = scale[None, :] * value
    tl.store(w_ptr + offs_k[:, None] * N + offs_n[None, :], w.to(w_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _column_bits_kernel(qweight_ptr, bit_ptr, width_ptr, group_ptr, src_ptr, scales_ptr, zeros_ptr, w_ptr, K, N,
                        WORDS, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """One [BLOCK_K, BLOCK_N] tile of input positions (groups in order) and output columns (module docstring)."""
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_k = offs_k < K
    mask = in_k[:, None] & (offs_n < N)[None, :]
    bit = tl.load(bit_ptr + offs_k, mask=in_k, other=0)
    width = tl.load(width_ptr + offs_k, mask=in_k, other=1).to(tl.int64)
    group = tl.load(group_ptr + offs_k, mask=in_k, other=0)
    src = tl.load(src_ptr + offs_k, mask=in_k, other=0)
    word = (bit // 32)[:, None]
    low = tl.load(qweight_ptr + word * N + offs_n[None, :], mask=mask, other=0)
    high = tl.load(qweight_ptr + (word + 1) * N + offs_n[None, :], mask=mask & (word + 1 < WORDS), other=0)
    stream = (low.to(tl.uint32, bitcast=True).to(tl.int64)
              | (high.to(tl.uint32, bitcast=True).to(tl.int64) << 32))
    code = (stream >> (bit % 32)[:, None]) & ((1 << width[:, None]) - 1)
    meta = group[:, None] * N + offs_n[None, :]
    scale = tl.load(scales_ptr + meta, mask=mask, other=0.0).to(tl.float32)
    zero = tl.load(zeros_ptr + meta, mask=mask, other=0).to(tl.float32)
    w = (code.to(tl.float32) - zero) * scale
    tl.store(w_ptr + src[:, None] * N + offs_n[None, :], w.to(w_ptr.dtype.element_ty), mask=mask)


def _grid(K: int, N: int) -> tuple[int, int]:
    return triton.cdiv(K, BLOCK_K), triton.cdiv(N, BLOCK_N)


def lut_dequantize(qweight: torch.Tensor, lut: torch.Tensor, bits: int, K: int, dtype: torch.dtype) -> torch.Tensor:
    """W [K, N] from codes packed along K [packed(K), N] and tables [N, 2^bits]."""
    N = qweight.shape[1]
    W = torch.empty(K, N, device=qweight.device, dtype=dtype)
    _lut_kernel[_grid(K, N)](qweight, lut.contiguous(), W, K, N, BITS=bits, BLOCK_K=BLOCK_K, BLOCK_N=BLOCK_N)
    return W


def per_ic_dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, K: int,
                      group_rows: int, dtype: torch.dtype) -> torch.Tensor:
    """W [K, N] from codes packed along K [packed(K), N], scales and unpacked zeros [G, K], `group_rows` output
    rows (columns of W) per group."""
    N = qweight.shape[1]
    W = torch.empty(K, N, device=qweight.device, dtype=dtype)
    _per_ic_kernel[_grid(K, N)](qweight, scales.contiguous(), zeros.contiguous(), W, K, N, group_rows, BITS=bits,
                                BLOCK_K=BLOCK_K, BLOCK_N=BLOCK_N)
    return W


def vq_dequantize(qweight: torch.Tensor, codebooks: torch.Tensor, row_scales: torch.Tensor, bits: float, K: int,
                  group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """W [K, N] from pair indices packed along K / 2 [packed(K / 2), N], codebooks [G, 2^(2 bits), 2] of
    `group_size` inputs each (-1: all K) and row scales [N]."""
    N = qweight.shape[1]
    W = torch.empty(K, N, device=qweight.device, dtype=dtype)
    _vq_kernel[_grid(K, N)](qweight, codebooks.contiguous(), row_scales.contiguous(), W, K, N,
                            K if group_size == -1 else group_size, INDEX_BITS=index_bits(bits), BLOCK_K=BLOCK_K,
                            BLOCK_N=BLOCK_N)
    return W


def column_positions(g_idx: torch.Tensor, widths: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per input position, groups in order (kernels/column_bits_linear.py): the bit offset of its code in its output
    column's stream (int64), its group's width, its group, and the input channel it stands for (int32 each)."""
    g = g_idx.long().cpu()
    width = widths.long().cpu()
    sizes = torch.bincount(g, minlength=len(width))
    first = torch.cumsum(sizes, 0) - sizes                          # a group's first position
    words = -(-sizes * width // 32)
    start = torch.cumsum(words, 0) - words                          # and its first word
    src = torch.argsort(g, stable=True)
    group = g[src]
    bit = 32 * start[group] + (torch.arange(len(g)) - first[group]) * width[group]
    return bit, width[group].to(torch.int32), group.to(torch.int32), src.to(torch.int32)


def column_bits_dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                           positions: tuple[torch.Tensor, ...], K: int, dtype: torch.dtype) -> torch.Tensor:
    """W [K, N] from groups of codes packed one after the other at their widths [words, N] (kernels/
    column_bits_linear.py), scales and unpacked zeros [G, N], and `column_positions` (on qweight's device)."""
    N = qweight.shape[1]
    W = torch.empty(K, N, device=qweight.device, dtype=dtype)
    _column_bits_kernel[_grid(K, N)](qweight, *positions, scales.contiguous(), zeros.to(torch.int32).contiguous(),
                                     W, K, N, qweight.shape[0], BLOCK_K=BLOCK_K, BLOCK_N=BLOCK_N)
    return W

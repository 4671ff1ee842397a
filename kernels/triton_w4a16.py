"""Triton kernels for weight-only quantized linears (W4A16; 2- and 8-bit codes work the same way).

Weights stay in the GPTQ layout (kernels/reference.py): codes packed along K, `PER_WORD = 32 // BITS` codes
per int32 word, low bits first, so one word row covers PER_WORD consecutive input channels for every
output column. Group metadata is unpacked once at load time to `scales`, `zeros` fp16 [G, N]. A K-tile
never crosses a group, so one scale/zero row serves the whole tile.

  gemv        M = 1: CUDA-core dot products, split-K over the grid
  gemm        M > 1: tl.dot tiles; split-K (atomic fp32 partial sums) for small M, one pass for large M
  dequantize  W [K, N] in the activation dtype, for "dequantize once, then torch.matmul"

Codes become floats without an int-to-float conversion: `code | 0x4B000000` read as fp32 is 2^23 + code
(the magic-number trick of Marlin, arXiv 2408.11743 section 4), so (code - zero) is one subtraction.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

MAGIC = tl.constexpr(0x4B000000)       # bit pattern of 2^23 in fp32: ORing an integer < 2^23 into it adds it
MAGIC_VALUE = tl.constexpr(8388608.0)  # 2^23


@dataclass(frozen=True)
class Config:
    """One launch configuration (block sizes, split-K factor, warps, software-pipeline stages)."""
    BLOCK_N: int
    BLOCK_K: int
    SPLIT_K: int = 1
    BLOCK_M: int = 1
    num_warps: int = 4
    num_stages: int = 2


@triton.jit
def _unpack_minus_zero(words, shift, zero_plus_magic, BITS: tl.constexpr):
    """(code - zero) in fp32 for codes at bit offset `shift` of int32 `words` (magic-number conversion)."""
    code = (words >> shift) & ((1 << BITS) - 1)
    return (code | MAGIC).to(tl.float32, bitcast=True) - zero_plus_magic


@triton.jit
def _gemv_kernel(x_ptr, qweight_ptr, scales_ptr, zeros_ptr, y_ptr, K, N,
                 GROUP_SIZE: tl.constexpr, BITS: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """y[N] = x[K] @ W: each program reduces BLOCK_K-tiles of its K-split for BLOCK_N columns."""
    PER_WORD: tl.constexpr = 32 // BITS
    WORDS: tl.constexpr = BLOCK_K // PER_WORD
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = tl.arange(0, WORDS)
    n_mask = offs_n < N
    acc = tl.zeros([WORDS, BLOCK_N], dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        rows = k0 // PER_WORD + offs_w
        words = tl.load(qweight_ptr + rows[:, None] * N + offs_n[None, :],
                        mask=(rows[:, None] * PER_WORD < K) & n_mask[None, :], other=0,
                        eviction_policy="evict_first")
        g = k0 // GROUP_SIZE
        scale = tl.load(scales_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        zero = tl.load(zeros_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32) + MAGIC_VALUE
        part = tl.zeros([WORDS, BLOCK_N], dtype=tl.float32)
        for j in tl.static_range(PER_WORD):
            k = k0 + offs_w * PER_WORD + j
            xj = tl.load(x_ptr + k, mask=k < K, other=0.0).to(tl.float32)
            part += xj[:, None] * _unpack_minus_zero(words, j * BITS, zero[None, :], BITS)
        acc += part * scale[None, :]                     # sum_k x s (q - z), s constant over the tile
    y = tl.sum(acc, axis=0)
    if SPLIT_K == 1:
        tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=n_mask)
    else:
        tl.atomic_add(y_ptr + offs_n, y, mask=n_mask)


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of program `pid` in grouped order: GROUP_M row-tiles share each weight
    tile while it is in L2 (Triton tutorial 03)."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    first_m = (pid // (GROUP_M * num_n)) * GROUP_M
    rows_in_group = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % (GROUP_M * num_n)) % rows_in_group, (pid % (GROUP_M * num_n)) // rows_in_group


@triton.jit
def _gemm_kernel(x_ptr, qweight_ptr, scales_ptr, zeros_ptr, y_ptr, M, N, K, stride_xm, stride_ym,
                 GROUP_SIZE: tl.constexpr, BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr):
    """y[M, N] = x[M, K] @ W: dequantize a [BLOCK_K, BLOCK_N] tile in registers, then tl.dot."""
    PER_WORD: tl.constexpr = 32 // BITS
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m, pid_n = grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    shift = (offs_k % PER_WORD) * BITS
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        k = k0 + offs_k
        k_mask = k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :],
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        words = tl.load(qweight_ptr + (k // PER_WORD)[:, None] * N + offs_n[None, :],
                        mask=k_mask[:, None] & n_mask[None, :], other=0, eviction_policy="evict_first")
        g = k0 // GROUP_SIZE
        scale = tl.load(scales_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        zero = tl.load(zeros_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32) + MAGIC_VALUE
        w = _unpack_minus_zero(words, shift[:, None], zero[None, :], BITS) * scale[None, :]
        acc = tl.dot(x, w.to(x.dtype), acc)
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    y_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)
    else:
        tl.atomic_add(y_ptrs, acc, mask=y_mask)


@triton.jit
def _dequantize_kernel(qweight_ptr, scales_ptr, zeros_ptr, w_ptr, K, N,
                       GROUP_SIZE: tl.constexpr, BITS: tl.constexpr, BLOCK_K: tl.constexpr,
                       BLOCK_N: tl.constexpr):
    """W[K, N] = scale * (code - zero), one [BLOCK_K, BLOCK_N] tile per program."""
    PER_WORD: tl.constexpr = 32 // BITS
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_k < K)[:, None] & (offs_n < N)[None, :]
    words = tl.load(qweight_ptr + (offs_k // PER_WORD)[:, None] * N + offs_n[None, :], mask=mask, other=0)
    g = (tl.program_id(0) * BLOCK_K) // GROUP_SIZE
    scale = tl.load(scales_ptr + g * N + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
    zero = tl.load(zeros_ptr + g * N + offs_n, mask=offs_n < N, other=0.0).to(tl.float32) + MAGIC_VALUE
    w = _unpack_minus_zero(words, ((offs_k % PER_WORD) * BITS)[:, None], zero[None, :], BITS) * scale[None, :]
    tl.store(w_ptr + offs_k[:, None] * N + offs_n[None, :], w.to(w_ptr.dtype.element_ty), mask=mask)


def tile_k(config_k: int, group_size: int, bits: int) -> int:
    """The K-tile: a power of two, at most one group and a divisor of it, a whole number of packed words."""
    bk = min(config_k, group_size)
    if bk & (bk - 1) or group_size % bk or bk % (32 // bits):
        raise ValueError(f"K-tile {bk} is not a power of two that divides group {group_size} "
                         f"into whole {bits}-bit words")
    return bk


def gemv(x, qweight, scales, zeros, group_size: int, bits: int, config: Config) -> torch.Tensor:
    """y [1, N] = x [1, K] @ W; fp32 atomics across K-splits when SPLIT_K > 1."""
    K, N = x.shape[1], qweight.shape[1]
    bk = tile_k(config.BLOCK_K, group_size, bits)
    split = min(config.SPLIT_K, triton.cdiv(K, bk))
    y = torch.empty(1, N, device=x.device, dtype=x.dtype) if split == 1 else \
        torch.zeros(1, N, device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(N, config.BLOCK_N), split)
    _gemv_kernel[grid](x, qweight, scales, zeros, y, K, N, GROUP_SIZE=group_size, BITS=bits,
                       BLOCK_N=config.BLOCK_N, BLOCK_K=bk, SPLIT_K=split,
                       num_warps=config.num_warps, num_stages=config.num_stages)
    return y.to(x.dtype)


def gemm(x, qweight, scales, zeros, group_size: int, bits: int, config: Config) -> torch.Tensor:
    """y [M, N] = x [M, K] @ W with tl.dot; fp32 atomics across K-splits when SPLIT_K > 1."""
    M, K = x.shape
    N = qweight.shape[1]
    bk = tile_k(config.BLOCK_K, group_size, bits)
    if min(config.BLOCK_M, config.BLOCK_N, bk) < 16:
        raise ValueError("tl.dot needs tiles of at least 16 in every dimension")
    split = min(config.SPLIT_K, triton.cdiv(K, bk))
    y = torch.empty(M, N, device=x.device, dtype=x.dtype) if split == 1 else \
        torch.zeros(M, N, device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(M, config.BLOCK_M) * triton.cdiv(N, config.BLOCK_N), split)
    _gemm_kernel[grid](x, qweight, scales, zeros, y, M, N, K, x.stride(0), y.stride(0),
                       GROUP_SIZE=group_size, BITS=bits, BLOCK_M=config.BLOCK_M, BLOCK_N=config.BLOCK_N,
                       BLOCK_K=bk, SPLIT_K=split, GROUP_M=8,
                       num_warps=config.num_warps, num_stages=config.num_stages)
    return y.to(x.dtype)


def dequantize(qweight, scales, zeros, K: int, group_size: int, bits: int, dtype: torch.dtype,
               config: Config) -> torch.Tensor:
    """W [K, N] in `dtype` (the operand of torch.matmul in the large-M path)."""
    N = qweight.shape[1]
    bk = tile_k(config.BLOCK_K, group_size, bits)
    W = torch.empty(K, N, device=qweight.device, dtype=dtype)
    grid = (triton.cdiv(K, bk), triton.cdiv(N, config.BLOCK_N))
    _dequantize_kernel[grid](qweight, scales, zeros, W, K, N, GROUP_SIZE=group_size, BITS=bits,
                             BLOCK_K=bk, BLOCK_N=config.BLOCK_N,
                             num_warps=config.num_warps, num_stages=config.num_stages)
    return W


def split_k(tiles: int, K: int, block_k: int, sms: int) -> int:
    """Smallest power-of-two K-split that gives about four programs per SM (never more splits than K-tiles)."""
    split = 1
    while tiles * split < 4 * sms and split * 2 <= triton.cdiv(K, block_k):
        split *= 2
    return split


def gemv_configs(N: int, K: int, group_size: int, sms: int) -> list[Config]:
    """Hand-picked GEMV candidates for Hopper-class GPUs; the first is the default."""
    out = []
    for bn, bk, warps in ((128, 128, 4), (64, 128, 4), (256, 128, 8), (128, 256, 8), (64, 256, 4)):
        bk = min(bk, group_size)
        split = split_k(triton.cdiv(N, bn), K, bk, sms)
        out += [Config(bn, bk, split, 1, warps, 2), Config(bn, bk, max(split // 2, 1), 1, warps, 3)]
    return list(dict.fromkeys(out))


def gemm_configs(M: int, N: int, K: int, group_size: int, sms: int, splitk: bool) -> list[Config]:
    """Hand-picked GEMM candidates: split-K tiles for small M, large tiles without split for large M."""
    if splitk:
        bm = 16 if M <= 16 else (32 if M <= 32 else 64)
        shapes = ((bm, 64, 128, 4, 3), (bm, 128, 128, 4, 3), (bm, 64, 64, 4, 4), (bm, 128, 64, 4, 4))
    else:
        shapes = ((128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4), (128, 128, 128, 8, 2))
    return tile_configs(shapes, M, N, K, group_size, sms, splitk)


def tile_configs(shapes, M: int, N: int, K: int, group_size: int, sms: int, splitk: bool) -> list[Config]:
    """Configs from (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) rows: BLOCK_K clipped to the group, and
    split-K chosen to fill the GPU's SMs when asked for."""
    out = []
    for bm, bn, bk, warps, stages in shapes:
        bk = min(bk, group_size)
        tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
        split = split_k(tiles, K, bk, sms) if splitk else 1
        out.append(Config(bn, bk, split, bm, warps, stages))
    return list(dict.fromkeys(out))


DEQUANTIZE_CONFIG = Config(BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=1)

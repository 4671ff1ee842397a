"""Triton kernels for weight-only quantized linears (W4A16; 2-, 3- and 8-bit codes work the same way; 5- and 6-bit
codes are dequantized only, for the "dequantize once, then torch.matmul" path).

Weights stay in the GPTQ layout (kernels/reference.py): codes packed along K as one little-endian bit stream
per output column, code k at stream bits [k*BITS, (k+1)*BITS). For 2, 4 and 8 bits that is `PER_WORD =
32 // BITS` codes per int32 word, low bits first, so one word row covers PER_WORD consecutive input channels
for every output column. For 3 bits a run of 32 codes fills 3 words and codes 10 and 21 of each run straddle
two words; a K-tile is then a whole number of runs. Group metadata is unpacked once at load time to
`scales`, `zeros` fp16 [G, N]. A K-tile never crosses a group, so one scale/zero row serves the whole tile.

  gemv        M = 1: CUDA-core dot products, split-K over the grid
  gemm        M > 1: tl.dot tiles; split-K (atomic fp32 partial sums) for small M, one pass for large M
  dequantize  W [K, N] in the activation dtype, for "dequantize once, then torch.matmul"

Codes become floats without an int-to-float conversion: `code | 0x4B000000` read as fp32 is 2^23 + code
(the magic-number trick of Marlin, arXiv 2408.11743 section 4), so (code - zero) is one subtraction.
"""
from __future__ import annotations

import math
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
def _minus_zero(code, zero_plus_magic):
    """(code - zero) in fp32 for integer codes below 2^23 (magic-number conversion)."""
    return (code | MAGIC).to(tl.float32, bitcast=True) - zero_plus_magic


@triton.jit
def _unpack(words, shift, BITS: tl.constexpr):
    """Codes at bit offset `shift` of int32 `words` (2, 4, 8 bits: no code crosses a word)."""
    return (words >> shift) & ((1 << BITS) - 1)


@triton.jit
def _load_runs3(qweight_ptr, runs, offs_n, n_mask, K, N):
    """The 3 words (w0, w1, w2), each [len(runs), len(offs_n)], of runs of 32 3-bit codes (0 past K). The
    packed stream has ceil(3K / 32) words, so the last run may lack its last words: they read as 0."""
    words = (3 * K + 31) // 32
    row = (runs * 3)[:, None]
    ptrs = qweight_ptr + row * N + offs_n[None, :]
    mask = (runs[:, None] * 32 < K) & n_mask[None, :]
    w0 = tl.load(ptrs, mask=mask & (row < words), other=0, eviction_policy="evict_first")
    w1 = tl.load(ptrs + N, mask=mask & (row + 1 < words), other=0, eviction_policy="evict_first")
    w2 = tl.load(ptrs + 2 * N, mask=mask & (row + 2 < words), other=0, eviction_policy="evict_first")
    return w0, w1, w2


@triton.jit
def _code3(w0, w1, w2, I: tl.constexpr):
    """Code I of each run of 32 3-bit codes packed in words w0, w1, w2: stream bits [3I, 3I + 3)."""
    if I < 10:
        code = w0 >> (3 * I)
    elif I == 10:
        code = ((w0 >> 30) & 0x3) | (w1 << 2)            # bits 30-31 of w0, bit 0 of w1
    elif I < 21:
        code = w1 >> (3 * I - 32)
    elif I == 21:
        code = ((w1 >> 31) & 0x1) | (w2 << 1)            # bit 31 of w1, bits 0-1 of w2
    else:
        code = w2 >> (3 * I - 64)
    return code & 0x7


@triton.jit
def _codes3(w0, w1, w2):
    """All codes of runs packed in words w0, w1, w2 [R, N], as a [32 * R, N] tile in stream order: code i of a
    run at bit 3i % 32 of word 3i // 32, codes 10 and 21 continuing into the next word."""
    i = tl.arange(0, 32)[None, :, None]
    shift = ((3 * i) % 32).to(tl.uint32)
    a, b, c = w0[:, None, :], w1[:, None, :], w2[:, None, :]
    lo = tl.where(i < 11, a, tl.where(i < 22, b, c)).to(tl.uint32, bitcast=True)
    hi = tl.where(i == 10, b, tl.where(i == 21, c, 0)).to(tl.uint32, bitcast=True)
    # logical shifts; hi is 0 unless the code straddles, and `& 31` keeps the shift below 32 at shift 0
    codes = ((lo >> shift) | (hi << ((32 - shift) & 31))) & 0x7
    return tl.reshape(codes, [32 * w0.shape[0], w0.shape[1]])


@triton.jit
def _codes_stream(qweight_ptr, offs_k, offs_n, mask, K, N, BITS: tl.constexpr):
    """Codes [len(offs_k), len(offs_n)] of any width, read straight off the bit stream: code k at stream bit
    p = k * BITS, in word p // 32 from bit p % 32, continuing into the next word when it straddles (5 and 6 bits;
    0 past the ceil(K * BITS / 32) words the stream has). Two loads per code: the dequantize path's loader for
    the widths the GEMM kernels do not unroll."""
    words = (BITS * K + 31) // 32
    bit = offs_k * BITS
    word = (bit // 32)[:, None]
    ptrs = qweight_ptr + word * N + offs_n[None, :]
    lo = tl.load(ptrs, mask=mask, other=0).to(tl.uint32, bitcast=True)
    hi = tl.load(ptrs + N, mask=mask & (word + 1 < words), other=0).to(tl.uint32, bitcast=True)
    shift = (bit % 32)[:, None].to(tl.uint32)
    hi = tl.where(shift + BITS > 32, hi, 0)
    # logical shifts; `& 31` keeps the left shift below 32 where shift is 0 (hi is 0 there)
    return (((lo >> shift) | (hi << ((32 - shift) & 31))) & ((1 << BITS) - 1)).to(tl.int32)


@triton.jit
def _gemv_words(x_ptr, qweight_ptr, scales_ptr, zeros_ptr, K, N, offs_n, n_mask, pid_k,
                GROUP_SIZE: tl.constexpr, BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                SPLIT_K: tl.constexpr):
    """GEMV partial sums [words, BLOCK_N] over this program's K-split, PER_WORD codes per word (2, 4, 8 bits)."""
    PER_WORD: tl.constexpr = 32 // BITS
    WORDS: tl.constexpr = BLOCK_K // PER_WORD
    offs_w = tl.arange(0, WORDS)
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
            part += xj[:, None] * _minus_zero(_unpack(words, j * BITS, BITS), zero[None, :])
        acc += part * scale[None, :]                     # sum_k x s (q - z), s constant over the tile
    return acc


@triton.jit
def _gemv_runs3(x_ptr, qweight_ptr, scales_ptr, zeros_ptr, K, N, offs_n, n_mask, pid_k,
                GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """GEMV partial sums [runs, BLOCK_N] over this program's K-split for 3-bit codes, 32 codes in 3 words per run."""
    RUNS: tl.constexpr = BLOCK_K // 32
    offs_r = tl.arange(0, RUNS)
    acc = tl.zeros([RUNS, BLOCK_N], dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        runs = k0 // 32 + offs_r
        w0, w1, w2 = _load_runs3(qweight_ptr, runs, offs_n, n_mask, K, N)
        g = k0 // GROUP_SIZE
        scale = tl.load(scales_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        zero = tl.load(zeros_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32) + MAGIC_VALUE
        part = tl.zeros([RUNS, BLOCK_N], dtype=tl.float32)
        for i in tl.static_range(32):
            k = runs * 32 + i
            xi = tl.load(x_ptr + k, mask=k < K, other=0.0).to(tl.float32)
            part += xi[:, None] * _minus_zero(_code3(w0, w1, w2, i), zero[None, :])
        acc += part * scale[None, :]
    return acc


@triton.jit
def _gemv_kernel(x_ptr, qweight_ptr, scales_ptr, zeros_ptr, y_ptr, K, N,
                 GROUP_SIZE: tl.constexpr, BITS: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """y[N] = x[K] @ W: each program reduces BLOCK_K-tiles of its K-split for BLOCK_N columns."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    if BITS == 3:
        acc = _gemv_runs3(x_ptr, qweight_ptr, scales_ptr, zeros_ptr, K, N, offs_n, n_mask, pid_k,
                          GROUP_SIZE, BLOCK_N, BLOCK_K, SPLIT_K)
    else:
        acc = _gemv_words(x_ptr, qweight_ptr, scales_ptr, zeros_ptr, K, N, offs_n, n_mask, pid_k,
                          GROUP_SIZE, BITS, BLOCK_N, BLOCK_K, SPLIT_K)
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
    if BITS == 3:
        offs_r = tl.arange(0, BLOCK_K // 32)             # tiles are whole runs of 32 codes (3 words)
    else:
        shift = (offs_k % PER_WORD) * BITS
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        k = k0 + offs_k
        k_mask = k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :],
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        if BITS == 3:
            codes = _codes3(*_load_runs3(qweight_ptr, k0 // 32 + offs_r, offs_n, n_mask, K, N))
        else:
            words = tl.load(qweight_ptr + (k // PER_WORD)[:, None] * N + offs_n[None, :],
                            mask=k_mask[:, None] & n_mask[None, :], other=0, eviction_policy="evict_first")
            codes = _unpack(words, shift[:, None], BITS)
        g = k0 // GROUP_SIZE
        scale = tl.load(scales_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        zero = tl.load(zeros_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32) + MAGIC_VALUE
        w = _minus_zero(codes, zero[None, :]) * scale[None, :]
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
    g = (tl.program_id(0) * BLOCK_K) // GROUP_SIZE
    scale = tl.load(scales_ptr + g * N + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
    zero = tl.load(zeros_ptr + g * N + offs_n, mask=offs_n < N, other=0.0).to(tl.float32) + MAGIC_VALUE
    if BITS == 3:
        runs = tl.program_id(0) * (BLOCK_K // 32) + tl.arange(0, BLOCK_K // 32)
        codes = _codes3(*_load_runs3(qweight_ptr, runs, offs_n, offs_n < N, K, N))
    elif 32 % BITS:
        codes = _codes_stream(qweight_ptr, offs_k, offs_n, mask, K, N, BITS)
    else:
        words = tl.load(qweight_ptr + (offs_k // PER_WORD)[:, None] * N + offs_n[None, :], mask=mask, other=0)
        codes = _unpack(words, ((offs_k % PER_WORD) * BITS)[:, None], BITS)
    w = _minus_zero(codes, zero[None, :]) * scale[None, :]
    tl.store(w_ptr + offs_k[:, None] * N + offs_n[None, :], w.to(w_ptr.dtype.element_ty), mask=mask)


def tile_k(config_k: int, group_size: int, bits: int) -> int:
    """The K-tile: a power of two, at most one group and a divisor of it, a whole number of packed words
    (32 // gcd(32, bits) codes: one word of 8 codes at 4 bits, one run of 32 codes in 3 words at 3 bits)."""
    bk = min(config_k, group_size)
    if bk & (bk - 1) or group_size % bk or bk % (32 // math.gcd(32, bits)):
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

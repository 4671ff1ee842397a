"""Triton kernel: W4A8 GEMM for QoQ weights on INT8 tl.dot with INT32 accumulation.

QServe (Lin et al. 2024) section 5: the uint4 codes of a K-tile become the level-0 int8 weights in registers,
W8 = q * s2 - z * s2 ("subtraction after multiplication": one multiply-add per weight; the result lies in
int8 by the protective range), then int8 x int8 -> int32 on tensor cores. The only
float work is the epilogue y = acc * s_tok * s1 (per token, per output channel).
Layout: see kernels/reference.py (W4A8 section); codes are packed along K exactly as in the GPTQ layout.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_w4a16 import Config, grouped_tile, tile_configs, tile_k


@triton.jit
def _w4a8_gemm_kernel(xq_ptr, token_scale_ptr, qweight_ptr, group_scale_ptr, group_zero_ptr,
                      channel_scale_ptr, y_ptr, M, N, K, stride_xm, stride_ym,
                      GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m, pid_n = grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    shift = (offs_k % 8) * 4
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        k = k0 + offs_k
        k_mask = k < K
        a = tl.load(xq_ptr + offs_m[:, None] * stride_xm + k[None, :],
                    mask=m_mask[:, None] & k_mask[None, :], other=0)
        words = tl.load(qweight_ptr + (k // 8)[:, None] * N + offs_n[None, :],
                        mask=k_mask[:, None] & n_mask[None, :], other=0, eviction_policy="evict_first")
        g = k0 // GROUP_SIZE
        s2 = tl.load(group_scale_ptr + g * N + offs_n, mask=n_mask, other=0).to(tl.int32)
        z = tl.load(group_zero_ptr + g * N + offs_n, mask=n_mask, other=0).to(tl.int32)
        q = (words >> shift[:, None]) & 0xF
        w = (q * s2[None, :] - (z * s2)[None, :]).to(tl.int8)      # (q - z) * s2, exact in int8
        acc = tl.dot(a, w, acc, out_dtype=tl.int32)
    token_scale = tl.load(token_scale_ptr + offs_m, mask=m_mask, other=0.0)
    channel_scale = tl.load(channel_scale_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    y = acc.to(tl.float32) * token_scale[:, None] * channel_scale[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    y_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=y_mask)
    else:
        tl.atomic_add(y_ptrs, y, mask=y_mask)


def w4a8_gemm(x_q, token_scale, qweight, group_scale, group_zero, channel_scale, group_size: int,
              out_dtype: torch.dtype, config: Config) -> torch.Tensor:
    """y [M, N] = (token_scale * channel_scale) * (x_q @ W8) with W8 = (q - z) * s2; y in out_dtype."""
    M, K = x_q.shape
    N = qweight.shape[1]
    bk = tile_k(config.BLOCK_K, group_size, 4)
    if min(config.BLOCK_M, config.BLOCK_N) < 16 or bk < 32:
        raise ValueError("int8 tl.dot needs BLOCK_M, BLOCK_N >= 16 and BLOCK_K >= 32")
    split = min(config.SPLIT_K, triton.cdiv(K, bk))
    if split > 1:
        y = torch.zeros(M, N, device=x_q.device, dtype=torch.float32)
    else:
        y = torch.empty(M, N, device=x_q.device, dtype=out_dtype)
    grid = (triton.cdiv(M, config.BLOCK_M) * triton.cdiv(N, config.BLOCK_N), split)
    _w4a8_gemm_kernel[grid](x_q, token_scale, qweight, group_scale, group_zero, channel_scale, y,
                            M, N, K, x_q.stride(0), y.stride(0), GROUP_SIZE=group_size,
                            BLOCK_M=config.BLOCK_M, BLOCK_N=config.BLOCK_N, BLOCK_K=bk, SPLIT_K=split,
                            GROUP_M=8, num_warps=config.num_warps, num_stages=config.num_stages)
    return y.to(out_dtype)


def w4a8_configs(M: int, N: int, K: int, group_size: int, sms: int, splitk: bool) -> list[Config]:
    """Hand-picked candidates: split-K tiles while memory-bound (small M), large int8 tiles beyond."""
    if splitk:
        bm = 16 if M <= 16 else (32 if M <= 32 else 64)
        shapes = ((bm, 64, 128, 4, 3), (bm, 128, 128, 4, 3), (bm, 128, 64, 4, 4))
    else:
        shapes = ((128, 128, 128, 8, 3), (128, 256, 128, 8, 3), (64, 128, 128, 4, 4), (128, 128, 64, 4, 4))
    return tile_configs(shapes, M, N, K, group_size, sms, splitk)

"""Triton kernel: dynamic per-token symmetric INT8 quantization of activations (the A8 of W4A8).

x_q = round(x / s), s = max(max_k |x_k| / 127, 1e-8) per row, rounding half to even, exactly as
`reference.quantize_per_token` (IEEE division via div_rn, so GPU and CPU agree bit for bit).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import ACT_MIN_SCALE, ACT_QMAX


@triton.jit
def _round_half_even(v):
    """Round to nearest, ties to even (torch.round), for |v| < 2^23."""
    f = tl.floor(v)
    d = v - f
    up = (d > 0.5) | ((d == 0.5) & (f % 2 != 0))
    return tl.where(up, f + 1.0, f)


@triton.jit
def _quantize_per_token_kernel(x_ptr, xq_ptr, scale_ptr, K, stride_x, stride_q,
                               QMAX: tl.constexpr, MIN_SCALE: tl.constexpr, BLOCK_K: tl.constexpr):
    """One program per row: an absmax pass, then a scale-round-clamp pass."""
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_K)
    amax = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + row * stride_x + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.math.div_rn(tl.max(amax, axis=0), QMAX), MIN_SCALE)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + row * stride_x + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(_round_half_even(tl.math.div_rn(x, scale)), -QMAX), QMAX)
        tl.store(xq_ptr + row * stride_q + k0 + offs, q.to(tl.int8), mask=k0 + offs < K)
    tl.store(scale_ptr + row, scale)


def quantize_per_token(x: torch.Tensor, block_k: int = 1024,
                       num_warps: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (fp16/bf16/fp32, unit stride along K) -> (x_q int8 [M, K], scale fp32 [M])."""
    M, K = x.shape
    x_q = torch.empty(M, K, device=x.device, dtype=torch.int8)
    scale = torch.empty(M, device=x.device, dtype=torch.float32)
    block_k = min(block_k, triton.next_power_of_2(K))
    _quantize_per_token_kernel[(M,)](x, x_q, scale, K, x.stride(0), x_q.stride(0), QMAX=float(ACT_QMAX),
                                     MIN_SCALE=ACT_MIN_SCALE, BLOCK_K=block_k, num_warps=num_warps)
    return x_q, scale

"""Triton kernel for the sparse half of a dense-and-sparse linear: y += x S^T with S [N, K] in CSR
(formats/csr.py), added in place to the dense product y [M, N].

One program per output feature n and block of BLOCK_M rows of x: it walks row n of S (row_ptr[n] ..
row_ptr[n+1]) BLOCK_NNZ entries at a time, gathers those columns of x and accumulates in fp32, then adds the
sum to its column of y. Every element of y is written by exactly one program, so no atomics are needed.
A dense-and-sparse layer keeps the same small count of outliers in every row (about 1 % of K), so the
programs are evenly loaded (the load-balancing concern of SqueezeLLM's kernels does not arise).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_NNZ = 16


@triton.jit
def _csr_add_kernel(x_ptr, y_ptr, values_ptr, cols_ptr, row_ptr_ptr, M, stride_xm, stride_ym,
                    BLOCK_M: tl.constexpr, BLOCK_NNZ: tl.constexpr):
    n = tl.program_id(0)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    start = tl.load(row_ptr_ptr + n)
    end = tl.load(row_ptr_ptr + n + 1)
    acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    for j in range(start, end, BLOCK_NNZ):
        offs = j + tl.arange(0, BLOCK_NNZ)
        ok = offs < end
        v = tl.load(values_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        c = tl.load(cols_ptr + offs, mask=ok, other=0)
        xv = tl.load(x_ptr + offs_m[:, None] * stride_xm + c[None, :], mask=m_mask[:, None] & ok[None, :],
                     other=0.0).to(tl.float32)
        acc += tl.sum(xv * v[None, :], axis=1)
    y_ptrs = y_ptr + offs_m * stride_ym + n
    y = tl.load(y_ptrs, mask=m_mask, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y.dtype), mask=m_mask)


def csr_add_(y: torch.Tensor, x: torch.Tensor, values: torch.Tensor, cols: torch.Tensor,
             row_ptr: torch.Tensor) -> torch.Tensor:
    """y [M, N] += x [M, K] S^T in place (x row-major with unit column stride, cols int32); returns y."""
    M, N = y.shape
    if M == 0 or N == 0:
        return y
    if x.stride(1) != 1 or y.stride(1) != 1:
        raise ValueError("csr_add_ needs x and y with contiguous rows")
    block_m = min(64, triton.next_power_of_2(M))
    _csr_add_kernel[(N, triton.cdiv(M, block_m))](x, y, values, cols, row_ptr, M, x.stride(0), y.stride(0),
                                                  BLOCK_M=block_m, BLOCK_NNZ=BLOCK_NNZ)
    return y

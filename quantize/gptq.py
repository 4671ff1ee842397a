"""GPTQ: column-by-column quantization with second-order error compensation.

Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers"
(ICLR 2023), Algorithm 1: lazy batch updates over blocks of columns, the upper Cholesky factor of H^-1,
optional act-order (descending diag(H)) and static groups.
"""
from __future__ import annotations

import torch

from ..kernels.reference import fake_quantize
from .rtn import QuantizedWeight, check_finite, fit_grid, quantize_codes

DAMP_RETRIES = (1.0, 10.0, 100.0, 1000.0, 1e4)   # multiples of the requested damping, tried in float64


def inverse_cholesky(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of (H + lambda I)^-1, lambda = damp * mean(diag H) (GPTQ section 4, step 3).

    Tries float32 first, then float64 with growing damping; a factor with NaN/Inf counts as a failure
    (cholesky_inverse can return NaN silently on nearly singular H). Returns (U, damp actually used).
    """
    n = H.shape[0]
    attempts = [(torch.float32, 1.0)] + [(torch.float64, f) for f in DAMP_RETRIES]
    for dtype, factor in attempts:
        Hd = H.to(dtype)
        lam = damp * factor * torch.diag(Hd).mean()
        Hd = Hd + lam * torch.eye(n, dtype=dtype)
        L, info = torch.linalg.cholesky_ex(Hd)
        if info.item() != 0:
            continue
        U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
        if info.item() == 0 and torch.isfinite(U).all():
            return U.to(torch.float32), damp * factor
    raise ValueError(f"Hessian is not positive definite even with damping {damp * DAMP_RETRIES[-1]:g}")


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int = -1, sym: bool = False,
                  act_order: bool = False, static_groups: bool = False, damp: float = 0.01,
                  blocksize: int = 128, mse: bool = False) -> QuantizedWeight:
    """Quantize W [out, in] given the layer Hessian H [in, in] = 2 X X^T / n."""
    check_finite(W)
    if not torch.isfinite(H).all():
        raise ValueError("Hessian has NaN/Inf values (non-finite calibration activations)")
    W = W.to(torch.float32).clone()
    H = H.to(torch.float32).clone()
    rows, cols = W.shape
    g = cols if group_size == -1 else group_size
    if group_size != -1:
        blocksize = g if g >= blocksize else blocksize - blocksize % g   # groups never straddle blocks

    grid = fit_grid(W, bits, sym, mse) if group_size == -1 else None
    dead = torch.diag(H) == 0                                    # inputs never active: weight is free
    H[dead, dead] = 1
    W[:, dead] = 0
    static = ([fit_grid(W[:, i:i + g], bits, sym, mse) for i in range(0, cols, g)]
              if static_groups and group_size != -1 else None)

    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(cols)
    W, H = W[:, perm], H[perm][:, perm]
    Hinv, _ = inverse_cholesky(H, damp)

    codes = torch.zeros(rows, cols, dtype=torch.uint8)
    Q = torch.zeros(rows, cols, dtype=torch.float32)
    group_of = torch.zeros(cols, dtype=torch.int64)              # group number of each permuted column
    scales, zeros = [], []
    loss = 0.0
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = i1 + i
            if static is not None:
                group_of[col] = perm[col] // g
                grid = static[group_of[col]]
            elif group_size != -1:
                if col % g == 0:
                    grid = fit_grid(W1[:, i:i + g], bits, sym, mse)
                    scales.append(grid[0])
                    zeros.append(grid[1])
                group_of[col] = col // g
            w, d = W1[:, i], Hinv1[i, i]
            q = quantize_codes(w, grid[0], grid[1], bits)
            codes[:, col] = q
            Q[:, col] = fake_quantize(q, grid[0], grid[1])
            err = (w - Q[:, col]) / d
            loss += float((err * err).sum()) / 2                 # (w-q)^2 / [H^-1]_qq^2 / 2, eq. (2)
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]                     # lazy batch update

    inv = torch.argsort(perm)
    codes, Q, group_of = codes[:, inv], Q[:, inv], group_of[inv]
    if static is not None:
        scales, zeros = [s for s, _ in static], [z for _, z in static]
    elif group_size == -1:
        scales, zeros = [grid[0]], [grid[1]]
    natural = torch.equal(group_of, torch.arange(cols) // g)
    g_idx = None if natural else group_of.to(torch.int32)
    return QuantizedWeight(codes, torch.stack(scales), torch.stack(zeros), g_idx, bits, group_size, sym, Q, loss)

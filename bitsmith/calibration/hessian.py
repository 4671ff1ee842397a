"""Layer Hessians of the GPTQ objective ||WX - QX||^2: H = 2 X X^T / n, accumulated as a running mean."""
from __future__ import annotations

import numpy as np
import torch
from scipy.linalg.blas import ssyrk


class Hessian:
    """Running mean over tokens of 2 x x^T (GPTQ section 3, eq. (1)), in float32.

    Only the upper triangle is accumulated (BLAS syrk: half the flops of a full X^T X); `H` returns the
    symmetric matrix.
    """

    def __init__(self, columns: int):
        self._upper = np.zeros((columns, columns), dtype=np.float32, order="F")
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        """Add a batch of inputs [..., columns] (every leading position is one token)."""
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float32).contiguous().numpy()
        t = x.shape[0]
        beta = self.n / (self.n + t)
        self.n += t
        # x.T is a Fortran-ordered [columns, t] view: C <- alpha * A A^T + beta * C, upper triangle only
        self._upper = ssyrk(2.0 / self.n, x.T, beta=beta, c=self._upper, trans=0, lower=0, overwrite_c=1)

    @property
    def H(self) -> torch.Tensor:
        upper = torch.from_numpy(np.triu(self._upper))
        return upper + torch.triu(upper, diagonal=1).t()

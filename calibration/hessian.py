"""Layer Hessians of the GPTQ objective ||WX - QX||^2: H = 2 X X^T / n, accumulated as a running mean."""
from __future__ import annotations

import torch


class Hessian:
    """Running mean over tokens of 2 x x^T (GPTQ section 3, eq. (1)), in float32."""

    def __init__(self, columns: int):
        self.H = torch.zeros(columns, columns, dtype=torch.float32)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        """Add a batch of inputs [..., columns] (every leading position is one token)."""
        x = x.reshape(-1, x.shape[-1]).to(torch.float32)
        t = x.shape[0]
        self.H.mul_(self.n / (self.n + t))
        self.n += t
        self.H.addmm_(x.t(), x, alpha=2.0 / self.n)

"""Layer Hessians of the GPTQ objective ||WX - QX||^2: H = 2 X X^T / n over the n calibration tokens."""
from __future__ import annotations

import torch
from scipy.linalg.blas import ssyrk

ROWS_AT_ONCE = 256         # rows of the sums updated at once (bounds the temporaries of `accumulate`)


class Hessian:
    """2/n sum_t x_t x_t^T (GPTQ section 3, eq. (1)), accumulated so that the order of the batches does not
    matter.

    Each batch's X^T X is formed in float32 (on CPU by BLAS syrk: the upper triangle only, half the flops of a
    full product) and added to a float64 sum with its rounding error kept apart (Knuth's TwoSum, TAOCP vol. 2,
    4.2.2): the pair holds the sum of the batches to about 2^-77 of it whatever the order of the additions, so
    the float32 H is the same bit for bit when the batches are shared out among processes and the partial sums
    `merge`d (bitsmith/distributed.py). It takes three times the memory of a float32 matrix.
    """

    def __init__(self, columns: int, device: torch.device | str = "cpu"):
        self.columns, self.device = columns, torch.device(device)
        self.sum = torch.zeros(columns, columns, dtype=torch.float64, device=self.device)
        self.error = torch.zeros(columns, columns, dtype=torch.float32, device=self.device)
        self.n = 0
        self.drift: torch.Tensor | None = None   # 2 (X - X~) X~^T / n of GPTAQ's paired inputs (pipeline.py)

    def add(self, x: torch.Tensor) -> None:
        """Add a batch of inputs [..., columns] (every leading position is one token)."""
        x = x.detach().reshape(-1, x.shape[-1]).to(self.device, torch.float32)
        if self.device.type == "cpu":
            # x.T is a Fortran-ordered [columns, t] view: C <- A A^T, upper triangle only
            xtx = torch.from_numpy(ssyrk(1.0, x.contiguous().numpy().T, trans=0, lower=0))
        else:
            xtx = x.t() @ x                     # TF32 off (bitsmith/device.py), as the reference GPTQ code
        self.accumulate(xtx, x.shape[0])

    def accumulate(self, part: torch.Tensor, tokens: int, error: torch.Tensor | None = None) -> None:
        """sum <- sum + part (float64), the rounding error of the addition (and `error`, the error term of a
        partial sum being merged) added to `error`; `tokens` more tokens."""
        add_exactly(self.sum, self.error, part, error)
        self.n += tokens

    def merge(self, other: Hessian) -> None:
        """Add the sums of another Hessian of the same layer (another process's share of the tokens)."""
        self.accumulate(other.sum.to(self.device), other.n, other.error.to(self.device))

    @property
    def H(self) -> torch.Tensor:
        """The float32 Hessian (symmetric; from the upper triangle)."""
        upper = torch.triu((self.sum + self.error.to(torch.float64)) * (2.0 / max(self.n, 1))).to(torch.float32)
        return upper + torch.triu(upper, diagonal=1).t()


def add_exactly(total: torch.Tensor, error: torch.Tensor, part: torch.Tensor,
                part_error: torch.Tensor | None = None) -> None:
    """In place, on the upper triangle: total <- total + part (float64) and error <- error + the rounding error
    of that addition (+ part_error). A few rows at a time, so that the temporaries stay small; `part` may be
    float32 (a batch's X^T X) and is left as it was."""
    for rows in range(0, total.shape[0], ROWS_AT_ONCE):
        upper = (slice(rows, rows + ROWS_AT_ONCE), slice(rows, None))
        s, p = total[upper], part[upper].to(torch.float64, copy=True)
        summed = s + p                                  # TwoSum (Knuth): summed + (a + b) is exactly s + p
        back = summed - s
        a = summed - back
        torch.sub(s, a, out=a)
        p.sub_(back).add_(a)
        if part_error is not None:
            p.add_(part_error[upper])
        error[upper] += p
        s.copy_(summed)

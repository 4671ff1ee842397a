"""Scales refitted to GPTQ's codes.

GPTQ fits each group's grid once, when the loop reaches the group, and then rounds column by column against it;
the codes it ends with were chosen knowing the whole row's error feedback, the scales were not. With the codes q
and zero points z fixed, a row's dequantized weights are linear in its scales, Q(s) = sum_g s_g (q - z) [g], so
the scales minimizing GPTQ's own objective, the output error (w - Q(s)) H (w - Q(s))^T, are the solution of a
G x G least-squares system per row:

    A s = b,   A_gh = (q - z)_g H_gh (q - z)_h^T,   b_g = (q - z)_g (H w^T)_g

(the normal equations of the scale step of alternating minimization, as in the weight-only "scale search" that
AWQ and OmniQuant do by grid search or gradient; here closed form, since the codes are fixed). A row keeps its
GPTQ scales unless the refitted ones, rounded to fp16 as stored, give it a lower error, so the error never grows.
"""
from __future__ import annotations

import torch


def refit_scales(W: torch.Tensor, H: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 group: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scales fp16 [G, out], the loss each row gains [out]) for W [out, in] quantized as codes [out, in] with
    grids scales/zeros [G, out], input channel i in group `group[i]`, H [in, in] = 2 X X^T / n; the gain is in
    GPTQ's loss units, ||(W - Q) X||^2 / n per row, i.e. (W - Q) H (W - Q)^T / 2."""
    G = scales.shape[0]
    D = codes.to(torch.float32) - zeros.to(torch.float32)[group].t()          # q - z, [out, in]
    member = torch.nn.functional.one_hot(group, G).to(torch.float32)          # [in, G]
    A = torch.empty(len(D), G, G, dtype=torch.float64)
    for h in range(G):
        cols = (group == h).nonzero().squeeze(1)
        A[:, :, h] = ((D * (D[:, cols] @ H[cols])) @ member).double()
    b = ((D * (W @ H)) @ member).double()                                     # [out, G]
    old = scales.t().double()
    ridge = 1e-9 * A.diagonal(dim1=1, dim2=2).mean(1, keepdim=True).clamp_min(1e-30)
    # a group whose codes all sit on the zero point leaves its scale undetermined: the ridge holds it at GPTQ's
    s = torch.linalg.solve(A + torch.diag_embed(ridge.expand(-1, G)), (b + ridge * old).unsqueeze(2)).squeeze(2)
    s16 = s.to(torch.float16)
    valid = torch.isfinite(s16).all(1) & (s16 > 0).all(1)

    def error(x: torch.Tensor) -> torch.Tensor:                               # (w-Q)H(w-Q)^T - wHw^T
        return (x.unsqueeze(1) @ A @ x.unsqueeze(2)).squeeze(2).squeeze(1) - 2 * (b * x).sum(1)

    before = error(old)
    after = torch.where(valid, error(torch.where(valid[:, None], s16.double(), old)), before)
    better = after < before
    new = torch.where(better[:, None], s16, scales.t())
    return new.t().contiguous(), torch.where(better, (before - after) / 2, torch.zeros_like(before)).float()

"""QoQ progressive group quantization of one weight matrix, for W4A8 layers.

Lin et al., "QServe: W4A8KV4 Quantization and System Co-design" (2024), section 4.1:
  level 0: per-output-channel symmetric INT8, W ~ s1 * W8, with W8 in the protective range [-119, 119];
  level 1: per-group UINT4 with a zero point on the INT8 values, W8 ~ (q - z) * s2, where the group scale
           s2 and the zero z are small integers, so (q - z) * s2 is again an int8 and the GEMM runs on int8
           tensor cores with one float multiply per output (s1 times the activation scale).
With a Hessian H = 2 X X^T / n the columns are quantized in order with GPTQ's error compensation
(Frantar et al. 2023, Algorithm 1): s1 is fixed from the original W, s2 and z are fitted when the column
loop enters a group, as GPTQ does for grouped grids.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..formats.packing import pack
from .gptq import inverse_cholesky
from .rtn import check_finite

PROTECTIVE_INT8 = 119   # QServe 4.1: level-0 range for which (q - z) * s2 never leaves int8 (|.| <= 119 + 16/2)
UINT4_MAX = 15


@dataclass
class QoQWeight:
    """A QoQ-quantized W [out, in]: the tensors a checkpoint stores, and the weight they load as."""
    qweight: torch.Tensor        # int32 [packed(in), out]  uint4 codes packed along in_features
    channel_scale: torch.Tensor  # fp16  [out]              s1
    group_scale: torch.Tensor    # int8  [G, out]           s2, in [1, 16]
    group_zero: torch.Tensor     # int8  [G, out]           z, in [0, 15]
    Q: torch.Tensor              # fp32  [out, in]          s1 * (q - z) * s2, exactly what W4A8Linear loads
    group_size: int

    def tensors(self) -> dict[str, torch.Tensor]:
        """Checkpoint tensors of the layer (names are the W4A8Linear buffer names)."""
        return {"qweight": self.qweight, "channel_scale": self.channel_scale,
                "group_scale": self.group_scale, "group_zero": self.group_zero}



def qoq_fake_quantize(q: torch.Tensor, zero: torch.Tensor, group_scale: torch.Tensor,
                      channel_scale: torch.Tensor) -> torch.Tensor:
    """channel_scale * ((q - zero) * group_scale) in float32; the integer factor is exact."""
    W8 = (q.to(torch.int32) - zero.to(torch.int32)) * group_scale.to(torch.int32)
    return channel_scale.to(torch.float32) * W8.to(torch.float32)

def channel_scale(W: torch.Tensor) -> torch.Tensor:
    """Level 0: s1 = max|W_row| / 119 in fp16 (a zero row keeps scale 1)."""
    amax = W.abs().amax(dim=1)
    s1 = torch.where(amax > 0, amax / PROTECTIVE_INT8, torch.ones_like(amax))
    return torch.clamp(s1, min=2.0**-24).to(torch.float16)          # smallest fp16 step, never zero


def to_int8(W: torch.Tensor, s1: torch.Tensor) -> torch.Tensor:
    """Level 0 codes W8 = clamp(round(W / s1), -119, 119), as float integers."""
    return torch.clamp(torch.round(W / s1.to(torch.float32)[:, None]), -PROTECTIVE_INT8, PROTECTIVE_INT8)


def fit_group(W8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Level 1 grid of groups W8 [..., g]: integer scale and zero [...] of an asymmetric uint4 min-max grid."""
    lo = torch.clamp(W8.amin(dim=-1), max=0)
    hi = torch.clamp(W8.amax(dim=-1), min=0)
    s2 = torch.clamp(torch.round((hi - lo) / UINT4_MAX), min=1)
    z = torch.clamp(torch.round(-lo / s2), 0, UINT4_MAX)
    return s2, z


def to_uint4(W8: torch.Tensor, s2: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Level 1 codes q = clamp(round(W8 / s2) + z, 0, 15); s2, z broadcast over W8's trailing dims."""
    return torch.clamp(torch.round(W8 / s2) + z, 0, UINT4_MAX)


def qoq_quantize(W: torch.Tensor, H: torch.Tensor | None = None, group_size: int = 128, damp: float = 0.01,
                 blocksize: int = 128) -> QoQWeight:
    """Progressive W4A8 quantization of W [out, in]; with H [in, in], GPTQ error compensation."""
    check_finite(W)
    W = W.to(torch.float32).clone()
    cols = W.shape[1]
    g = cols if group_size == -1 else group_size
    if cols % g:
        raise ValueError(f"in_features {cols} is not a multiple of the group size {g}")
    s1 = channel_scale(W)
    if H is None:
        codes, s2, z = _round_to_nearest(W, s1, g)
    else:
        codes, s2, z = _gptq(W, H, s1, g, damp, blocksize)
    group = torch.arange(cols, device=W.device) // g
    Q = qoq_fake_quantize(codes, z[:, group], s2[:, group], s1[:, None])
    return QoQWeight(qweight=pack(codes.t().to(torch.uint8), 4, dim=0),
                     channel_scale=s1,
                     group_scale=s2.t().to(torch.int8).contiguous(),
                     group_zero=z.t().to(torch.int8).contiguous(),
                     Q=Q, group_size=group_size)


def _round_to_nearest(W: torch.Tensor, s1: torch.Tensor, g: int):
    """Both levels by rounding, all groups at once: codes [out, in], s2 and z [out, G]."""
    rows, cols = W.shape
    W8 = to_int8(W, s1).reshape(rows, cols // g, g)
    s2, z = fit_group(W8)
    codes = to_uint4(W8, s2[..., None], z[..., None]).reshape(rows, cols)
    return codes.to(torch.int32), s2.to(torch.int32), z.to(torch.int32)


def _gptq(W: torch.Tensor, H: torch.Tensor, s1: torch.Tensor, g: int, damp: float, blocksize: int):
    """Column loop with GPTQ error compensation (Frantar et al. 2023, Algorithm 1, lazy batch updates)."""
    if not torch.isfinite(H).all():
        raise ValueError("Hessian has NaN/Inf values (non-finite calibration activations)")
    rows, cols = W.shape
    H = H.to(torch.float32).clone()
    dead = torch.diag(H) == 0                                    # inputs never active: the weight is free
    H[dead, dead] = 1
    W[:, dead] = 0
    Hinv, _ = inverse_cholesky(H, damp)
    blocksize = g if g >= blocksize else blocksize - blocksize % g   # groups never straddle blocks
    codes = torch.zeros(rows, cols, dtype=torch.int32, device=W.device)
    s2s, zs = [], []
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            if (i1 + i) % g == 0:                                # entering a group: fit level 1 on current W
                s2, z = fit_group(to_int8(W1[:, i:i + g], s1))
                s2s.append(s2)
                zs.append(z)
            w = W1[:, i]
            q = to_uint4(to_int8(w[:, None], s1)[:, 0], s2, z)
            codes[:, i1 + i] = q.to(torch.int32)
            err = (w - qoq_fake_quantize(q, z, s2, s1)) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]                     # lazy batch update
    return codes, torch.stack(s2s, 1).to(torch.int32), torch.stack(zs, 1).to(torch.int32)

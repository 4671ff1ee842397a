"""Rotated weights: the same model, written in another orthonormal basis (QuaRot / SpinQuant's computational
invariance, Ashkboos et al. 2024, section 4; incoherence processing, QuIP#, Tseng et al. 2024).

An RMSNorm without its weight commutes with any orthogonal Q: rms(xQ) = rms(x). So once every norm weight is
folded into the linears that read the norm (W diag(g)), the residual stream can be carried as x Q instead of x:

    embedding       E  -> E Q
    reads residual  W  -> W diag(g) Q           (q, k, v, gate, up; g: the norm before them, set to 1)
    writes residual W  -> Q^T W, b -> Q^T b     (o, down)
    lm_head         W  -> W diag(g_final) Q     (a tied head becomes a head of its own)

and the values of every attention head by one orthogonal H of the head's width (v's rows H^T per head, o's
columns H per head): attention mixes values linearly across positions, never across their coordinates. The model
computes the same function; its weight matrices are incoherent (no row or column carries the bulk of a
matrix's energy), which is what per-group grids quantize well. Q is a randomized Hadamard matrix (Kronecker
product with a random orthogonal one where the width is not a power of two), from a seed.

`RotatedSource` wraps a model source and hands out its tensors rotated, one at a time, so the whole pipeline
(measurement, plan, GPTQ, tuning, evaluation against the unrotated model) runs on it unchanged; the checkpoint
is an ordinary one, loaded by every loader with no extra operation at run time.
"""
from __future__ import annotations

import hashlib
import math

import torch

from .calibration.adapter import family_of
from .formats.source import BLOCK, ModelSource

VERSION = 1          # of the construction below: part of the rotated source's fingerprint


def hadamard(n: int) -> torch.Tensor:
    """Sylvester's orthonormal Hadamard matrix of order n (a power of two)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester's construction needs a power of two, not {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """Haar-distributed orthogonal matrix (QR of a Gaussian matrix, signs fixed by R's diagonal; Mezzadri 2007)."""
    q, r = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=generator))
    return q * torch.sign(torch.diagonal(r))


def randomized_hadamard(n: int, generator: torch.Generator) -> torch.Tensor:
    """diag(s) (O_m kron H_p): p the largest power of two dividing n, O_m random orthogonal of order n / p,
    s random signs. Orthogonal; a plain randomized Hadamard matrix when n is a power of two."""
    p = n & -n
    signs = torch.randint(0, 2, (n,), generator=generator, dtype=torch.float64) * 2 - 1
    return signs[:, None] * torch.kron(random_orthogonal(n // p, generator).contiguous(), hadamard(p))


class Rotation:
    """The two orthogonal matrices of a model's rotation: `residual` (hidden x hidden), `head` (head_dim square)."""

    def __init__(self, hidden: int, head_dim: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.seed = seed
        self.residual = randomized_hadamard(hidden, generator).to(torch.float32)
        self.head = randomized_hadamard(head_dim, generator).to(torch.float32)

    def per_head(self, w: torch.Tensor, rows: bool) -> torch.Tensor:
        """H^T applied to each head's block of rows (v's output), or H to each head's block of columns (o's input)."""
        d = self.head.shape[0]
        if rows:
            return torch.einsum("ji,hj...->hi...", self.head, w.reshape(-1, d, *w.shape[1:])).reshape(w.shape)
        return (w.reshape(w.shape[0], -1, d) @ self.head).reshape(w.shape)


class RotatedSource(ModelSource):
    """`inner`, every tensor rotated as the module docstring says, in its own dtype; the lm_head always present.
    `inner` must have passed `check_shapes`: its config's widths size the rotation's matrices."""

    def __init__(self, inner: ModelSource, seed: int = 0):
        config = inner.config
        self.inner, self.family = inner, family_of(config)
        self.name, self.finite = inner.name, inner.finite
        hidden = config["hidden_size"]
        self.rotation = Rotation(hidden, config.get("head_dim") or hidden // config["num_attention_heads"], seed)
        self.config = {**config, "tie_word_embeddings": False}
        self.tied = self.family.lm_head not in inner
        self.readers = {linear: norm for norm, linears in self.family.norms for linear in linears}

    def keys(self) -> list[str]:
        return self.inner.keys() + ([self.family.lm_head] if self.tied else [])

    def numel(self, name: str) -> int:
        return self.inner.numel(self.family.embed if name == self.family.lm_head and self.tied else name)

    def shape(self, name: str) -> list[int]:
        return self.inner.shape(self.family.embed if name == self.family.lm_head and self.tied else name)

    def tokenizer(self):
        return self.inner.tokenizer()

    def fingerprint(self) -> str:
        return hashlib.sha256(f"{self.inner.fingerprint()} rotated v{VERSION} seed {self.rotation.seed}".encode()).hexdigest()

    def get(self, name: str) -> torch.Tensor:
        f, q = self.family, self.rotation.residual
        if name == f.lm_head:
            head = self.inner.get(f.embed if self.tied else f.lm_head)
            gain = self.inner.get(f.final_norm).to(torch.float32)
            return ((head.to(torch.float32) * gain) @ q).to(head.dtype)
        tensor = self.inner.get(name)
        dtype, w = tensor.dtype, tensor.to(torch.float32)
        if name == f.embed:
            return (w @ q).to(dtype)
        if name == f.final_norm:
            return torch.ones_like(tensor)
        block = BLOCK.match(name)
        if block is None:
            return tensor
        local, _, kind = name[block.end():].rpartition(".")
        if local in {norm for norm, _ in f.norms} and kind == "weight":
            return torch.ones_like(tensor)
        if local in self.readers and kind == "weight":
            gain = self.inner.get(f"{block.group(0)}{self.readers[local]}.weight").to(torch.float32)
            w = (w * gain) @ q
        if local == f.value:
            w = self.rotation.per_head(w, rows=True)
        if local == f.attention_out and kind == "weight":
            w = self.rotation.per_head(w, rows=False)
        if local in f.residual_writers:
            w = q.T @ w
        return w.to(dtype)

    def describe(self) -> dict:
        """What a checkpoint's manifest records of the rotation."""
        r = self.rotation
        return {"residual": _construction(r.residual.shape[0]), "head": _construction(r.head.shape[0]),
                "seed": r.seed, "untied_lm_head": self.tied, "version": VERSION}


def _construction(n: int) -> str:
    p = n & -n
    return f"signs x hadamard({p})" if p == n else f"signs x (orthogonal({n // p}) kron hadamard({p}))"

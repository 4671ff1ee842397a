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
matrix's energy), which is what per-group grids quantize well. Q is a randomized Hadamard matrix diag(s) H
(QuaRot, section 3), H a true Hadamard matrix from Sylvester's and Paley's constructions wherever they make one of
the width (576 = 12 x 12 x 4), so that every input coordinate is spread evenly over all of them; a Kronecker
product with a random orthogonal factor only where they do not. The signs come from a seed.

`RotatedSource` wraps a model source and hands out its tensors rotated, one at a time, so the whole pipeline
(measurement, plan, GPTQ, tuning, evaluation against the unrotated model) runs on it unchanged; the checkpoint
is an ordinary one, loaded by every loader with no extra operation at run time.
"""
from __future__ import annotations

import functools
import hashlib
import math

import torch

from .calibration.adapter import family_of
from .formats.source import BLOCK, ModelSource

VERSION = 2          # of the construction below: part of the rotated source's fingerprint


def sylvester(n: int) -> torch.Tensor:
    """Sylvester's orthonormal Hadamard matrix of order n (a power of two)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester's construction needs a power of two, not {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def _is_prime(q: int) -> bool:
    return q > 1 and all(q % f for f in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q_ij = chi(j - i), chi the quadratic character of the integers mod a prime q (Paley 1933)."""
    chi = torch.tensor([0] + [1 if pow(a, (q - 1) // 2, q) == 1 else -1 for a in range(1, q)], dtype=torch.float64)
    return chi[(torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q]


def paley_type(n: int) -> int | None:
    """1 or 2 where Paley's construction of that type makes a Hadamard matrix of order n from a prime q (type I:
    n = q + 1, q = 3 mod 4; type II: n = 2 (q + 1), q = 1 mod 4), else None."""
    if (n - 1) % 4 == 3 and _is_prime(n - 1):
        return 1
    if n % 2 == 0 and (n // 2 - 1) % 4 == 1 and _is_prime(n // 2 - 1):
        return 2
    return None


def paley(n: int) -> torch.Tensor:
    """Paley's orthonormal Hadamard matrix of order n (`paley_type`): type I is I + the skew matrix
    [[0, 1], [-1, Q]]; type II is the symmetric conference matrix C = [[0, 1], [1, Q]] with each 0 made
    [[1, -1], [-1, -1]] and each +-1 made +-[[1, 1], [1, -1]]."""
    kind = paley_type(n)
    if kind == 1:
        s = torch.zeros(n, n, dtype=torch.float64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, _jacobsthal(n - 1)
        return (torch.eye(n, dtype=torch.float64) + s) / math.sqrt(n)
    if kind == 2:
        m = n // 2
        c = torch.ones(m, m, dtype=torch.float64)
        c[0, 0], c[1:, 1:] = 0, _jacobsthal(m - 1)
        unit = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        return (torch.kron(c, unit) + torch.kron(torch.eye(m, dtype=torch.float64), zero)) / math.sqrt(n)
    raise ValueError(f"Paley's constructions make no Hadamard matrix of order {n}")


@functools.cache
def hadamard_factors(n: int) -> tuple[int, ...] | None:
    """Orders whose Kronecker product is a Hadamard matrix of order n: the smallest Paley orders that are not
    powers of two, then one power of two (Sylvester); () for n = 1; None where these constructions give none
    (n is then not 1, 2 or a multiple of 4, or needs a construction not made here). Cached: the search backtracks
    over divisors, and a rotation asks for the same widths more than once."""
    if n >= 1 and not n & (n - 1):
        return (n,) if n > 1 else ()
    for m in range(3, n + 1):
        if n % m == 0 and m & (m - 1) and paley_type(m) is not None:
            rest = hadamard_factors(n // m)
            if rest is not None:
                return (m, *rest)
    return None


def hadamard(n: int) -> torch.Tensor:
    """An orthonormal Hadamard matrix of order n, every entry +-1/sqrt(n): Sylvester's for a power of two, else the
    Kronecker product of Paley matrices and a Sylvester one (576 = 12 x 12 x 4; 960 = 12 x 20 x 4)."""
    factors = hadamard_factors(n)
    if factors is None:
        raise ValueError(f"no Hadamard matrix of order {n} from Sylvester's and Paley's constructions")
    h = torch.ones(1, 1, dtype=torch.float64)
    for m in factors:
        h = torch.kron(h, paley(m) if m & (m - 1) else sylvester(m))
    return h


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """Haar-distributed orthogonal matrix (QR of a Gaussian matrix, signs fixed by R's diagonal; Mezzadri 2007)."""
    q, r = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=generator))
    return q * torch.sign(torch.diagonal(r))


def randomized_hadamard(n: int, generator: torch.Generator) -> torch.Tensor:
    """diag(s) H: H a Hadamard matrix of order n where `hadamard` makes one, else O_m kron H_p with p the largest
    power of two dividing n and O_m random orthogonal of order n / p; s random signs. Orthogonal."""
    signs = torch.randint(0, 2, (n,), generator=generator, dtype=torch.float64) * 2 - 1
    if hadamard_factors(n) is not None:
        return signs[:, None] * hadamard(n)
    p = n & -n
    return signs[:, None] * torch.kron(random_orthogonal(n // p, generator).contiguous(), sylvester(p))


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
    factors = hadamard_factors(n)
    if factors is not None:
        return f"signs x hadamard({n})" + (f" = {' kron '.join(map(str, factors))}" if len(factors) > 1 else "")
    p = n & -n
    return f"signs x (orthogonal({n // p}) kron hadamard({p}))"

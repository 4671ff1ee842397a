"""Vector quantization of pairs of weights with GPTQ's error feedback (GPTVQ, van Baalen et al. 2024, "GPTVQ: The
Blessing of Dimensionality for LLM Quantization", sections 3.1-3.2, in two dimensions).

Consecutive inputs (2p, 2p + 1) of every row o form one point, coded by the index q[o, p] of one of K = 2^(2 bits)
entries (bits 2, 2.5, 3, 3.5 or 4: indices of 4 to 8 bits a pair) of a codebook shared by all rows and the
`group_size` inputs of one column block g, each row scaled by its own factor s_o (fp16; GPTVQ's blockwise data
normalization, one scale per row here):
  W[o, 2p + t] = s_o C[g(2p), q[o, p], t],   t = 0, 1
so a weight costs `bits` bits, the codebook 2^(2 bits) x 2 x 16 bits per block and the row scale 16 bits per row.
A pair of scalar levels can only fill a square grid of points; a codebook puts its K points where the (scaled) pairs
are dense, which is the gain of vector over scalar quantization at equal bits (GPTVQ, table 1).

The codebook of a block is the k-means of its scaled pairs, each coordinate weighted by its input's sensitivity
H_jj s_o^2 (the error w - q of weight (o, j) costs about H_jj (w - q)^2; the row's scale brings the error back to
the weight's units), fitted once on the unquantized weights (`codebooks`). The codes are then chosen by GPTQ's loop
a pair of columns at a time: for every entry k of the pair's codebook the loop's loss after both columns,
  e0 = (w0 - c_k0) / U00,   e1 = (w1 - e0 U01 - c_k1) / U11,   loss_k = e0^2 + e1^2
(U the upper Cholesky factor of H^-1, w1 first updated by column 0's error as GPTQ would), and the entry of least
loss is taken: GPTQ's own objective minimised jointly over the pair, exactly. The pairs run in act-order by their
summed H_jj when asked; a pair always keeps its two columns next to each other.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .gptq import prepare
from .grid import FP16_TINY

KMEANS_ITERS = 25            # Lloyd steps of a codebook of up to 64 entries (from a product grid: it keeps gaining
KMEANS_ITERS_128 = 12        # to about 25), of 128 and of 256 entries, whose steps cost 2 and 4 times more and
KMEANS_ITERS_256 = 8         # gain less
KMEANS_POINTS = 1 << 13      # pairs a codebook is fitted on at most (`importance_sample`): 128 per entry at 3 bits


@dataclass
class VQWeight:
    """A quantized [out, in] matrix as codes of pairs into per-block codebooks; `Q` is exactly what the checkpoint
    holds."""
    codes: torch.Tensor            # uint8 [out, in / 2], each < 2^(2 bits)
    codebooks: torch.Tensor        # fp16 [G, 2^(2 bits), 2]
    scales: torch.Tensor           # fp16 [out], each row's factor
    bits: float                    # per weight: 2, 2.5, 3, 3.5 or 4
    group_size: int                # inputs per codebook; -1: one codebook for the whole matrix
    Q: torch.Tensor                # float32 [out, in] = scales[o] * codebooks[g, codes[o, p], t]
    loss: float = 0.0              # GPTQ's sum of the loop's losses, as every other quantizer reports it
    sym: bool = False


def index_bits(bits: float) -> int:
    """Bits of one pair's index at `bits` bits per weight (2 bits; a half-integer `bits` gives an odd width)."""
    width = 2 * bits
    if width != int(width):
        raise ValueError(f"codebooks of pairs take whole or half bits per weight, not {bits}")
    return int(width)


def entries(bits: float) -> int:
    """Codebook entries of `bits` bits per weight: one index of 2 bits per pair."""
    return 1 << index_bits(bits)


def kmeans_iters(k: int) -> int:
    """Lloyd steps for a codebook of k entries."""
    return KMEANS_ITERS if k <= 64 else KMEANS_ITERS_128 if k <= 128 else KMEANS_ITERS_256


def span(group_size: int, in_features: int) -> int:
    """Inputs per codebook."""
    return in_features if group_size == -1 else group_size


def dequantize(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """W [out, in] float32 from codes [out, in / 2], codebooks [G, K, 2] and row scales [out] (module docstring):
    s_o times the entry, each factor first read as stored (fp16), the product exact in float32."""
    values = lookup(codebooks.to(torch.float32), flat_index(codes, codebooks.shape[1], group_size))
    return scales.to(torch.float32)[:, None] * values


def flat_index(codes: torch.Tensor, k: int, group_size: int) -> torch.Tensor:
    """Where weight (o, 2p + t) reads the flattened codebooks [G * k * 2]: entry (block of 2p, codes[o, p], t);
    int64 [out, in]."""
    out, pairs = codes.shape
    block = pair_blocks(pairs, group_size).to(codes.device)
    first = (block[None, :] * k + codes.long()) * 2
    return torch.stack([first, first + 1], dim=2).reshape(out, 2 * pairs)


def lookup(codebooks: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The entries [out, in] of the codebooks at `flat_index`; differentiable in the codebooks (a gather of the
    flattened books, whose backward is a scatter-add: far cheaper on CPU than advanced indexing's)."""
    return codebooks.reshape(1, -1).expand(index.shape[0], -1).gather(1, index)


def pair_blocks(pairs: int, group_size: int) -> torch.Tensor:
    """The block (codebook) of every pair p of a row of `pairs` pairs, [pairs]."""
    return torch.arange(pairs) * 2 // span(group_size, 2 * pairs)


def nearest_entries(X: torch.Tensor, codebooks: torch.Tensor, group_size: int, m: int) -> torch.Tensor:
    """The m entries of least Euclidean distance to every pair X [out, pairs, 2] in its block's codebook
    (codebooks [G, K, 2]), nearest first, as flat entry indices g K + k: int64 [out, pairs, min(m, K)]."""
    books = codebooks.to(torch.float32)
    k = books.shape[1]
    block = pair_blocks(X.shape[1], group_size)
    found = torch.empty(*X.shape[:2], min(m, k), dtype=torch.long)
    for g in range(books.shape[0]):
        at = (block == g).nonzero().squeeze(1)
        if not at.numel():
            continue
        dist = (X[:, at, None, :].to(torch.float32) - books[g]).square().sum(dim=3)             # [out, n, K]
        found[:, at] = torch.topk(dist, min(m, k), dim=2, largest=False, sorted=True).indices + g * k
    return found


def row_scales(W: torch.Tensor) -> torch.Tensor:
    """Each row's root mean square as fp16 (at least the smallest fp16 above 0): the rows' factors s_o."""
    rms = W.to(torch.float32).square().mean(dim=1).sqrt()
    return rms.clamp(min=FP16_TINY, max=65504.0).to(torch.float16)


def weighted_kmeans2(X: torch.Tensor, weight: torch.Tensor, k: int, iters: int = KMEANS_ITERS) -> torch.Tensor:
    """Centroids [k, 2] of the points X [n, 2] minimising sum_i sum_t weight_it (x_it - c(x_i)_t)^2 (Lloyd's
    algorithm under a weighted distance per point: the assignment by the expanded square, two matrix products; each
    coordinate of a centroid the weighted mean of its points' coordinate). Started from a product grid of weighted
    quantiles (`product_grid`, k a power of two); an entry left without points moves onto the point of largest weighted
    error, so no entry is wasted."""
    X, weight = X.to(torch.float32), weight.to(torch.float32).clamp(min=0) + 1e-12
    n = X.shape[0]
    if n <= k:                                         # fewer points than entries: each point is an entry
        return torch.cat([X, X[:1].expand(k - n, 2)]) if n else torch.zeros(k, 2)
    C = product_grid(X, weight, k)
    wx = weight * X
    features = torch.cat([weight, -2 * wx], dim=1)                                 # [n, 4]
    for _ in range(iters):
        assign = nearest_entry(features, C)
        total = torch.zeros(k, 2).index_add_(0, assign, wx)
        mass = torch.zeros(k, 2).index_add_(0, assign, weight)
        moved = torch.where(mass > 1e-11, total / mass.clamp(min=1e-30), C)
        empty = torch.bincount(assign, minlength=k) == 0
        if empty.any():
            err = (weight * (X - moved[assign]).square()).sum(dim=1)
            worst = torch.topk(err, int(empty.sum())).indices
            moved[empty.nonzero().squeeze(1)] = X[worst]
        if torch.equal(moved, C):
            break
        C = moved
    return C


def importance_sample(X: torch.Tensor, weight: torch.Tensor, points: int,
                      generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`points` of the points X [n, 2], drawn with replacement with probability p_i proportional to their weighted
    square norm (plus its mean, so that every point can be drawn), each weighted by 1 / (points p_i): the sum of the
    weighted errors stays an unbiased estimate of the whole (Horvitz-Thompson), and the rare large pairs, which a
    uniform draw misses and whose errors cost most, are in the fit."""
    size = (weight * X.square()).sum(dim=1)
    p = size + size.mean() + 1e-30
    p = p / p.sum()
    pick = torch.multinomial(p, points, replacement=True, generator=generator)
    return X[pick], weight[pick] / (points * p[pick, None])


def product_grid(X: torch.Tensor, weight: torch.Tensor, k: int) -> torch.Tensor:
    """The k = m0 m1 points of the product of m_t levels of coordinate t (m0 = m1 for k = 4^b; m0 = 2 m1 for
    k = 2 4^b), each at the weighted quantiles (i + 1/2) / m_t of that coordinate: a scalar quantizer of the pairs,
    where Lloyd's steps start."""
    m1 = 1 << (k.bit_length() - 1) // 2
    levels = []
    for t, m in enumerate((k // m1, m1)):
        order = torch.argsort(X[:, t])
        mass = torch.cumsum(weight[order, t], 0)
        at = torch.searchsorted(mass, (torch.arange(m) + 0.5) / m * mass[-1]).clamp(max=X.shape[0] - 1)
        levels.append(X[order[at], t])
    return torch.cartesian_prod(*levels)


def nearest_entry(features: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """Index of each point's entry of least weighted distance sum_t w_t (x_t - c_t)^2 = const + w . c^2 - 2 (w x) . c,
    one matrix product of the points' features [w, -2 w x] [n, 4] with the entries' [c^2, c] [k, 4]. (`min`'s
    index is argmin's, first of ties, at half its cost on CPU: torch's argmin over the last dimension is scalar.)"""
    return (features @ torch.cat([C.square(), C], dim=1).t()).min(dim=1).indices


def codebooks(W: torch.Tensor, H: torch.Tensor, bits: float, group_size: int, scales: torch.Tensor,
              points: int = KMEANS_POINTS, seed: int = 0) -> torch.Tensor:
    """The fp16 codebooks [G, 2^(2 bits), 2] of W [out, in] (module docstring): per block of `group_size` inputs,
    the weighted k-means of at most `points` of its scaled pairs (a seeded draw)."""
    iters = kmeans_iters(entries(bits))
    cols = W.shape[1]
    g = span(group_size, cols)
    s = scales.to(torch.float32)
    sensitivity = torch.diag(H).to(torch.float32).clamp(min=0)
    generator = torch.Generator().manual_seed(seed)
    books = []
    for c0 in range(0, cols, g):
        X = (W[:, c0:c0 + g].to(torch.float32) / s[:, None]).reshape(-1, 2)          # [out * pairs, 2]
        weight = (s[:, None, None] ** 2 * sensitivity[c0:c0 + g].reshape(1, -1, 2)).reshape(-1, 2)
        if X.shape[0] > points:
            X, weight = importance_sample(X, weight, points, generator)
        books.append(weighted_kmeans2(X, weight, entries(bits), iters))
    return torch.stack(books).clamp(-65504.0, 65504.0).to(torch.float16)


def pair_order(H: torch.Tensor, act_order: bool) -> torch.Tensor:
    """The column order of the loop: pairs by descending summed H_jj with act-order, else as they are; the two
    columns of a pair stay next to each other."""
    cols = H.shape[0]
    pairs = torch.arange(cols // 2)
    if act_order:
        pairs = torch.argsort(torch.diag(H).reshape(-1, 2).sum(dim=1), descending=True, stable=True)
    return torch.stack([2 * pairs, 2 * pairs + 1], dim=1).reshape(-1)


def gptq_vq(W: torch.Tensor, H: torch.Tensor, bits: float, group_size: int = 128, act_order: bool = False,
            damp: float = 0.01, blocksize: int = 128, fit: torch.Tensor | None = None,
            keep: bool = True) -> tuple[VQWeight | None, torch.Tensor]:
    """W [out, in] (in even) as codes of pairs into codebooks of 2^(2 bits) entries per block of `group_size` inputs,
    chosen by GPTQ's loop given H = 2 X X^T / n (module docstring). The codebooks are fitted on `fit` (default W:
    a measurement passes the whole matrix while it quantizes a sample of its rows). Returns the weight (None unless
    `keep`) and every row's loss, sum over columns of (w - q)^2 / [H^-1]_qq^2 / 2 as GPTQ's."""
    weights, losses = gptq_vq_configs(W, H, [(bits, group_size)], act_order, damp, blocksize, fit, keep)
    return (weights[0] if keep else None), losses[0]


def gptq_vq_configs(W: torch.Tensor, H: torch.Tensor, configs: list[tuple[float, int]], act_order: bool = False,
                    damp: float = 0.01, blocksize: int = 128, fit: torch.Tensor | None = None,
                    keep: bool = True) -> tuple[list[VQWeight], torch.Tensor]:
    """`gptq_vq` under each (bits, group size) of `configs`, the loop's column order and factor of H^-1 computed
    once; the weights (empty unless `keep`) and the rows' losses [len(configs), out]."""
    cols = W.shape[1]
    for _, group_size in configs:
        if cols % 2 or (group_size != -1 and group_size % 2):
            raise ValueError(f"vector quantization codes pairs of inputs: {cols} inputs and groups of {group_size} "
                             "must be even")
    dead = torch.diag(H) == 0                                     # inputs never active: `prepare` zeroes them
    reference = (W if fit is None else fit).to(torch.float32).masked_fill(dead, 0)
    W, H, perm, Hinv = prepare(W, H, act_order, damp, perm=pair_order(H, act_order))
    scales, fit_scales = row_scales(W), row_scales(reference)
    inv = torch.argsort(perm[0::2] // 2)                                         # pairs back to their own order
    weights, losses = [], []
    for bits, group_size in configs:
        books = codebooks(reference, H, bits, group_size, fit_scales)
        codes, loss = pair_loop(W[:, perm], Hinv, books, scales, perm[0::2] // span(group_size, cols), blocksize,
                                keep)
        losses.append(loss)
        if keep:
            codes = codes[:, inv]
            weights.append(VQWeight(codes, books, scales, bits, group_size,
                                    dequantize(codes, books, scales, group_size), float(loss.sum())))
    return weights, torch.stack(losses)


def pair_loop(work: torch.Tensor, Hinv: torch.Tensor, books: torch.Tensor, scales: torch.Tensor,
              block_of: torch.Tensor, blocksize: int, keep: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
    """GPTQ's loop (Algorithm 1, lazy batch updates) over the permuted columns `work` [out, in] a pair at a time,
    in place, each pair taking the entry of its codebook (`block_of` its block) of least loss over both columns
    (module docstring); returns the codes [out, in / 2] in the loop's pair order (None unless `keep`) and each
    row's loss."""
    out, cols = work.shape
    s = scales.to(torch.float32)[:, None]
    table = books.to(torch.float32)                                              # [G, K, 2]
    codes = torch.zeros(out, cols // 2, dtype=torch.uint8) if keep else None
    losses = torch.zeros(out)
    blocksize += blocksize % 2
    scaled: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}                   # block -> every entry, scaled
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, U = work[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(0, i2 - i1, 2):
            g = int(block_of[(i1 + i) // 2])
            if g not in scaled:
                scaled[g] = s * table[g, :, 0], s * table[g, :, 1]                # [out, K]
            c0, c1 = scaled[g]
            d0, d1, u = U[i, i], U[i + 1, i + 1], U[i, i + 1]
            e0 = (W1[:, i, None] - c0) / d0
            e1 = torch.sub(W1[:, i + 1, None], e0 * u).sub_(c1).div_(d1)
            q = e0.square().add_(e1.square()).min(dim=1, keepdim=True).indices     # `nearest_entry` on min
            err0 = e0.gather(1, q)[:, 0]
            W1[:, i:].addr_(err0, U[i, i:], alpha=-1)
            err1 = (W1[:, i + 1] - c1.gather(1, q)[:, 0]) / d1
            W1[:, i + 1:].addr_(err1, U[i + 1, i + 1:], alpha=-1)
            Err1[:, i], Err1[:, i + 1] = err0, err1
            losses += (err0 * err0 + err1 * err1) / 2
            if codes is not None:
                codes[:, (i1 + i) // 2] = q[:, 0].to(torch.uint8)
        work[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]                                  # lazy batch update
    return codes, losses

"""Learned rounding and clipping per block: SignRound (Cheng et al. 2023, "Optimize Weight Rounding via Signed
Gradient Descent for the Quantization of LLMs", the method of AutoRound; OmniQuant's learnable weight clipping,
Shao et al. 2024, is the same family).

Every linear of a block keeps the layout of its starting `QuantizedWeight` (bits, group size, symmetry, group
index, outlier positions, grids per input channel, bits per group of columns: maxq below is then the group's) and
learns
  V in [-0.5, 0.5] per weight: an offset added before rounding, and
  a, b per grid (group and row, or group of rows and input channel): factors of the top and of the bottom of the
  grid's range (its clipping),
minimizing the mean squared error between the block's outputs with the quantized weights and target outputs on
calibration inputs, by signed gradient descent through straight-through rounding, one random minibatch of windows
per iteration: the step is lr = 1 / iters decayed linearly to 0 (so that V travels at most half a grid step), and
the parameters of the iteration with the least minibatch loss are kept (AutoRound's defaults).

The grid is relative to the start's scale s0 and zero point z0 (a = b = 1 is the start's grid exactly):
  asymmetric:  f = (a (maxq - z0) + b z0) / maxq,  s = fp16(s0 f),  z = clamp(round(b z0 / f), 1, maxq)
  symmetric:   f = a,                              s = fp16(s0 f),  z = z0
  q = clamp(round(W / s + V) + D + z, 0, maxq),    Q = s (q - z)
(the range [-z0 s0, (maxq - z0) s0] with its ends scaled by b and a; the zero point stays at least 1, as every
asymmetric grid's does, grid.py). D is 0 by default (`relative_to="rtn"`:
the offsets move W rounded to nearest on the start's grid, as AutoRound starts), or the integer shift of the
start's codes from that rounding, q0 - z0 - round(W / s0) (`relative_to="gptq"`: V = 0 is GPTQ's result exactly).
On SmolLM2-135M at 3 bits the first fits a block's outputs better (bench/results/rounding-smollm2.md): GPTQ's
error feedback compensates each linear alone, which the block-wise fit does better itself, and its shifted codes
are a worse place to search around. Outliers of a dense-and-sparse start stay in fp16 where they are; their
codes are the zero point.

A lookup-table start (quantize/lut.py: per row o, 2^bits fp16 centroids c_o) learns the same offsets, in units of
the row's mean spacing d_o = (max c_o - min c_o) / (2^bits - 1), and the centroids themselves (`LearnedTable`):
  q = nearest(R + V d_o, c_o),   Q = c_o[q]
with R = W (`relative_to="rtn"`) or the start's Q (`"gptq"`: V = 0 and the start's tables give its codes exactly),
the gradient reaching V as d_o (straight through the nearest-centroid search, as through rounding) and c_o through
the gather. The centroids take signed steps of d_o times the clipping factors' rate (so each moves at most half a
mean spacing) and are kept ascending and fp16 as stored. The tables are to a non-uniform grid what the clipping
factors are to a uniform one: its levels, learned on the block's output error rather than on the weights alone.

A start of codebooks of pairs (quantize/vq.py: W[o, 2p + t] = s_o C[g, q[o, p], t]) learns its codebooks, in units
of each one's mean spacing d per coordinate, and a factor a_o of every row's scale (`LearnedCodebook`), its codes
kept as GPTQ chose them. With `CODE_CANDIDATES` = m > 0 it learns the codes too: two offsets V per pair, and
  q[o, p] = the entry nearest to R[o, p] / s_o + V[o, p] d among the pair's m nearest entries in the start's book,
R the start's Q (V = 0 is GPTQ's joint choice), the gradient reaching V as s_o d straight through the choice. It
fits the calibration windows far better and other text no better, so it is off. On a SmolLM2 block at 3 bits
(bench/results/codebook-rounding-smollm2.md, m = 4) it lowers the output error on the windows it learned from by
14 % and on unseen windows by 3 %. In the whole pipeline on SmolLM2 (SignRound 50 and one tuning pass,
bench/results/plan-smollm2-vq.md) the loss on the calibration windows falls from 0.110 to 0.048 nats at 3.25 bpw,
while WikiText-2 goes from 30.73 to 31.66 and the held-out text from 29.61 to 29.05; at 4.25 from 0.011 to 0.004
nats, WikiText-2 24.48 to 24.41, held-out 22.65 to 22.81. Starting from each pair's nearest entry instead of
GPTQ's codes is worse than not learning the codes.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call

from .grid import FP16_TINY, ZERO_MIN, stored_ste, whole_ste
from .lut import LutWeight, nearest
from .per_ic import PerICWeight, expand_rows
from .rtn import QuantizedWeight
from .vq import VQWeight, dequantize, entries, flat_index, lookup, nearest_entries, pair_blocks

STARTS = ("gptq", "rtn")
CLIP_RANGE = (0.5, 1.5)      # bounds of the clipping factors; the decaying step cannot move them further anyway
CODE_CANDIDATES = 0          # entries a pair of a codebook start may move among, its nearest in the start's book;
                             # 0: GPTQ's codes kept (learning them fits only the calibration text: module docstring)


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


class _Learned(nn.Module):
    """What every learned linear has: its start, and rounding offsets V (set by the subclass) kept in [-0.5, 0.5]."""
    V: nn.Parameter

    def __init__(self, start, relative_to: str):
        super().__init__()
        if relative_to not in STARTS:
            raise ValueError(f"start {relative_to!r}: choose one of {', '.join(STARTS)}")
        self.start = start

    @torch.no_grad()
    def clamp_(self) -> None:
        self.V.clamp_(-0.5, 0.5)


class LearnedGrid(_Learned):
    """One linear's learned rounding offsets and clipping factors on its starting grid (module docstring)."""

    def __init__(self, W: torch.Tensor, start: QuantizedWeight, relative_to: str = "rtn"):
        super().__init__(start, relative_to)
        self.per_ic = isinstance(start, PerICWeight)
        self.g = None if self.per_ic else start.group_index().long()
        self.W = W.detach().to(torch.float32)
        self.s0 = start.scales.to(torch.float32)                           # [G, out], or [G, in] per input channel
        widths = getattr(start, "widths", None)                            # bits per group of columns
        self.maxq = float(2 ** start.bits - 1) if widths is None else start.maxq()[:, None]    # per grid
        self.top = self.maxq if widths is None else self.expand(self.maxq.expand_as(self.s0))  # per weight
        self.z0 = start.zeros.to(torch.float32)
        unit = getattr(start, "unit", None)                                 # double-quantized scales: their lattice
        self.unit = None if unit is None else unit.to(torch.float32)
        s0 = self.expand(self.s0)                                          # [out, in]
        self.shift = ((start.codes.float() - self.expand(self.z0) - torch.round(self.W / s0))
                      if relative_to == "gptq" else None)                # None: D = 0
        outliers = getattr(start, "outliers", None)
        self.kept = outliers.mask(W.shape[1]) if outliers is not None and outliers.cols.numel() else None
        self.V = nn.Parameter(torch.zeros_like(self.W))
        self.a = nn.Parameter(torch.ones_like(self.s0))
        self.b = nn.Parameter(torch.ones_like(self.s0))

    def expand(self, per_grid: torch.Tensor) -> torch.Tensor:
        """A value per grid as one per weight, [out, in]."""
        if self.per_ic:
            return expand_rows(per_grid, self.start.group_size, self.W.shape[0])
        return per_grid[self.g].t()

    def grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale as stored, zero point), both float per grid, of the current clipping factors."""
        if self.start.sym:
            f, z = self.a, self.z0
        else:
            f = (self.a * (self.maxq - self.z0) + self.b * self.z0) / self.maxq
            z = torch.clamp(_round_ste(self.b * self.z0 / f), min=ZERO_MIN).clamp(max=self.maxq)
        if self.unit is not None:                                          # a whole code of the row's unit
            return stored_ste(whole_ste(self.s0 * f / self.unit) * self.unit), z
        return torch.clamp(stored_ste(self.s0 * f), min=FP16_TINY), z

    def codes(self, se: torch.Tensor, ze: torch.Tensor, round_=torch.round) -> torch.Tensor:
        """Float codes [out, in] on the grid of every weight's scale `se` and zero point `ze` [out, in], rounding
        with `round_` (outliers left out)."""
        q = round_(self.W / se + self.V)
        if self.shift is not None:
            q = q + self.shift
        return torch.clamp(q + ze, min=0).clamp(max=self.top)

    def forward(self) -> torch.Tensor:
        """The quantized weight Q [out, in], differentiable in V, a, b."""
        s, z = self.grid()
        se, ze = self.expand(s), self.expand(z)
        Q = se * (self.codes(se, ze, _round_ste) - ze)
        return Q if self.kept is None else torch.where(self.kept, self.start.Q, Q)

    def levels(self) -> list[tuple[nn.Parameter, float | torch.Tensor]]:
        """The grid's parameters besides V, each with the unit of its signed step: the clipping factors (b only
        for an asymmetric grid), in units of 1."""
        return [(self.a, 1.0)] + ([] if self.start.sym else [(self.b, 1.0)])

    @torch.no_grad()
    def clamp_(self) -> None:
        super().clamp_()
        self.a.clamp_(*CLIP_RANGE)
        self.b.clamp_(*CLIP_RANGE)

    @torch.no_grad()
    def result(self) -> QuantizedWeight:
        """The quantized weight of the current parameters, in the start's form (a `DenseSparseWeight` for a
        dense-and-sparse start)."""
        s, z = self.grid()
        se, ze = self.expand(s), self.expand(z)
        codes = self.codes(se, ze)
        scales, zeros = s.to(torch.float16), z.to(torch.int32)
        Q = self.expand(scales).float() * (codes - self.expand(zeros).float())
        if self.kept is not None:
            codes = torch.where(self.kept, ze, codes)
            Q = torch.where(self.kept, self.start.Q, Q)
        return dataclasses.replace(self.start, codes=codes.to(torch.uint8), scales=scales, zeros=zeros, Q=Q)


class LearnedTable(_Learned):
    """One linear's learned rounding offsets and centroids on its starting lookup tables (module docstring)."""

    def __init__(self, W: torch.Tensor, start: LutWeight, relative_to: str = "rtn"):
        super().__init__(start, relative_to)
        table = start.lut.to(torch.float32)
        self.spacing = ((table[:, -1:] - table[:, :1]) / (table.shape[1] - 1)).clamp(min=FP16_TINY)   # d_o [out, 1]
        self.R = (W if relative_to == "rtn" else start.Q).detach().to(torch.float32)
        self.V = nn.Parameter(torch.zeros_like(self.R))
        self.c = nn.Parameter(table.clone())

    def table(self) -> torch.Tensor:
        """The centroids as stored (fp16, ascending), differentiable."""
        return stored_ste(self.c)

    def codes(self, table: torch.Tensor) -> torch.Tensor:
        """Index [out, in] of every weight's centroid: the nearest to R + V d_o."""
        return nearest((self.R + self.V * self.spacing).detach(), table.detach())

    def forward(self) -> torch.Tensor:
        """The quantized weight Q [out, in], differentiable in V (straight through the search) and the centroids."""
        table = self.table()
        return table.gather(1, self.codes(table)) + self.spacing * (self.V - self.V.detach())

    def levels(self) -> list[tuple[nn.Parameter, float | torch.Tensor]]:
        """The centroids, each row stepping in units of its mean spacing."""
        return [(self.c, self.spacing)]

    @torch.no_grad()
    def clamp_(self) -> None:
        super().clamp_()
        self.c.copy_(torch.sort(self.c, dim=1).values)

    @torch.no_grad()
    def result(self) -> LutWeight:
        """The quantized weight of the current parameters, as a `LutWeight` like the start."""
        table = self.c.to(torch.float16)
        codes = self.codes(table.float())
        return dataclasses.replace(self.start, codes=codes.to(torch.uint8), lut=table,
                                   Q=table.float().gather(1, codes))


class LearnedCodebook(_Learned):
    """One linear's learned codebooks and row scales on its starting codebooks of pairs, and its codes when
    `CODE_CANDIDATES` > 0 (module docstring)."""

    def __init__(self, W: torch.Tensor, start: VQWeight, relative_to: str = "rtn"):
        super().__init__(start, relative_to)
        out, cols = W.shape
        books = start.codebooks.to(torch.float32)
        self.spacing = spacing = ((books.amax(1, keepdim=True) - books.amin(1, keepdim=True))
                                  / (entries(start.bits) ** 0.5 - 1)).clamp(min=FP16_TINY)    # [G, 1, 2]
        self.s0 = start.scales.to(torch.float32)
        self.index = flat_index(start.codes, entries(start.bits), start.group_size)    # GPTQ's codes, kept
        self.V = nn.Parameter(torch.zeros(0))
        if CODE_CANDIDATES:                                                           # the codes learn
            self.unit = spacing[pair_blocks(cols // 2, start.group_size), 0]           # d [pairs, 2]
            self.R = start.Q.to(torch.float32).reshape(out, cols // 2, 2)      # from GPTQ's codes (docstring)
            self.candidates = nearest_entries(self.R / self.s0[:, None, None], books, start.group_size,
                                              CODE_CANDIDATES)
            self.V = nn.Parameter(torch.zeros_like(self.R))
        self.C = nn.Parameter(books.clone())
        self.a = nn.Parameter(torch.ones_like(self.s0))

    def scales(self) -> torch.Tensor:
        return torch.clamp(stored_ste(self.s0 * self.a), min=FP16_TINY)

    @torch.no_grad()
    def weight_index(self, books: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """Where every weight reads the flattened codebooks (`vq.flat_index`): the start's codes, or, when the
        codes learn, each pair's candidate nearest to R / s + V d."""
        if not self.V.numel():
            return self.index
        target = self.R / scales[:, None, None] + self.V * self.unit
        near = (target[:, :, None, :] - books.reshape(-1, 2)[self.candidates]).square().sum(dim=3)
        first = 2 * self.candidates.gather(2, near.argmin(dim=2, keepdim=True)).squeeze(2)
        return torch.stack([first, first + 1], dim=2).flatten(1)

    def forward(self) -> torch.Tensor:
        """The quantized weight Q [out, in], differentiable in the codebooks, the row factors and V (straight
        through the choice of entry) when the codes learn."""
        books, scales = stored_ste(self.C), self.scales()
        values = lookup(books, self.weight_index(books.detach(), scales.detach()))
        if not self.V.numel():
            return scales[:, None] * values
        return scales[:, None] * (values + (self.unit * (self.V - self.V.detach())).flatten(1))

    def levels(self) -> list[tuple[nn.Parameter, float | torch.Tensor]]:
        return [(self.C, self.spacing), (self.a, 1.0)]

    @torch.no_grad()
    def clamp_(self) -> None:
        super().clamp_()
        self.a.clamp_(*CLIP_RANGE)

    @torch.no_grad()
    def result(self) -> VQWeight:
        books, scales = self.C.to(torch.float16), self.scales().to(torch.float16)
        codes = (self.weight_index(books.float(), scales.float())[:, 0::2] // 2
                 % entries(self.start.bits)).to(torch.uint8)
        return dataclasses.replace(self.start, codes=codes, codebooks=books, scales=scales,
                                   Q=dequantize(codes, books, scales, self.start.group_size))


def learned(W: torch.Tensor, start: QuantizedWeight | LutWeight | VQWeight,
            relative_to: str = "rtn") -> LearnedGrid | LearnedTable | LearnedCodebook:
    """The learned parameters of one linear on its start: codebooks', a table's or a uniform grid's."""
    if isinstance(start, VQWeight):
        return LearnedCodebook(W, start, relative_to)
    return (LearnedTable if isinstance(start, LutWeight) else LearnedGrid)(W, start, relative_to)


def block_mse(block: nn.Module, weights: dict[str, torch.Tensor], inputs: torch.Tensor, targets: torch.Tensor,
              batch: int = 8, **kwargs) -> float:
    """Mean squared error between the block's outputs on `inputs` with the linears' weights replaced by
    `weights` (name -> [out, in]) and `targets`."""
    total = 0.0
    with torch.no_grad():
        for i in range(0, inputs.shape[0], batch):
            out = _forward(block, weights, inputs[i:i + batch], kwargs)
            total += (out.float() - targets[i:i + batch].float()).square().sum().item()
    return total / targets.numel()


def _forward(block: nn.Module, weights: dict[str, torch.Tensor], x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = functional_call(block, {f"{name}.weight": w for name, w in weights.items()}, (x,), kwargs)
    return out[0] if isinstance(out, tuple) else out


@dataclasses.dataclass
class Trace:
    """How a block's optimization went: minibatch loss of every iteration, the iteration kept, and the losses of
    the start and of the kept parameters on the check minibatch (the start is returned when it is not worse)."""
    losses: list[float]
    best: int
    check: tuple[float, float] | None = None

    @property
    def kept_start(self) -> bool:
        return self.check is not None and self.check[0] <= self.check[1]


def signround(block: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, originals: dict[str, torch.Tensor],
              starts: dict[str, QuantizedWeight | LutWeight], iters: int, batch: int = 8, lr: float | None = None,
              clip_lr: float | None = None, seed: int = 0, relative_to: str = "rtn",
              autocast: Callable | None = None, **kwargs) -> tuple[dict[str, QuantizedWeight | LutWeight], Trace]:
    """Learned rounding and clipping of the linears of `block` (module docstring).

    `inputs` [n, seq, d]: the calibration hidden states entering the block; `targets` [n, seq, d]: the outputs to
    reproduce; `originals`: each linear's unquantized weight [out, in] by its name inside the block; `starts`:
    its starting quantized weight (GPTQ's or RTN's; a lookup table's too). `lr`: the first step of the offsets
    (default 1 / iters), `clip_lr`: of the clipping factors and centroids (default `lr`; 0 keeps the start's grid). `kwargs` go to every call of the
    block (position embeddings, masks); `autocast`, when given, is the context the forward and backward run in.
    Minibatches of `batch` windows are drawn from a generator seeded with `seed`; the next one after the last
    iteration checks the kept parameters against the start, which is returned unchanged unless they do better there
    (so that a short run never leaves a block worse than GPTQ did). Returns the refined weights, in the form of the
    starts, and the trace; with 0 iterations, the starts themselves."""
    if iters == 0:
        return dict(starts), Trace([], 0)
    if iters < 0:
        raise ValueError(f"iterations {iters}: expected 0 or more")
    grids = {name: learned(originals[name], qw, relative_to) for name, qw in starts.items()}
    lr = 1.0 / iters if lr is None else lr
    clip_lr = lr if clip_lr is None else clip_lr
    params = [(grid.V, lr, 1.0) for grid in grids.values()]
    if clip_lr:
        params += [(p, clip_lr, unit) for grid in grids.values() for p, unit in grid.levels()]
    frozen = [p for p in block.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    losses, best, kept = [], float("inf"), 0
    saved = [p.detach().clone() for p, _, _ in params]

    def minibatch():
        nonlocal order
        if len(order) < min(batch, inputs.shape[0]):
            order = torch.cat([order, torch.randperm(inputs.shape[0], generator=generator)])
        pick, order = order[:batch], order[batch:]
        return inputs[pick], targets[pick]

    def loss_of(weights: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with autocast() if autocast else contextlib.nullcontext():
            return (_forward(block, weights, x, kwargs).float() - y.float()).square().mean()

    try:
        for it in range(iters):
            loss = loss_of({name: grid() for name, grid in grids.items()}, *minibatch())
            loss.backward()
            losses.append(loss.item())
            if losses[-1] < best:                                          # the parameters this loss is of
                best, kept = losses[-1], it
                saved = [p.detach().clone() for p, _, _ in params]
            decay = 1 - it / iters                                         # linear decay to 0 (AutoRound)
            with torch.no_grad():
                for p, rate, unit in params:
                    if p.grad is not None:
                        p.sub_(rate * decay * unit * torch.sign(p.grad))
                        p.grad = None
            for grid in grids.values():
                grid.clamp_()
        with torch.no_grad():
            for (p, _, _), value in zip(params, saved):
                p.copy_(value)
            refined = {name: grid.result() for name, grid in grids.items()}
            x, y = minibatch()
            check = (loss_of({name: qw.Q for name, qw in starts.items()}, x, y).item(),
                     loss_of({name: qw.Q for name, qw in refined.items()}, x, y).item())
        trace = Trace(losses, kept, check)
        return (dict(starts) if trace.kept_start else refined), trace
    finally:
        for p in frozen:
            p.requires_grad_(True)


def layer_output_error(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    """||(W - Q) X||^2 / n of one linear from its H = 2 X X^T / n: tr((W-Q) H (W-Q)^T) / 2, GPTQ's loss measure."""
    E = (W.to(torch.float32) - Q)
    return float(((E @ H) * E).sum() / 2)

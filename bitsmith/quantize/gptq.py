"""GPTQ: column-by-column quantization with second-order error compensation.

Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers"
(ICLR 2023), Algorithm 1: lazy batch updates over blocks of columns, the upper Cholesky factor of H^-1,
optional act-order (descending diag(H)) and static groups.

One loop serves every configuration: the column quantizer (`ColumnGrids`) owns the grids of a stack of
configurations of the same matrix, one run of rows each, and the loop itself is the paper's. Rows are
independent in GPTQ (each row's error feedback uses only H), so stacking the candidates of a measurement
costs one pass of the loop however many there are.

A configuration may keep a fixed number of outliers per row in fp16 (SpQR, Dettmers et al. 2023, section 4;
`outliers.py`). They are chosen by a first pass of the loop, then the second pass quantizes with them fixed:
the grids are fitted without them and each is stored as its error-updated value, so the loop stays exact GPTQ
for the weights that are quantized and the count per row is exactly the budget.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .grid import RowGrid, check_finite, fake_quantize, fit_grid, grid_points, scale_unit
from .outliers import DenseSparseWeight, Outliers, narrowest_range, outlier_count, top_per_row
from .per_ic import PerICWeight, row_span
from .rtn import ColumnBitsWeight, DQWeight, QuantizedWeight

DAMP_RETRIES = (1.0, 10.0, 100.0, 1000.0, 1e4)   # multiples of the requested damping, tried in float64


def damped_factors(H: torch.Tensor, damp: float, first: torch.dtype = torch.float32):
    """Lower Cholesky factors L of H + lambda I, lambda = damp * mean(diag H) (GPTQ section 4, step 3), one per
    attempt: in `first` (float32 for GPTQ's loop), then in float64 with growing damping. Yields (L, damp used)
    for the caller to accept or pass over; raises when none is left."""
    n = H.shape[0]
    attempts = [(first, 1.0)] + [(torch.float64, f) for f in DAMP_RETRIES if first != torch.float64 or f > 1.0]
    for dtype, factor in attempts:
        Hd = H.to(dtype)
        lam = damp * factor * torch.diag(Hd).mean()
        L, info = torch.linalg.cholesky_ex(Hd + lam * torch.eye(n, dtype=dtype))
        if info.item() == 0:
            yield L, damp * factor
    raise ValueError(f"Hessian is not positive definite even with damping {damp * DAMP_RETRIES[-1]:g}")


def inverse_cholesky(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of (H + lambda I)^-1 (`damped_factors`). A factor with NaN/Inf counts as a
    failure (cholesky_inverse can return NaN silently on nearly singular H). Returns (U, damp actually used)."""
    for L, used in damped_factors(H, damp):
        U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
        if info.item() == 0 and torch.isfinite(U).all():
            return U.to(torch.float32), used
    raise AssertionError("unreachable: damped_factors raises when its attempts run out")


@dataclass(frozen=True)
class GridConfig:
    """One uniform-grid configuration of a linear: bits, group size along the input (-1 = per output
    channel), symmetry, the fraction of weights kept in fp16 as outliers (`outlier_count` per row), and whether
    the groups run along the output instead (`per_ic`: one grid per input channel and `group_size` rows,
    per_ic.py)."""
    bits: int
    group_size: int = -1
    sym: bool = False
    outliers: float = 0.0
    per_ic: bool = False
    widths: tuple[int, ...] | None = None    # bits of each group of columns in the loop's order (column_bits.py)
    dq: bool = False                         # group scales double-quantized: fp16(c u), c 8-bit, u per row (grid.py)

    def __post_init__(self):
        outlier_count(self.outliers, 1)
        if self.dq and (self.group_size == -1 or self.per_ic or self.outliers or self.widths is not None):
            raise ValueError("double-quantized scales are those of groups along the input, without outliers")
        if self.per_ic and self.outliers:
            raise ValueError("per-input-channel groups keep no outliers")
        if self.widths is not None and (self.group_size == -1 or self.per_ic or self.outliers):
            raise ValueError("bits per group of columns need groups along the input, without outliers")


class ColumnGrids:
    """GPTQ's column quantizer for a stack of configurations (config c owns rows [c*rows, (c+1)*rows)).

    Each group size's rows are refitted where their groups start (on the error-updated columns, as in the
    GPTQ code), or take grids fitted up front on the original column order (`static`); per-channel rows are
    fitted once. `at(col, W)` gives every row's (scale, zero) for permuted column `col`.

    `kept` (bool [stack rows, in], permuted order) marks the outliers: every fit leaves them out. With `budget`
    (outliers per stack row) they are chosen at each fit instead: its share of the budget, rounded up, among the
    weights that narrow the row's range most (SpQR section 4 fits its groups without likely outliers).

    A per-input-channel configuration's grids are fitted on each column as the loop reaches it (`round`), on
    its current values, and kept per column ([G, in], permuted order) in `per_ic`.

    A configuration with `widths` gives each group of columns its own bits (BAQ, column_bits.py): its rows take
    group k's width where group k starts (groups in the loop's order, so not with static groups).

    A configuration with `dq` fits its groups' scales on each row's lattice of double-quantized scales (grid.py),
    the row's unit (`unit`, fp16 per stack row, 0 elsewhere) taken from its range before the loop.
    """

    def __init__(self, W: torch.Tensor, configs: list[GridConfig], rows: int, perm: torch.Tensor, mse: bool,
                 static: bool, shrink_every: int, kept: torch.Tensor | None = None,
                 budget: torch.Tensor | None = None):
        self.cols, self.mse, self.every = W.shape[1], mse, shrink_every
        self.kept, self.budget = kept, budget
        bits = torch.tensor([c.bits for c in configs]).repeat_interleave(rows)
        self.sym = torch.tensor([c.sym for c in configs]).repeat_interleave(rows)
        self.maxq = (2.0 ** bits - 1).float()
        self.unit = torch.cat([scale_unit(W, c.bits) if c.dq else torch.zeros(rows, dtype=torch.float16)
                               for c in configs]) if any(c.dq for c in configs) else None
        self.scale = torch.zeros(len(bits), dtype=torch.float16)
        self.zero = torch.zeros(len(bits), dtype=torch.int32)
        self._floats: tuple[torch.Tensor, torch.Tensor] | None = None   # (scale, zero) in float32 while unchanged
        self.sizes = sorted({c.group_size for c in configs if not c.per_ic})
        self.rows, self.grid, self.fits, self.group_of, self.static, self.widths = {}, {}, {}, {}, {}, {}
        self.per_ic = PerICGrids(configs, rows, self.cols) if any(c.per_ic for c in configs) else None
        if static and any(c.widths is not None for c in configs):
            raise ValueError("bits per group of columns are allocated in the loop's order: no static groups")
        inv = torch.argsort(perm)
        for g in self.sizes:
            mine = [c for c in configs if c.group_size == g and not c.per_ic]
            mask = torch.tensor([c.group_size == g and not c.per_ic for c in configs]).repeat_interleave(rows)
            self.rows[g] = mask.nonzero().squeeze(1)
            self.grid[g] = RowGrid(bits[self.rows[g]], self.sym[self.rows[g]],
                                   None if self.unit is None else self.unit[self.rows[g]])
            if any(c.widths is not None for c in mine):         # bits [rows of g, groups]
                groups = -(-self.cols // g)
                if any(c.widths is not None and len(c.widths) != groups for c in mine):
                    raise ValueError(f"widths for {groups} groups of {g} columns expected")
                self.widths[g] = torch.stack([torch.tensor(c.widths if c.widths is not None else (c.bits,) * groups)
                                              for c in mine]).repeat_interleave(rows, dim=0)
            self.fits[g] = []
            self.group_of[g] = torch.zeros(self.cols, dtype=torch.int64)
            span = self.cols if g == -1 else g
            Wg = W[self.rows[g] % rows]
            if g == -1:
                self._set(g, self._fit(g, Wg, inv))
            elif static:
                self.static[g] = [self._fit(g, Wg[:, i:i + span], inv[i:i + span]) for i in range(0, self.cols, span)]
                self.group_of[g] = perm // span
        self.perm = perm

    def _widths(self, g: int, k: int) -> int:
        """Give group size g's rows the bits of their group k (where some configuration has widths); returns g."""
        if g in self.widths:
            bits = self.widths[g][:, k]
            self.grid[g] = RowGrid(bits, self.sym[self.rows[g]])
            self.maxq[self.rows[g]] = (2.0 ** bits - 1).float()
            self._floats = None
        return g

    def _fit(self, g: int, x: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Grids of group size g's rows on x [rows of g, n], whose columns sit at permuted positions `cols`."""
        if self.kept is not None:
            rows = self.rows[g]
            at = (rows[:, None], cols)
            if self.budget is not None:
                share = torch.clamp(-(-self.budget[rows] * x.shape[1] // self.cols), max=(x.shape[1] - 1) // 2)
                self.kept[at] = narrowest_range(x, share, self.sym[rows])
            x = x.masked_fill(self.kept[at], 0)                  # 0 is on every grid: a left-out weight is neutral
        return fit_grid(x, self.grid[g], mse=self.mse, shrink_every=self.every)

    def _set(self, g: int, fit: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.scale[self.rows[g]], self.zero[self.rows[g]] = fit
        self.fits[g].append(fit)
        self._floats = None

    def at(self, col: int, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Grids for permuted column `col`; W holds every column from `col` on updated for all columns
        before it whenever `col` starts a group (group starts are block starts, `block_size`)."""
        for g in self.sizes:
            if g == -1:
                continue
            if g in self.static:
                fit = self.static[g][int(self.group_of[g][col])]
                self.scale[self.rows[g]], self.zero[self.rows[g]] = fit
                self._floats = None
                continue
            if col % g == 0:
                self._set(g, self._fit(self._widths(g, col // g), W[self.rows[g], col:col + g],
                                       torch.arange(col, min(col + g, self.cols))))
                self.group_of[g][col:col + g] = col // g
        return self.scale, self.zero

    def round(self, col: int, W: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes, the values they stand for, zero points) of permuted column `col`, whose current values are w
        (the column quantizer's interface to `gptq_loop`)."""
        scale, zero = self.at(col, W)
        if self.per_ic is not None:
            self.per_ic.fit(col, w, scale, zero, self.mse, self.every)
            self._floats = None
        if self._floats is None:
            self._floats = scale.float(), zero.float()
        s, z = self._floats                     # quantize_codes and fake_quantize, the conversions done once a grid
        t = grid_points(w, s, z, self.maxq)
        return t.to(torch.uint8), s * (t - z), zero

    def unit_of(self, c: int, rows: int) -> torch.Tensor:
        """fp16 [rows]: the units of config c's double-quantized scales."""
        return self.unit[c * rows:(c + 1) * rows].clone()

    def stored(self, c: int, g: int, rows: int, inv: torch.Tensor):
        """(scales [G, rows], zeros [G, rows], g_idx or None) of config c, in original column order."""
        fits = self.static[g] if g in self.static else self.fits[g]
        own = (self.rows[g] >= c * rows) & (self.rows[g] < (c + 1) * rows)
        scales = torch.stack([s[own] for s, _ in fits])
        zeros = torch.stack([z[own] for _, z in fits])
        group_of = self.group_of[g][inv]
        natural = g == -1 or torch.equal(group_of, torch.arange(self.cols) // g)
        return scales, zeros, None if natural else group_of.to(torch.int32)


class PerICGrids:
    """The grids of a stack's per-input-channel configurations (per_ic.py), every group of every such configuration
    fitted in one call per column: the groups of rows gathered as rows of one matrix, zero-padded to the longest (a
    zero changes neither a grid's range, which always holds 0, nor its error, 0 being a grid point), so that each
    group gets the grid a call of its own would give it. Kept per column: `scales` fp16 and `zeros` int32 [grids,
    in], permuted order."""

    def __init__(self, configs: list[GridConfig], rows: int, cols: int):
        spans, self.grids_of = [], {}           # spans: (config, first stack row, rows) of each grid
        for c, config in enumerate(configs):
            if config.per_ic:
                g = row_span(config.group_size, rows)
                starts = range(0, rows, g)
                self.grids_of[c] = slice(len(spans), len(spans) + len(starts))
                spans += [(config, c * rows + s, min(g, rows - s)) for s in starts]
        width = max(n for _, _, n in spans)
        padding = len(configs) * rows           # the index of a zero appended to the stack's column
        self.gather = torch.full((len(spans), width), padding)
        for k, (_, start, n) in enumerate(spans):
            self.gather[k, :n] = torch.arange(start, start + n)
        self.grid = RowGrid(torch.tensor([c.bits for c, _, _ in spans]), torch.tensor([c.sym for c, _, _ in spans]))
        self.rows = torch.cat([torch.arange(start, start + n) for _, start, n in spans])     # stack rows they cover
        self.grid_of_row = torch.arange(len(spans)).repeat_interleave(torch.tensor([n for _, _, n in spans]))
        self.scales = torch.zeros(len(spans), cols, dtype=torch.float16)
        self.zeros = torch.zeros(len(spans), cols, dtype=torch.int32)

    def fit(self, col: int, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, mse: bool, every: int) -> None:
        """Fit the grids of permuted column `col` on its current values w [stack rows], and set the per-row
        `scale` and `zero` of the rows they cover."""
        s, z = fit_grid(F.pad(w, (0, 1))[self.gather], self.grid, mse=mse, shrink_every=every)
        self.scales[:, col], self.zeros[:, col] = s, z
        scale[self.rows], zero[self.rows] = s[self.grid_of_row], z[self.grid_of_row]

    def stored(self, c: int, inv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scales fp16 [G, in], zeros int32 [G, in]) of stack config c, in original column order."""
        mine = self.grids_of[c]
        return self.scales[mine][:, inv].contiguous(), self.zeros[mine][:, inv].contiguous()


def block_size(configs: list[GridConfig], blocksize: int) -> int:
    """Columns per lazy-update block: a divisor of every group size, so that every group starts a block and
    is fitted on columns that have received the updates of all columns before it."""
    return math.gcd(blocksize, *[c.group_size for c in configs if c.group_size != -1 and not c.per_ic])


def gptq_loop(W: torch.Tensor, Hinv: torch.Tensor, grids: ColumnGrids, blocksize: int,
              codes: torch.Tensor | None = None, held: torch.Tensor | None = None,
              score: torch.Tensor | None = None, score_rows: torch.Tensor | None = None) -> torch.Tensor:
    """GPTQ Algorithm 1 over the (permuted) columns of the stack W, in place; returns each row's loss.

    Fills `codes`; the outliers (`grids.kept`) are kept as their current value in fp16, which `held` receives,
    and their codes are the zero point. `score` receives every weight's loss (w-q)^2 / [H^-1]_jj^2 had it been
    quantized (SpQR Algorithm 1; without outliers, its loss), of the stack rows `score_rows` only when given."""
    cols = W.shape[1]
    kept = grids.kept
    losses = torch.zeros(W.shape[0])
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            w, d = W1[:, i], Hinv1[i, i]
            q, wq, zero = grids.round(i1 + i, W, w)
            if score is not None:
                loss = ((w - wq) / d).square()
                score[:, i1 + i] = loss if score_rows is None else loss[score_rows]
            if kept is not None:
                outlier, w16 = kept[:, i1 + i], w.to(torch.float16)
                wq = torch.where(outlier, w16.float(), wq)
                q = torch.where(outlier, zero.to(torch.uint8), q)
                if held is not None:
                    held[:, i1 + i] = w16
            if codes is not None:
                codes[:, i1 + i] = q
            err = (w - wq) / d
            losses += err * err / 2                              # (w-q)^2 / [H^-1]_qq^2 / 2, eq. (2)
            W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]                     # lazy batch update
    return losses


def select_outliers(W: torch.Tensor, Hinv: torch.Tensor, configs: list[GridConfig], budget: torch.Tensor,
                    perm: torch.Tensor, mse: bool, static: bool, shrink_every: int, blocksize: int) -> torch.Tensor:
    """The outliers of every configuration, bool [len(configs) * out, in] in permuted order: `budget[c]` per row.

    A first pass of the loop over the configurations with a budget, each fit leaving out (and the loop keeping)
    its share of the weights that narrow the range most; each row's budget then goes to its weights with the
    largest loss (w-q)^2 / [H^-1]_jj^2 in that pass (SpQR Algorithm 1), ties to the earlier column."""
    rows, cols = W.shape
    some = [c for c, k in zip(configs, budget.tolist()) if k]
    k = budget[budget > 0].repeat_interleave(rows)
    grids = ColumnGrids(W, some, rows, perm, mse, static, shrink_every,
                        kept=torch.zeros(len(some) * rows, cols, dtype=torch.bool), budget=k)
    score = torch.zeros(len(some) * rows, cols)
    gptq_loop(W[:, perm].repeat(len(some), 1), Hinv, grids, block_size(some, blocksize), score=score)
    kept = torch.zeros(len(configs) * rows, cols, dtype=torch.bool)
    kept[(budget > 0).repeat_interleave(rows)] = top_per_row(score, k)
    return kept


def prepare(W: torch.Tensor, H: torch.Tensor, act_order: bool, damp: float, perm: torch.Tensor | None = None):
    """(W, H, column order, upper Cholesky factor of the permuted (H + lambda I)^-1) for the loop: float32 copies,
    inputs never active (H_jj = 0) made free (their weights 0, H_jj 1), columns in act-order when asked (or in the
    order `perm` when given)."""
    check_finite(W)
    if not torch.isfinite(H).all():
        raise ValueError("Hessian has NaN/Inf values (non-finite calibration activations)")
    W = W.to(torch.float32).clone()
    H = H.to(torch.float32).clone()
    dead = torch.diag(H) == 0                                    # inputs never active: weight is free
    H[dead, dead] = 1
    W[:, dead] = 0
    if perm is None:
        perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(W.shape[1])
    Hinv, _ = inverse_cholesky(H[perm][:, perm], damp)
    return W, H, perm, Hinv


def gptq_configs(W: torch.Tensor, H: torch.Tensor, configs: list[GridConfig], act_order: bool = False,
                 static_groups: bool = False, damp: float = 0.01, blocksize: int = 128, mse: bool = False,
                 shrink_every: int = 1, keep: bool = True, score: torch.Tensor | None = None,
                 scored: list[int] | None = None) -> tuple[list[QuantizedWeight], torch.Tensor]:
    """GPTQ of W [out, in] under each configuration at once, given H [in, in] = 2 X X^T / n.

    Returns the quantized weights (empty unless `keep`; a `DenseSparseWeight` for a configuration with
    outliers) and the loss of every row of every configuration, [len(configs), out]: sum over columns of
    (w-q)^2 / [H^-1]_qq^2 / 2 (GPTQ eq. (2)), which is ||(W-Q)_row X||^2 / n, the mean squared output error of
    that row. `score` [len(configs) * out, in], when given, receives every weight's loss in the loop's column order
    (`gptq_loop`); with `scored` (configuration indices) it is [len(scored) * out, in], theirs alone."""
    rows, cols = W.shape
    W, H, perm, Hinv = prepare(W, H, act_order, damp)
    budget = torch.tensor([outlier_count(c.outliers, cols) for c in configs])
    kept = None
    if budget.any():
        kept = select_outliers(W, Hinv, configs, budget, perm, mse, static_groups, shrink_every, blocksize)
    grids = ColumnGrids(W, configs, rows, perm, mse, static_groups, shrink_every, kept=kept)
    W = W[:, perm].repeat(len(configs), 1)

    codes = torch.zeros(W.shape, dtype=torch.uint8) if keep else None
    held = torch.zeros(W.shape, dtype=torch.float16) if keep and kept is not None else None
    rows_of = None if scored is None else torch.cat([torch.arange(c * rows, (c + 1) * rows) for c in scored])
    losses = gptq_loop(W, Hinv, grids, block_size(configs, blocksize), codes, held, score, rows_of)
    if kept is not None and not torch.isfinite(losses).all():
        raise ValueError("an outlier weight overflows fp16")
    losses = losses.reshape(len(configs), rows)
    if not keep:
        return [], losses

    inv = torch.argsort(perm)
    out = []
    for c, config in enumerate(configs):
        own = codes[c * rows:(c + 1) * rows][:, inv]
        if config.per_ic:
            scales, zeros = grids.per_ic.stored(c, inv)
            out.append(PerICWeight(own, scales, zeros, None, config.bits, config.group_size, config.sym,
                                   PerICWeight.dequantize(own, scales, zeros, config.group_size),
                                   float(losses[c].sum())))
            continue
        scales, zeros, g_idx = grids.stored(c, config.group_size, rows, inv)
        g = g_idx.long() if g_idx is not None else torch.arange(cols) // (cols if config.group_size == -1
                                                                           else config.group_size)
        Q = fake_quantize(own, scales[g].t(), zeros[g].t())
        fields = (own, scales, zeros, g_idx, config.bits, config.group_size, config.sym)
        if config.widths is not None:
            out.append(ColumnBitsWeight(*fields, Q, float(losses[c].sum()), torch.tensor(config.widths)))
            continue
        if config.dq:
            out.append(DQWeight(*fields, Q, float(losses[c].sum()), grids.unit_of(c, rows)))
            continue
        if config.outliers == 0:
            out.append(QuantizedWeight(*fields, Q, float(losses[c].sum())))
            continue
        mine = slice(c * rows, (c + 1) * rows)
        sparse = Outliers.from_mask(kept[mine][:, inv], held[mine][:, inv]) if budget[c] else \
            Outliers.from_mask(torch.zeros(rows, cols, dtype=torch.bool), Q)
        out.append(DenseSparseWeight(*fields, sparse.overwrite(Q), float(losses[c].sum()), sparse))
    return out, losses


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int = -1, sym: bool = False,
                  act_order: bool = False, static_groups: bool = False, damp: float = 0.01,
                  blocksize: int = 128, mse: bool = False, outliers: float = 0.0,
                  per_ic: bool = False, dq: bool = False) -> QuantizedWeight:
    """Quantize W [out, in] given the layer Hessian H [in, in] = 2 X X^T / n, keeping a fraction `outliers` of
    the weights in fp16 (`DenseSparseWeight`), or with groups of `group_size` output rows per input channel
    (`per_ic`, `PerICWeight`), or with double-quantized group scales (`dq`, `DQWeight`)."""
    (qw,), _ = gptq_configs(W, H, [GridConfig(bits, group_size, sym, outliers, per_ic, dq=dq)], act_order, static_groups,
                            damp, blocksize, mse)
    return qw


def unquantized_target(W: torch.Tensor, H: torch.Tensor, R: torch.Tensor, damp: float = 0.01,
                       alpha: float = 0.25) -> torch.Tensor:
    """The weight W' = W + alpha W R (H + lambda I)^-1 that GPTQ quantizes toward the unquantized model's output:
    H = 2 X~ X~^T / n over the inputs X~ the layer sees in the quantized model, R = 2 (X - X~) X~^T / n with X the
    same tokens' inputs in the unquantized one. At alpha = 1 GPTQ on (W', H) minimises ||W X - Q X~||^2
    (expanding it, tr((W' - Q) H (W' - Q)^T) + const; asymmetric calibration, GPTAQ: Li et al. 2025, eq. (5));
    GPTAQ scales the correction by alpha = 1/4. W' = W where the inputs agree (R = 0); lambda is GPTQ's damping."""
    check_finite(W)
    if not R.any():
        return W
    H = H.to(torch.float64)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1                                            # as `prepare` frees inputs never active
    L, _ = next(damped_factors(H, damp, torch.float64))
    W64 = W.to(torch.float64)
    correction = torch.cholesky_solve((W64 @ R.to(torch.float64)).t(), L).t()   # W R (H + lambda I)^-1
    return (W64 + alpha * correction).to(torch.float32)

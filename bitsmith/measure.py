"""Measurement and decision: what every candidate configuration of every linear would cost, in stored bits
and in predicted loss, and the plan that spends a bits-per-weight budget where it buys the most.

Measure (one calibration pass, weights left unquantized): per block, each linear's Hessian (from the first
`MEASURE_WINDOWS` calibration windows: the errors rank candidates, for which half of SmolLM2's 128 x 512 tokens
do as well, at half the forward passes); GPTQ of the
linear under every candidate at once (`gptq_configs`), giving each row's loss mean_t (dW_row x_t)^2; the
rows weighted by the diagonal Fisher of the linear's output (calibration/fisher.py) give the predicted
increase of the loss in nats per token. The plain sum over rows (output MSE, not comparable across layers)
is kept too, as the "hessian" proxy.

GPTQ treats rows independently, so a linear's error is a sum over its rows and a sample of rows estimates
it: the measurement runs GPTQ on `MEASURE_ROWS` rows of each linear, drawn with probability proportional to
their Fisher-weighted round-to-nearest error (cheap for every row, and close to proportional to their GPTQ
error), the rows that matter most taken for certain, and sums them with Horvitz-Thompson weights (Cochran,
Sampling Techniques, 3rd ed., chapter 9A). bench/measure_sampling.py measures how close the estimate lands:
on SmolLM2, 1 % median and 5 % 95th-percentile relative error at 128 rows, against 3 % / 21 % for an
equal-strata sample.

The uniform grids, `PLAIN_CANDIDATES`: 2, 3, 4 and 8 bits (GPTQ's widths) with groups of 32, 64, 128 or one per
row, and grids of 5 and 6 bits in the same groupings, all asymmetric. Symmetric grids (zero point fixed at the
middle, stored all the same) save nothing GPTQ's layout counts and lose range: measured as 16 more candidates
until 2026-12-07, the stored SmolLM2 plans gave them 8 of their 17,220 linears, for a third of the grids' GPTQ
time (bench/results/measure-cost.md); a plan file or `--sym` still asks for them. Without these a linear
that 4 bits hurt most could only move to 8 bits, at twice the price (on SmolLM2 at 4.25 bits per weight, the plan
from the 45 candidates without them puts 13 of the 210 linears on 8 bits). A plan with a 5- or 6-bit linear is
not GPTQ's (its loaders read 2, 3, 4 and 8 bits) and is written as a bitsmith checkpoint.

Outliers (dense-and-sparse, quantize/outliers.py) are candidates too, `OUTLIER_CANDIDATES`: bits 2 and 3 with
groups of 128, keeping 0.5 % or 1 % of each row in fp16. They pay where the grid is coarse: SqueezeLLM (Kim et
al. 2023, LLaMA-7B, WikiText-2) gains 0.19 perplexity from 0.45 % outliers at 3 bits and 0.02 at 4 bits, for the
same 0.22 bits per weight. Groups of 128 are the coarse grouping the plan otherwise uses at 2-3 bits, where a
few weights widen a group's range most; with finer groups the metadata already buys part of what outliers buy
(SpQR, Dettmers et al. 2023, section 4). 0.5 % and 1 % bracket SqueezeLLM's 0.45 % and SpQR's ~1 %; at 576
inputs they cost 0.22 and 0.39 bits per weight (fp16 values, int16 columns, int32 row pointers), between a
finer group and one more bit. Each takes GPTQ's outlier-selection pass on top of its own.

Lookup tables (quantize/lut.py, SqueezeLLM's non-uniform grid: 2^bits fp16 centroids per output row, codes chosen
by GPTQ) are candidates at 2, 3 and 4 bits, `LUT_CANDIDATES`. A table costs 2^bits x 16 bits per row, so it is
cheap where rows are long (down_proj's 1536 inputs on SmolLM2: 0.08 bits per weight at 3 bits) and dear where
they are short; the knapsack prices it like every other layout.

Per-input-channel groups (quantize/per_ic.py, AdaDim: one grid per input channel and run of 64 or 128 output
rows) are candidates at 2, 3 and 4 bits, `PER_IC_CANDIDATES`. Their grids span rows, so rows cannot be sampled
one by one: the measurement takes `PER_IC_WINDOWS` whole windows of `PER_IC_WINDOW` consecutive rows (a whole
number of groups of either size), drawn with probability proportional to the windows' summed sampling size, and
weights them as above.

Codebooks of pairs (quantize/vq.py, GPTVQ in two dimensions: 2^(2 bits) entries per block of inputs, a scale per
row) are candidates at 2, 2.5, 3 and 3.5 bits with a codebook per 128 inputs and at 4 bits per 256 inputs,
`VQ_CANDIDATES` (256 entries x 2 x 16 bits per 128 inputs would cost 0.33 bits per weight on SmolLM2's 192-row
k/v projections). The half bits (indices of 5 and 7 bits a pair) put a rung between the whole ones, where a plan
would otherwise mix linears of 3 and 4 bits: the error falls about geometrically with the bits, so a linear at 3.5
loses less than the mean of two at 3 and 4.
A codebook is shared by all rows: it is fitted on the whole linear, and GPTQ's loss of the sampled rows under it
is weighted as above.

Bits per group of columns (quantize/column_bits.py, BAQ: each group of 128 act-ordered columns on R - 1, R or
R + 1 bits, as many above as below) are candidates around 3, 4 and 5 bits, `COLUMN_BITS_CANDIDATES`: the widths
come from GPTQ of the sampled rows at R bits (the uniform candidates' passes in the stack of grids when the menu
has all of them, else passes of their own; their groups' losses summed with the rows' Horvitz-Thompson weights,
an estimate of the whole linear's),
then GPTQ on them; they cost what R bits cost, and
one more bit per group and row for the zero points.

Grids with double-quantized scales (quantize/grid.py: each group's scale an 8-bit code of its row's unit, as in
QLoRA's double quantization and llama.cpp's K-quants) are candidates at 3, 4, 5 and 6 bits in groups of 32 and 64,
`DQ_CANDIDATES`, in the stack of grids: the scales cost 8 bits a group and row where GPTQ's layout spends 16, and
their group index 8 bits an input where it spends 32 (w4g64 on a [576, 576] linear: 4.229 bits per weight against
4.368), for GPTQ's error within a fraction of a percent, its codes fitted to the scales that are stored. Groups of
128 and whole rows would save a few hundredths of a bit and are left out.

Beside codebooks of pairs, five candidates are not measured (`BESIDE_CODEBOOKS`, `measured_candidates`): outliers
and per-input-channel grids at 2 bits, tables at 4 bits. Codebooks take their place at 2 bits, and the plans
choose them too seldom to pay for their measurement: re-planned from the 43 candidates of SmolLM2's measurement of
2026-12-07 without them, the plans for 2.25 to 3.25 and 5 bits per weight are the same linear for linear, and
4.25's differs in 13 of 210 linears, its predicted loss 0.09907 -> 0.09914 nats; measured alone they take 5.4 CPU
seconds per block (bench/results/measure-cost.md). A menu without codebooks measures them.

Decide: linears that read one input in one block (q/k/v, gate/up) share a configuration, as fused loaders
(vLLM) require; a multiple-choice knapsack (quantize/allocate.py) picks one candidate per such unit.
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .calibration import data
from .calibration.adapter import BlockRunner
from .calibration.fisher import WINDOWS_AT_ONCE, output_fisher
from .distributed import SOLO, World, from_owners, gathered_list, reduce_hessians
from .formats.errors import InputError
from .formats.source import ModelSource
from .layouts import layout_of
from .memory import release_freed_memory
from .pipeline import calibration_windows, collect_hessians, compute, linear_shapes
from .plan import (
    FISHER_LABELS,
    FLAGS,
    LUT_BITS,
    MAX_OUTLIERS,
    LayerPlan,
    QuantizeOptions,
    QuantPlan,
    stored_bits_valid,
    technique_problem,
    whole_or_half,
)
from .quantize.allocate import allocate
from .quantize.column_bits import COLUMN_BITS, gptq_column_bits_configs, with_widths
from .quantize.gptq import GridConfig, gptq_configs
from .quantize.lut import gptq_lut_configs
from .quantize.rtn import rtn_quantize
from .quantize.vq import gptq_vq_configs

PLAIN_CANDIDATES = tuple(LayerPlan(b, g, False) for b in (2, 3, 4, 8, 5, 6) for g in (32, 64, 128, -1))
OUTLIER_CANDIDATES = tuple(LayerPlan(b, 128, False, outliers=f) for b in (2, 3) for f in (0.005, 0.01))
LUT_CANDIDATES = tuple(LayerPlan(b, -1, False, lut=True) for b in LUT_BITS)
PER_IC_CANDIDATES = tuple(LayerPlan(b, g, False, per_ic=True) for b in (2, 3, 4) for g in (64, 128))
VQ_CANDIDATES = tuple(LayerPlan(b, g, False, vq=True) for b, g in ((2, 128), (2.5, 128), (3, 128), (3.5, 128),
                                                                     (4, 256)))
COLUMN_BITS_CANDIDATES = tuple(LayerPlan(b, 128, False, column_bits=True) for b in COLUMN_BITS)
DQ_CANDIDATES = tuple(LayerPlan(b, g, False, dq=True) for b in (3, 4, 5, 6) for g in (32, 64))
CANDIDATES = (PLAIN_CANDIDATES + OUTLIER_CANDIDATES + DQ_CANDIDATES      # in `sampled_losses`' order: the grids
              + LUT_CANDIDATES + PER_IC_CANDIDATES + VQ_CANDIDATES                      # of single rows, tables, per-IC grids, VQ,
              + COLUMN_BITS_CANDIDATES)                                # bits per group of columns
BESIDE_CODEBOOKS = frozenset([c for c in OUTLIER_CANDIDATES + PER_IC_CANDIDATES if c.bits == 2]   # not chosen
                             + [c for c in LUT_CANDIDATES if c.bits == 4])        # beside codebooks (docstring)
MEASURE_ROWS = 128        # rows of each linear the measurement runs GPTQ on (all of them when it has fewer)
MEASURE_WINDOWS = 64      # first calibration windows the measurement's Hessians come from (quantization uses all)
SHRINK_EVERY = 8          # the measurement's grid search tries every 8th of GPTQ's 80 shrink factors
PROXIES = ("fisher", "hessian")
PER_IC_WINDOW, PER_IC_WINDOWS = 128, 2     # rows per window and windows of the per-input-channel candidates
MEASUREMENT_VERSION = 8           # 8: double-quantized scales; 7: codebooks at 2.5 and 3.5 bits; 6: bits per group
                                  # of columns; 5: codebooks of pairs; 4: per-input-channel candidates; 3: lookup
                                  # tables; 2: outliers; 1-7 still read
MATCHING_OPTIONS = ("method", "act_order", "static_groups", "mse", "damp")


@dataclass
class Measurement:
    """Per linear and candidate: stored bits and predicted error under each proxy."""
    source: str                                  # fingerprint of the model
    calibration: str                             # fingerprint of the calibration windows
    description: str
    options: dict                                # the method options the errors were measured under
    candidates: list[LayerPlan]
    shapes: dict[str, tuple[int, int]]
    units: list[list[str]]                       # linears that share one configuration
    errors: dict[str, dict[str, list[float]]]    # proxy -> linear -> error per candidate
    fisher_windows: int = 0                      # calibration windows the Fisher came from (the first ones)
    base_nll: float | None = None                # the model's mean NLL on them, nats per predicted token
    fisher_labels: str = "data"                  # the labels the Fisher's NLL is of (calibration/fisher.py)

    def cost(self, name: str, c: int) -> int:
        candidate = self.candidates[c]
        return layout_of(candidate).stored_bits(*self.shapes[name], candidate)

    def as_dict(self) -> dict:
        return {"format_version": MEASUREMENT_VERSION, "source_fingerprint": self.source,
                "calibration_fingerprint": self.calibration, "calibration": self.description,
                "options": self.options,
                "candidates": [{"bits": c.bits, "group_size": c.group_size, "sym": c.sym, "outliers": c.outliers,
                                **{key: True for key in FLAGS if getattr(c, key)}}
                               for c in self.candidates],
                "units": self.units,
                "fisher": {"windows": self.fisher_windows, "nll": self.base_nll, "labels": self.fisher_labels},
                "layers": {name: {"shape": list(self.shapes[name]),
                                  "bits": [self.cost(name, c) for c in range(len(self.candidates))],
                                  **{proxy: self.errors[proxy][name] for proxy in PROXIES}}
                           for name in self.shapes}}

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.as_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str, source: ModelSource, opts: QuantizeOptions) -> Measurement:
        """A saved measurement, refused unless it was made on this model under the same method options."""
        where = str(path)
        try:
            body = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise InputError(f"{where}: cannot read the measurement ({e})") from None
        try:
            return cls._from(body, source, opts, where)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
            raise InputError(f"{where}: not a bitsmith measurement ({type(e).__name__}: {e})") from None

    @classmethod
    def _from(cls, body: dict, source: ModelSource, opts: QuantizeOptions, where: str) -> Measurement:
        if body["format_version"] not in range(1, MEASUREMENT_VERSION + 1):
            raise InputError(f"{where}: measurement format {body['format_version']!r}, expected "
                             f"{MEASUREMENT_VERSION} (or 1-{MEASUREMENT_VERSION - 1}); measure again with this "
                             "bitsmith")
        if body["source_fingerprint"] != source.fingerprint():
            raise InputError(f"{where}: measured on a different model (source fingerprint differs); measure "
                             "this model again")
        for key in MATCHING_OPTIONS:
            if body["options"][key] != getattr(opts, key):
                raise InputError(f"{where}: measured with {key}={body['options'][key]!r}, this run has "
                                 f"{getattr(opts, key)!r}; use the same options or measure again")
        if any(not stored_bits_valid(c["bits"], c.get("vq", False)) for c in body["candidates"]):
            raise InputError(f"{where}: a candidate's bits are not a width bitsmith stores")
        candidates = [LayerPlan(whole_or_half(c["bits"]), int(c["group_size"]), bool(c["sym"]),
                                outliers=float(c.get("outliers", 0.0)),
                                **{key: c.get(key, False) is True for key in FLAGS})
                      for c in body["candidates"]]
        if any(not 0 <= c.outliers <= MAX_OUTLIERS for c in candidates):
            raise InputError(f"{where}: a candidate's outliers are not a fraction from 0 to {MAX_OUTLIERS}")
        problem = next(filter(None, map(technique_problem, candidates)), None)
        if problem:
            raise InputError(f"{where}: a candidate's {problem}")
        missing = {1: "outlier, lookup-table, per-input-channel, codebook, column-bits and dq",
                   2: "lookup-table, per-input-channel, codebook, column-bits and dq",
                   3: "per-input-channel, codebook, column-bits and dq", 4: "codebook, column-bits and dq",
                   5: "column-bits and dq", 6: "half-bit codebook and dq", 7: "dq"}.get(body["format_version"])
        if missing:
            print(f"{where}: a measurement of format {body['format_version']} has no {missing} candidates: the "
                  f"plan chooses among its {len(candidates)} candidates (measure again to offer them all)",
                  file=sys.stderr)
        layers = body["layers"]
        shapes = {name: (int(v["shape"][0]), int(v["shape"][1])) for name, v in layers.items()}
        errors = {proxy: {name: [float(e) for e in v[proxy]] for name, v in layers.items()} for proxy in PROXIES}
        if any(len(e) != len(candidates) for table in errors.values() for e in table.values()):
            raise InputError(f"{where}: an error list does not match the candidate list")
        units = [[str(n) for n in unit] for unit in body["units"]]
        if sorted(n for unit in units for n in unit) != sorted(shapes):
            raise InputError(f"{where}: the units do not cover the measured linears exactly")
        fisher = body.get("fisher") or {"windows": 0, "nll": None}
        base_nll = None if fisher["nll"] is None else float(fisher["nll"])
        labels = fisher.get("labels", "data")             # measurements before the choice: the text's tokens
        if labels not in FISHER_LABELS:
            raise InputError(f"{where}: Fisher labels {labels!r}, expected one of {', '.join(FISHER_LABELS)}")
        return cls(body["source_fingerprint"], body["calibration_fingerprint"], body["calibration"],
                   body["options"], candidates, shapes, units, errors, int(fisher["windows"]), base_nll, labels)


def strata(key: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A systematic sample of `rows` of the entries of `key` taken in order of `key`: the middle entry of each
    of `rows` (nearly) equal strata, and how many entries each stands for. All entries when there are few."""
    n = key.numel()
    if n <= rows:
        return torch.arange(n), torch.ones(n)
    edges = torch.linspace(0, n, rows + 1).round().long()
    return torch.argsort(key, stable=True)[(edges[:-1] + edges[1:]) // 2], (edges[1:] - edges[:-1]).float()


def pps(key: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`rows` entries drawn with probability proportional to `key` (systematic, in order of `key`, midpoints),
    entries whose probability would reach 1 taken for certain; returns them and 1 / their probability, the
    Horvitz-Thompson weights (Cochran, sections 9A.5 and 9A.6)."""
    n = key.numel()
    if n <= rows:
        return torch.arange(n), torch.ones(n)
    key = key.double().clamp(min=0) + key.double().clamp(min=0).mean() * 1e-3 + 1e-300   # every row can be drawn
    certain = torch.zeros(n, dtype=torch.bool)
    while True:
        left = rows - int(certain.sum())
        prob = left * key / key[~certain].sum()
        more = ~certain & (prob >= 1)
        if not more.any():
            break
        certain |= more
    order = torch.argsort(torch.where(certain, -1.0, key), stable=True)[int(certain.sum()):]
    drawn = order[torch.searchsorted(torch.cumsum(prob[order], 0), torch.arange(left, dtype=torch.float64) + 0.5)]
    picked = torch.cat([certain.nonzero().squeeze(1), drawn])
    return picked, torch.cat([torch.ones(int(certain.sum()), dtype=torch.float64), 1 / prob[drawn]]).float()


SAMPLERS = {"strata": strata, "pps": pps}


def sampled_losses(W: torch.Tensor, H: torch.Tensor, fisher: torch.Tensor, configs: list[GridConfig],
                   opts: QuantizeOptions, rows: int = MEASURE_ROWS, sampler: str = "pps",
                   lut_bits: list[int] = (), per_ic: list[GridConfig] = (),
                   vq: list[LayerPlan] = (), column_bits: list[LayerPlan] = ()) -> tuple[list[float], list[float]]:
    """(Fisher-weighted, plain) GPTQ error of W under each grid configuration, then under a lookup table of
    each of `lut_bits`, then under each per-input-channel configuration, then under codebooks of pairs of each of
    `vq` (fitted on the whole of W), then with bits per group of columns around each of `column_bits` (their
    widths from the sample), estimated from a sample of rows:
    sum_o F_o loss_o / 2 (nats per token) and sum_o loss_o. Rows are drawn by `sampler` with their
    Fisher-weighted round-to-nearest error (4-bit, groups of 128) as the size; a table is per row, so a sampled
    row's table is the one the whole linear would get. Per-input-channel grids span rows: they are measured on
    whole windows of rows (`window_sample`)."""
    size = fisher * rtn_error(W, H)
    pick, weight = SAMPLERS[sampler](size, rows)
    parts = []                  # (losses [candidates, rows], the rows' Fisher, their Horvitz-Thompson weights)
    first = [GridConfig(c.bits, c.group_size) for c in column_bits]     # the widths' first passes: in the stack?
    stacked = bool(first) and set(first) <= set(configs) and not opts.static_groups
    score = torch.zeros(len(first) * len(pick), W.shape[1]) if stacked else None
    if configs:
        _, losses = gptq_configs(W[pick], H, configs, opts.act_order, opts.static_groups, opts.damp, mse=opts.mse,
                                 shrink_every=SHRINK_EVERY, keep=False, score=score,
                                 scored=[configs.index(f) for f in first] if stacked else None)
        parts.append((losses, fisher[pick], weight))
    if lut_bits:
        _, lut_losses = gptq_lut_configs(W[pick], H, list(lut_bits), opts.act_order, opts.damp, keep=False)
        parts.append((lut_losses, fisher[pick], weight))
    if per_ic:
        window, window_weight = window_sample(size, PER_IC_WINDOW, PER_IC_WINDOWS)
        _, ic_losses = gptq_configs(W[window], H, list(per_ic), opts.act_order, opts.static_groups, opts.damp,
                                    mse=opts.mse, shrink_every=SHRINK_EVERY, keep=False)
        parts.append((ic_losses, fisher[window], window_weight))
    if vq:
        _, vq_losses = gptq_vq_configs(W[pick], H, [(c.bits, c.group_size) for c in vq], opts.act_order,
                                       opts.damp, fit=W, keep=False)
        parts.append((vq_losses, fisher[pick], weight))
    if column_bits:
        n = len(pick)
        widths = [with_widths(f.bits, f.group_size, score[k * n:(k + 1) * n], weight)
                  for k, f in enumerate(first)] if stacked else None
        _, cb_losses = gptq_column_bits_configs(W[pick], H, [(c.bits, c.group_size) for c in column_bits],
                                                opts.act_order, opts.damp, opts.mse, SHRINK_EVERY, row_weight=weight,
                                                keep=False, widths=widths)
        parts.append((cb_losses, fisher[pick], weight))
    # each candidate's sums over its own rows alone (a product with the stack would round them by the stack's shape)
    fisher_losses = [float(x) for losses, f, w in parts for x in (losses * (w * f)).sum(dim=1) / 2]
    plain_losses = [float(x) for losses, _, w in parts for x in (losses * w).sum(dim=1)]
    return fisher_losses, plain_losses


def window_sample(size: torch.Tensor, window: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` windows of `window` consecutive rows (the last may be shorter), drawn by `pps` on their summed
    `size`; their rows in ascending order (so that every group of a divisor of `window` rows lies in one window)
    and each row's Horvitz-Thompson weight, its window's."""
    starts = list(range(0, size.numel(), window))
    windows, weights = pps(torch.stack([size[s:s + window].sum() for s in starts]), count)
    order = torch.argsort(windows)
    rows = [torch.arange(starts[i], min(starts[i] + window, size.numel())) for i in windows[order].tolist()]
    return torch.cat(rows), torch.cat([weights[j].expand(len(r)) for j, r in zip(order.tolist(), rows)])


def rtn_error(W: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """sum_j H_jj (w_oj - q_oj)^2 of every row o on 4-bit min-max groups of 128: how much a row stands to lose."""
    return ((W - rtn_quantize(W, 4, 128).Q) ** 2) @ torch.diag(H)


def units_of(runner: BlockRunner) -> list[list[str]]:
    family = runner.family
    return [[family.block_prefix.format(i=i) + name for name in group]
            for i in range(runner.n_blocks) for group in family.siblings]


def measured_candidates(menu: tuple[str, ...]) -> list[LayerPlan]:
    """The candidates of the techniques on `menu`, in CANDIDATES' order; those of `BESIDE_CODEBOOKS` only when
    codebooks of pairs are not on it."""
    return [c for c in CANDIDATES if c.technique in menu and ("vq" not in menu or c not in BESIDE_CODEBOOKS)]


@torch.no_grad()
def measure(source: ModelSource, opts: QuantizeOptions, progress: bool = True, world: World = SOLO,
            calib: tuple[torch.Tensor, str] | None = None) -> Measurement:
    """One pass over the calibration windows with the weights as they are (see the module docstring): `calib`'s
    (windows, description) when the run has drawn them already, else those `opts` draw. Processes of
    a parallel run (`world`) share the Fisher windows and the measurement's batches, sum the statistics, share the
    linears out, and all return the measurement one process makes."""
    if opts.method != "gptq":
        raise InputError(f"--target-bpw plans GPTQ layers; --method {opts.method} is not gptq")
    runner = BlockRunner(source.config)
    family, shapes = runner.family, linear_shapes(runner)
    windows, description = calib or calibration_windows(source, source.tokenizer(), opts, progress)
    fisher_windows = windows[:opts.fisher_samples]
    fisher, base_nll = output_fisher(runner, source, fisher_windows, list(shapes), progress,
                                     autocast=lambda: compute(opts),
                                     share=world.share(fisher_windows.shape[0], WINDOWS_AT_ONCE),
                                     gather=lambda values: gathered_list(values, world),
                                     labels=opts.fisher_labels, seed=opts.seed)
    candidates = measured_candidates(opts.menu)
    configs = [GridConfig(c.bits, c.group_size, c.sym, c.outliers, dq=c.dq) for c in candidates
               if not (c.lut or c.per_ic or c.vq or c.column_bits)]
    lut_bits = [c.bits for c in candidates if c.lut]
    per_ic = [GridConfig(c.bits, c.group_size, c.sym, per_ic=True) for c in candidates if c.per_ic]
    vq = [c for c in candidates if c.vq]
    column_bits = [c for c in candidates if c.column_bits]
    errors = {proxy: {} for proxy in PROXIES}
    measured = windows[:MEASURE_WINDOWS]
    measured = measured[world.share(measured.shape[0], opts.batch)]
    hidden = F.embedding(measured, source.get(family.embed).to(torch.float32))
    for i in tqdm(range(runner.n_blocks), desc="measure", unit="block", disable=not progress):
        prefix = family.block_prefix.format(i=i)
        block = runner.build_block(i, {n: source.get(n) for n in runner.block_names(i)})
        pos = runner.position_embeddings(hidden[:1])
        hessians = collect_hessians(runner, block, hidden, pos, opts, family.siblings, in_place=True)
        reduce_hessians(hessians, world)
        jobs = [(group, name) for group in family.siblings for name in group]
        weights = [block.get_submodule(name).weight.data.to(torch.float32) for _, name in jobs]
        losses = from_owners([lambda W=W, h=hessians[group], full=prefix + name: _losses(
                                  W, h.H, fisher[full], configs, opts, lut_bits, per_ic, vq, column_bits, full)
                              for W, (group, name) in zip(weights, jobs)],
                             [W.shape[1] ** 2 for W in weights], world)
        for (_, name), (by_fisher, plain) in zip(jobs, losses):
            errors["fisher"][prefix + name], errors["hessian"][prefix + name] = by_fisher, plain
        runner.release_block(i)
        release_freed_memory()
    options = {key: getattr(opts, key) for key in MATCHING_OPTIONS}
    return Measurement(source.fingerprint(), data.fingerprint(windows), description, options, candidates,
                       shapes, units_of(runner), errors, min(opts.fisher_samples, windows.shape[0]), base_nll,
                       opts.fisher_labels)


def _losses(W, H, fisher, configs, opts, lut_bits, per_ic, vq, column_bits,
            name: str) -> tuple[list[float], list[float]]:
    try:
        return sampled_losses(W, H, fisher, configs, opts, lut_bits=lut_bits, per_ic=per_ic, vq=vq,
                              column_bits=column_bits)
    except ValueError as e:
        raise InputError(f"{name}: {e}") from None


def decide(measurement: Measurement, target_bpw: float, opts: QuantizeOptions, proxy: str = "fisher") -> QuantPlan:
    """The plan with the least predicted error whose stored bits, over all measured linears, are at most
    target_bpw per weight, among the measurement's candidates of the techniques in `opts.menu`."""
    weights = sum(out * inp for out, inp in measurement.shapes.values())
    budget = math.floor(target_bpw * weights)
    table = measurement.errors[proxy]
    offered = [c for c, candidate in enumerate(measurement.candidates) if candidate.technique in opts.menu]
    if not offered:
        raise InputError(f"--menu {','.join(opts.menu)}: the measurement has no candidate of these techniques "
                         f"(it has {', '.join(sorted({c.technique for c in measurement.candidates}))})")
    costs = [[sum(measurement.cost(name, c) for name in unit) for c in offered] for unit in measurement.units]
    errors = [[sum(table[name][c] for name in unit) for c in offered] for unit in measurement.units]
    cheapest = sum(min(row) for row in costs)
    if cheapest > budget:
        raise InputError(f"--target-bpw {target_bpw}: below the least this model can be stored in "
                         f"({cheapest / weights:.3f} bits per weight)")
    choice = [offered[k] for k in allocate(costs, errors, budget)]
    layers = {}
    for unit, c in zip(measurement.units, choice):
        config = measurement.candidates[c]
        for name in unit:
            layers[name] = replace(config, predicted_error=table[name][c])
    ordered = {name: layers[name] for name in measurement.shapes}
    return QuantPlan(opts, ordered, target_bpw)

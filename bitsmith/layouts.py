"""Layouts: how one configuration of a linear becomes stored tensors, an entry of `quantization_config`, and
a runtime module. Quantizers return unpacked results (`QuantizedWeight`); only this module packs them.

GPTQ (v1 convention, `checkpoint_format: "gptq"`, the tensors GPTQ loaders read; kernels/reference.py):
  qweight int32 [packed(in), out], scales fp16 [G, out], qzeros int32 [G, packed(out)] (zero - 1),
  g_idx int32 [in] (always written, i // group_size without act-order: loaders that build it from nothing
  may read uninitialised memory). packed(n) = ceil(n * bits / 32) words (formats/packing.py), GPTQModel's shapes.
Every zero point is in [1, maxq] (quantize/grid.py), so zero - 1 never wraps: vLLM (stored + 1), GPTQModel (its
v1 -> v2 conversion adds 1 to every packed field at once) and bitsmith (stored + 1 mod 2^bits) read the same
zeros. v1 rather than GPTQModel's `gptq_v2` (true zeros): vLLM's gptq_gemm reads v2 only in its newer versions
and older ones take v2 zeros for v1 without a word, and AutoGPTQ-era readers know only v1.
Per-linear choices that differ from the checkpoint-wide one go into GPTQModel's `dynamic` block: keys
`+:REGEX` matched (re.match, anchored at the start) against the full module name, values overriding
bits / group_size / sym / desc_act; `-:REGEX` leaves a module unquantized; the first match wins.

Dense-and-sparse (a plan entry with `outliers` > 0; SpQR, Dettmers et al. 2023; SqueezeLLM, Kim et al. 2023):
the GPTQ tensors above, whose codes at the outlier positions are zero points, and the outliers in CSR
(formats/csr.py): outlier_values fp16 [nnz], outlier_cols int16 [nnz] (int32 past 32767 inputs),
outlier_row_ptr int32 [out + 1]; every row keeps round(outliers * in) of them, so nnz follows from the entry.
W = the dequantized codes with the outliers written over them. GPTQ loaders cannot read the sparse part: a
checkpoint holding such a linear is declared `quant_method: "bitsmith"` (`gptq_expressible`), and its
`quantization_config` names `outliers` in the base entry and in every `dynamic` rule.

Lookup tables (a plan entry with `lut`; SqueezeLLM, Kim et al. 2023): the codes packed as GPTQ's qweight and
lut fp16 [out, 2^bits], each output row's centroids (`LUTLayout`); also `quant_method: "bitsmith"` only.

Per-input-channel groups (a plan entry with `per_ic`; AdaDim, quantize/per_ic.py): the codes packed as GPTQ's
qweight, scales fp16 [G, in] and qzeros int32 [G, packed(in)] (true zeros packed along the input), G groups of
`group_size` output rows (`PerICLayout`); also `quant_method: "bitsmith"` only.

Codebooks of pairs (a plan entry with `vq`; GPTVQ, quantize/vq.py): qweight int32 [packed(in / 2), out], each pair
of inputs' index of 2 x bits bits (5 and 7 at 2.5 and 3.5 bits) packed as GPTQ packs its codes, codebooks fp16
[G, 2^(2 bits), 2] (G blocks of `group_size` inputs) and row_scales fp16 [out] (`VQLayout`); also `quant_method:
"bitsmith"` only.

Bits per group of columns (a plan entry with `column_bits`; BAQ, quantize/column_bits.py): each group of columns'
codes packed at its own width one group after another, qweight int32 [words, out], scales fp16 [G, out], qzeros
int32 [G, packed(out, bits + 1)] (true zeros), g_idx int32 [in] and widths uint8 [G] (`ColumnBitsLayout`,
kernels/column_bits_linear.py); also `quant_method: "bitsmith"` only.

Double-quantized scales (a plan entry with `dq`; QLoRA's double quantization, llama.cpp's K-quants;
quantize/grid.py): the GPTQ tensors but the scales, stored as scale_codes uint8 [G, out] (c = 1..255) and
scale_unit fp16 [out] (scale = fp16(c u)), and g_idx in the narrowest integer type that holds G groups (uint8 up
to 256) (`DQLayout`, kernels/dq_linear.py, which expands the scales at load); also `quant_method: "bitsmith"` only.

Each layout also says which of its tensors holds the continuous levels (`levels`: the scales, or the tables) and
gives W as a function of them with every code fixed: what end-to-end tuning learns (quantize/tune.py).

`layout_of(layer)` is the one place that says which layout a plan entry (or a checkpoint's layer entry) uses.
"""
from __future__ import annotations

import re
from collections import Counter

import torch

from .formats.csr import csr_bits, to_csr
from .formats.errors import InputError
from .formats.packing import pack, packed_length, trim_earlier_padding, unpack
from .kernels.column_bits_linear import (
    ColumnBitsLinear,
    column_bits_dequantize,
    column_words,
    pack_groups,
    unpack_groups,
    zeros_past_grid,
)
from .kernels.dq_linear import DQLinear, dq_dequantize, group_index_dtype
from .kernels.linear import DenseSparseLinear, QuantizedLinear
from .kernels.lut_linear import LUTLinear, lut_dequantize
from .kernels.per_ic_linear import PerICLinear, per_ic_dequantize
from .kernels.reference import csr_rows, dense_sparse_dequantize, dequantize, unpack_zeros
from .kernels.vq_linear import VQLinear, vq_dequantize
from .plan import FLAGS, MAX_OUTLIERS, LayerPlan, QuantPlan, stored_bits_valid, technique_problem, whole_or_half
from .quantize.grid import scale_codes, stored_ste
from .quantize.lut import LutWeight
from .quantize.outliers import DenseSparseWeight, outlier_count
from .quantize.per_ic import PerICWeight, expand_rows, row_span
from .quantize.rtn import ColumnBitsWeight, DQWeight, QuantizedWeight
from .quantize.tune import Level, Levels
from .quantize.vq import VQWeight, entries, flat_index, index_bits, lookup, span


class GPTQLayout:
    """The GPTQ tensors of one linear, their exact size, the weight they hold and their runtime module."""

    parts = ("qweight", "scales", "qzeros", "g_idx")      # tensor name suffixes, as `tensors` writes them

    @staticmethod
    def tensors(qw: QuantizedWeight, any_zero: bool = False) -> dict[str, torch.Tensor]:
        """The stored tensors; `any_zero` lets a zero point of 0 through (stored as maxq, which bitsmith reads
        back as 0, mod 2^bits: weights imported from a format that has such zeros)."""
        maxq = (1 << qw.bits) - 1
        if not any_zero and qw.zeros.numel() and not (1 <= int(qw.zeros.min()) and int(qw.zeros.max()) <= maxq):
            raise ValueError(f"zero points must be in [1, {maxq}] to be stored as GPTQ v1 zero - 1 "
                             f"(got {int(qw.zeros.min())}..{int(qw.zeros.max())})")
        return {"qweight": pack(qw.codes.t(), qw.bits, dim=0),
                "scales": qw.scales.contiguous(),
                "qzeros": pack((qw.zeros - 1) & maxq, qw.bits, dim=1),   # v1 stores zero - 1
                "g_idx": qw.group_index().to(torch.int32).contiguous()}

    @staticmethod
    def stored_bits(out_features: int, in_features: int, layer: LayerPlan) -> int:
        """Bits of every tensor `tensors` writes for an [out, in] linear under `layer`."""
        groups = 1 if layer.group_size == -1 else -(-in_features // layer.group_size)
        words = packed_length(in_features, layer.bits) * out_features + groups * packed_length(out_features,
                                                                                               layer.bits)
        return 32 * words + 16 * groups * out_features + 32 * in_features

    @staticmethod
    def weight(stored, layer: LayerPlan, in_features: int) -> torch.Tensor:
        """The float32 weight [out, in] the tensors hold (`stored(suffix)` gives each): exactly the Q the
        quantizer returned."""
        return dequantize(stored("qweight"), stored("scales"), stored("qzeros"), stored("g_idx"), layer.bits,
                          in_features)

    @staticmethod
    def levels(stored, layer: LayerPlan, in_features: int, dtype: torch.dtype = torch.float32) -> Levels:
        """What end-to-end tuning learns of the tensors (quantize/tune.py): their scales, W = s[g] * (q - z)
        with the codes and zero points fixed, computed in `dtype`; they move relative to themselves."""
        q = unpack(stored("qweight"), layer.bits, in_features, dim=0).t()              # [out, in]
        scales = stored("scales")
        g = stored("g_idx").long()
        steps = (q.to(torch.int16) - unpack_zeros(stored("qzeros"), layer.bits, scales.shape[1]).t()[:, g]).to(dtype)
        return Levels([Level("scales", scales, scales.float())], lambda s: s.t()[:, g] * steps)

    @staticmethod
    def module(in_features: int, out_features: int, layer: LayerPlan, bias: bool,
               has_g_idx: bool = True) -> QuantizedLinear:
        """The runtime module the tensors load into (checkpoints of other tools may lack g_idx)."""
        return _reads_earlier_padding(QuantizedLinear(in_features, out_features, layer.bits, layer.group_size,
                                                      bias=bias, has_g_idx=has_g_idx))


class DenseSparseLayout(GPTQLayout):
    """The GPTQ tensors of the dense part and the outliers in CSR (module docstring)."""

    parts = GPTQLayout.parts + ("outlier_values", "outlier_cols", "outlier_row_ptr")

    @staticmethod
    def nnz(out_features: int, in_features: int, layer: LayerPlan) -> int:
        """Outliers of an [out, in] linear under `layer`: the same count in every row."""
        return out_features * outlier_count(layer.outliers, in_features)

    @staticmethod
    def tensors(qw: DenseSparseWeight) -> dict[str, torch.Tensor]:
        in_features = qw.codes.shape[1]
        csr = to_csr(qw.outliers.mask(in_features), qw.outliers.dense(in_features))
        return {**GPTQLayout.tensors(qw), "outlier_values": csr.values, "outlier_cols": csr.cols,
                "outlier_row_ptr": csr.row_ptr}

    @staticmethod
    def stored_bits(out_features: int, in_features: int, layer: LayerPlan) -> int:
        return (GPTQLayout.stored_bits(out_features, in_features, layer)
                + csr_bits(out_features, in_features, DenseSparseLayout.nnz(out_features, in_features, layer)))

    @staticmethod
    def weight(stored, layer: LayerPlan, in_features: int) -> torch.Tensor:
        return dense_sparse_dequantize(*(stored(part) for part in ("qweight", "scales", "qzeros", "g_idx")),
                                       layer.bits, in_features, *(stored(part) for part in DenseSparseLayout.parts[4:]))

    @staticmethod
    def levels(stored, layer: LayerPlan, in_features: int, dtype: torch.dtype = torch.float32) -> Levels:
        """The dense part's scales (its codes at the outliers are zero points: no step there); the outliers
        stay as stored."""
        dense = GPTQLayout.levels(stored, layer, in_features, dtype)
        values, cols, row_ptr = (stored(part) for part in DenseSparseLayout.parts[4:])
        at = (csr_rows(row_ptr), cols.long())
        return Levels(dense.parts, lambda s: (W := dense.weight(s)).index_put(at, values.to(W.dtype)))

    @staticmethod
    def module(in_features: int, out_features: int, layer: LayerPlan, bias: bool,
               has_g_idx: bool = True) -> DenseSparseLinear:
        return _reads_earlier_padding(DenseSparseLinear(in_features, out_features, layer.bits, layer.group_size,
                                                        DenseSparseLayout.nnz(out_features, in_features, layer),
                                                        bias=bias, has_g_idx=has_g_idx))


class LUTLayout:
    """Codes into a lookup table per output row (SqueezeLLM; quantize/lut.py, kernels/lut_linear.py): qweight
    int32 [packed(in), out] packed as GPTQ's, lut fp16 [out, 2^bits]. No GPTQ loader reads it."""

    parts = ("qweight", "lut")

    @staticmethod
    def tensors(qw: LutWeight) -> dict[str, torch.Tensor]:
        return {"qweight": pack(qw.codes.t(), qw.bits, dim=0), "lut": qw.lut.contiguous()}

    @staticmethod
    def stored_bits(out_features: int, in_features: int, layer: LayerPlan) -> int:
        return 32 * packed_length(in_features, layer.bits) * out_features + 16 * out_features * (1 << layer.bits)

    @staticmethod
    def weight(stored, layer: LayerPlan, in_features: int) -> torch.Tensor:
        return lut_dequantize(stored("qweight"), stored("lut"), layer.bits, in_features)

    @staticmethod
    def levels(stored, layer: LayerPlan, in_features: int, dtype: torch.dtype = torch.float32) -> Levels:
        """The tables: W = lut[o, q] with the codes fixed; they move in units of each row's mean spacing."""
        codes = unpack(stored("qweight"), layer.bits, in_features, dim=0).t().long()
        lut = stored("lut").float()
        spacing = (lut[:, -1:] - lut[:, :1]) / (lut.shape[1] - 1)
        return Levels([Level("lut", stored("lut"), spacing)], lambda c: c.gather(1, codes))

    @staticmethod
    def module(in_features: int, out_features: int, layer: LayerPlan, bias: bool,
               has_g_idx: bool = False) -> LUTLinear:
        return LUTLinear(in_features, out_features, layer.bits, bias=bias)


class PerICLayout:
    """Per-input-channel grids (module docstring; kernels/per_ic_linear.py). No GPTQ loader reads it."""

    parts = ("qweight", "scales", "qzeros")

    @staticmethod
    def tensors(qw: PerICWeight) -> dict[str, torch.Tensor]:
        return {"qweight": pack(qw.codes.t(), qw.bits, dim=0), "scales": qw.scales.contiguous(),
                "qzeros": pack(qw.zeros, qw.bits, dim=1)}

    @staticmethod
    def stored_bits(out_features: int, in_features: int, layer: LayerPlan) -> int:
        groups = -(-out_features // row_span(layer.group_size, out_features))
        words = packed_length(in_features, layer.bits) * (out_features + groups)
        return 32 * words + 16 * groups * in_features

    @staticmethod
    def weight(stored, layer: LayerPlan, in_features: int) -> torch.Tensor:
        return per_ic_dequantize(stored("qweight"), stored("scales"), stored("qzeros"), layer.bits, in_features,
                                 layer.group_size)

    @staticmethod
    def levels(stored, layer: LayerPlan, in_features: int, dtype: torch.dtype = torch.float32) -> Levels:
        """The scales of the grids of every group of rows and input channel, codes and zero points fixed."""
        q = unpack(stored("qweight"), layer.bits, in_features, dim=0).t()              # [out, in]
        rows = q.shape[0]
        zeros = expand_rows(unpack(stored("qzeros"), layer.bits, in_features, dim=1), layer.group_size, rows)
        steps = (q.to(torch.int16) - zeros.to(torch.int16)).to(dtype)
        scales = stored("scales")
        return Levels([Level("scales", scales, scales.float())],
                      lambda s: expand_rows(s, layer.group_size, rows) * steps)

    @staticmethod
    def module(in_features: int, out_features: int, layer: LayerPlan, bias: bool,
               has_g_idx: bool = False) -> PerICLinear:
        return PerICLinear(in_features, out_features, layer.bits, layer.group_size, bias=bias)


class VQLayout:
    """Codebooks of pairs of inputs (module docstring; quantize/vq.py, kernels/vq_linear.py). No GPTQ loader reads
    it."""

    parts = ("qweight", "codebooks", "row_scales")

    @staticmethod
    def tensors(qw: VQWeight) -> dict[str, torch.Tensor]:
        return {"qweight": pack(qw.codes.t(), index_bits(qw.bits), dim=0), "codebooks": qw.codebooks.contiguous(),
                "row_scales": qw.scales.contiguous()}

    @staticmethod
    def stored_bits(out_features: int, in_features: int, layer: LayerPlan) -> int:
        blocks = -(-in_features // span(layer.group_size, in_features))
        return (32 * packed_length(in_features // 2, index_bits(layer.bits)) * out_features
                + 16 * blocks * entries(layer.bits) * 2 + 16 * out_features)

    @staticmethod
    def weight(stored, layer: LayerPlan, in_features: int) -> torch.Tensor:
        return vq_dequantize(stored("qweight"), stored("codebooks"), stored("row_scales"), layer.bits, in_features,
                             layer.group_size)

    @staticmethod
    def levels(stored, layer: LayerPlan, in_features: int, dtype: torch.dtype = torch.float32) -> Levels:
        """The codebooks and the row scales, the codes fixed: W = s_o C[g, q, t]; each codebook's coordinate t moves
        in units of its range over sqrt(K) - 1 (the spacing of K points on a square grid: a step size, only near
        the spacing of the 8 x 4 and 16 x 8 product grids of 32 and 128 entries), a row scale relative to itself."""
        codes = unpack(stored("qweight"), index_bits(layer.bits), in_features // 2, dim=0).t()
        index = flat_index(codes, entries(layer.bits), layer.group_size)
        books, scales = stored("codebooks"), stored("row_scales")
        t = books.float()
        spacing = (t.amax(1, keepdim=True) - t.amin(1, keepdim=True)) / (entries(layer.bits) ** 0.5 - 1)
        return Levels([Level("codebooks", books, spacing), Level("row_scales", scales, scales.float())],
                      lambda C, s: s[:, None] * lookup(C, index))

    @staticmethod
    def module(in_features: int, out_features: int, layer: LayerPlan, bias: bool,
               has_g_idx: bool = False) -> VQLinear:
        return VQLinear(in_features, out_features, layer.bits, layer.group_size, bias=bias)


class ColumnBitsLayout:
    """Grids whose groups of columns have bits of their own (module docstring; kernels/column_bits_linear.py). No
    GPTQ loader reads it."""

    parts = ("qweight", "scales", "qzeros", "g_idx", "widths")

    @staticmethod
    def tensors(qw: ColumnBitsWeight) -> dict[str, torch.Tensor]:
        g_idx = qw.group_index().to(torch.int32).contiguous()
        widths = qw.widths.to(torch.uint8)
        inp = qw.codes.shape[1]
        qweight = pack_groups(qw.codes, g_idx, widths)
        if qweight.shape[0] != column_words(inp, qw.bits, qw.group_size):
            raise ValueError(f"widths {widths.tolist()} do not keep {qw.bits} bits a weight in groups of "
                             f"{qw.group_size} (as many above as below, a short last group on {qw.bits})")
        if zeros_past_grid(qw.zeros, widths):
            raise ValueError("a zero point lies past its group's grid")
        return {"qweight": qweight, "scales": qw.scales.contiguous(), "qzeros": pack(qw.zeros, qw.bits + 1, dim=1),
                "g_idx": g_idx, "widths": widths}

    @staticmethod
    def stored_bits(out_features: int, in_features: int, layer: LayerPlan) -> int:
        groups = -(-in_features // layer.group_size)
        return (32 * column_words(in_features, layer.bits, layer.group_size) * out_features + 16 * groups * out_features
                + 32 * groups * packed_length(out_features, layer.bits + 1) + 32 * in_features + 8 * groups)

    @staticmethod
    def weight(stored, layer: LayerPlan, in_features: int) -> torch.Tensor:
        return column_bits_dequantize(*(stored(part) for part in ColumnBitsLayout.parts), layer.bits)

    @staticmethod
    def levels(stored, layer: LayerPlan, in_features: int, dtype: torch.dtype = torch.float32) -> Levels:
        """The scales, W = s[g] * (q - z) with the codes and zero points fixed (as GPTQLayout.levels)."""
        q = unpack_groups(stored("qweight"), stored("g_idx"), stored("widths"))
        scales = stored("scales")
        g = stored("g_idx").long()
        zeros = unpack(stored("qzeros"), layer.bits + 1, scales.shape[1], dim=1)
        steps = (q.to(torch.int16) - zeros.t()[:, g].to(torch.int16)).to(dtype)
        return Levels([Level("scales", scales, scales.float())], lambda s: s.t()[:, g] * steps)

    @staticmethod
    def module(in_features: int, out_features: int, layer: LayerPlan, bias: bool,
               has_g_idx: bool = True) -> ColumnBitsLinear:
        return ColumnBitsLinear(in_features, out_features, layer.bits, layer.group_size, bias=bias)


class DQLayout:
    """The GPTQ tensors with double-quantized scales (module docstring; kernels/dq_linear.py). No GPTQ loader reads
    it."""

    parts = ("qweight", "scale_codes", "scale_unit", "qzeros", "g_idx")

    @staticmethod
    def tensors(qw: DQWeight) -> dict[str, torch.Tensor]:
        gptq = GPTQLayout.tensors(qw)
        return {"qweight": gptq["qweight"], "scale_codes": scale_codes(qw.scales, qw.unit),
                "scale_unit": qw.unit.to(torch.float16).contiguous(), "qzeros": gptq["qzeros"],
                "g_idx": gptq["g_idx"].to(group_index_dtype(qw.scales.shape[0]))}

    @staticmethod
    def stored_bits(out_features: int, in_features: int, layer: LayerPlan) -> int:
        groups = -(-in_features // layer.group_size)
        words = packed_length(in_features, layer.bits) * out_features + groups * packed_length(out_features,
                                                                                               layer.bits)
        index_bits = torch.iinfo(group_index_dtype(groups)).bits
        return 32 * words + 8 * groups * out_features + 16 * out_features + index_bits * in_features

    @staticmethod
    def weight(stored, layer: LayerPlan, in_features: int) -> torch.Tensor:
        return dq_dequantize(*(stored(part) for part in DQLayout.parts), layer.bits, in_features)

    @staticmethod
    def levels(stored, layer: LayerPlan, in_features: int, dtype: torch.dtype = torch.float32) -> Levels:
        """The scales' codes, W = fp16(c u)[g] * (q - z) with the codes q, the zero points and the units fixed: each
        code moves relative to itself and is rounded to a whole code (quantize/tune.py)."""
        q = unpack(stored("qweight"), layer.bits, in_features, dim=0).t()              # [out, in]
        codes, unit = stored("scale_codes"), stored("scale_unit").float()
        g = stored("g_idx").long()
        steps = (q.to(torch.int16) - unpack_zeros(stored("qzeros"), layer.bits, codes.shape[1]).t()[:, g]).to(dtype)
        return Levels([Level("scale_codes", codes, codes.float(), whole=True)],
                      lambda c: stored_ste(c.float() * unit).to(c.dtype).t()[:, g] * steps)

    @staticmethod
    def module(in_features: int, out_features: int, layer: LayerPlan, bias: bool,
               has_g_idx: bool = True) -> DQLinear:
        return _reads_earlier_padding(DQLinear(in_features, out_features, layer.bits, layer.group_size, bias=bias))


def _reads_earlier_padding(module: QuantizedLinear) -> QuantizedLinear:
    """`module`, loading the packed tensors of checkpoints written with whole runs of 32 codes per packed
    column (earlier bitsmith versions) as well: their extra words hold only zero padding."""
    def trim(module, state_dict, prefix, *args):
        for part, n, dim in (("qweight", module.in_features, 0), ("qzeros", module.out_features, 1)):
            if prefix + part in state_dict:
                state_dict[prefix + part] = trim_earlier_padding(state_dict[prefix + part], n, module.bits, dim)
    module._register_load_state_dict_pre_hook(trim, with_module=True)      # public only from torch 2.5
    return module


def layout_of(layer: LayerPlan) -> type[GPTQLayout | LUTLayout | PerICLayout | VQLayout | ColumnBitsLayout | DQLayout]:
    """The layout a plan entry is stored in: codebooks of pairs, bits per group of columns, a lookup table,
    per-input-channel grids, double-quantized scales, dense-and-sparse when it keeps outliers, else GPTQ."""
    if layer.vq:
        return VQLayout
    if layer.dq:
        return DQLayout
    if layer.column_bits:
        return ColumnBitsLayout
    if layer.lut:
        return LUTLayout
    if layer.per_ic:
        return PerICLayout
    return DenseSparseLayout if layer.outliers else GPTQLayout


def gptq_expressible(plan: QuantPlan) -> bool:
    """Whether every linear of the plan fits the GPTQ convention, a uniform grid of GPTQ's widths (LayerPlan.technique;
    else the checkpoint is quant_method bitsmith)."""
    return all(layer.technique == "uniform" for layer in plan.layers.values())


def plan_bits(plan: QuantPlan, shapes: dict[str, tuple[int, int]]) -> tuple[int, int]:
    """(stored bits, weights) over the plan's linears: all-in bits per weight is their ratio."""
    bits = sum(layout_of(layer).stored_bits(*shapes[name], layer) for name, layer in plan.layers.items())
    return bits, sum(out * inp for out, inp in (shapes[name] for name in plan.layers))


def _entry(layer: LayerPlan, desc_act: bool, extended: bool) -> dict:
    """One configuration as `quantization_config` fields; `extended` (a bitsmith-only checkpoint) names outliers,
    lookup tables, per-input-channel groups, codebooks of pairs and bits per group of columns in every entry."""
    return {"bits": layer.bits, "group_size": layer.group_size, "sym": layer.sym, "desc_act": desc_act,
            **({"outliers": layer.outliers, **{key: getattr(layer, key) for key in FLAGS}} if extended else {})}


def _config_key(layer: LayerPlan) -> tuple:
    return layer.bits, layer.group_size, layer.sym, layer.outliers, *(getattr(layer, key) for key in FLAGS)


def gptq_config(plan: QuantPlan, shapes: dict[str, tuple[int, int]]) -> dict:
    """The checkpoint-wide fields (the configuration holding the most weights) and a `dynamic` rule for every
    linear that differs from it; `outliers` in each of them when some linear keeps outliers."""
    desc_act = plan.options.act_order and plan.options.method == "gptq"
    extended = not gptq_expressible(plan)
    weight = Counter()
    for name, layer in plan.layers.items():
        weight[_config_key(layer)] += shapes[name][0] * shapes[name][1]
    most = max(weight, key=lambda k: (weight[k], k))
    base = LayerPlan(*most[:3], outliers=most[3], **dict(zip(FLAGS, most[4:])))
    dynamic = {f"+:{re.escape(name)}$": _entry(layer, desc_act, extended)
               for name, layer in plan.layers.items() if _config_key(layer) != most}
    return {**_entry(base, desc_act, extended), **({"dynamic": dynamic} if dynamic else {})}


EXTENDED = ("outliers", *FLAGS)      # the fields only bitsmith checkpoints have


def checkpoint_format(qconfig: dict) -> str:
    """A GPTQ config's zero-point convention, lower case: "gptq" (v1) or "gptq_v2" (GPTQModel writes
    `checkpoint_format`, its older versions `format`); anything else as its repr."""
    fmt = qconfig.get("checkpoint_format", qconfig.get("format", "gptq"))
    return fmt.lower() if isinstance(fmt, str) else repr(fmt)


def layer_config(qconfig: dict, name: str) -> dict | None:
    """bits / group_size / sym (and outliers, where the configuration names them) of module `name` under
    `qconfig`, after its `dynamic` rules (GPTQModel's semantics: `-:` rules first, then the first matching
    rule); None when a `-:` rule excludes it. Only GPTQ v1 tensors are read (`checkpoint_format` "gptq", or
    GPTQModel's `format`): a "gptq_v2" checkpoint's true zero points would read one step off."""
    fmt = checkpoint_format(qconfig)
    if fmt != "gptq":
        raise InputError(f"quantization_config: checkpoint_format {fmt!r} is not read (only \"gptq\": GPTQ v1, zero "
                         "points stored minus one)")
    base = {"bits": qconfig.get("bits", 4), "group_size": qconfig.get("group_size", 128),
            "sym": qconfig.get("sym", False),
            **{k: qconfig[k] for k in EXTENDED if k in qconfig}}
    dynamic = qconfig.get("dynamic") or {}
    if not isinstance(dynamic, dict):
        raise InputError("quantization_config: dynamic must be an object of REGEX -> overrides")
    rules = sorted(dynamic.items(), key=lambda kv: not kv[0].startswith("-:"))
    for key, override in rules:
        pattern = key[2:] if key.startswith(("+:", "-:")) else key
        try:
            hit = re.match(pattern, name)
        except re.error as e:
            raise InputError(f"quantization_config: dynamic rule {key!r} is not a valid regex ({e})") from None
        if hit and key.startswith("-:"):
            return None
        if hit:
            if not isinstance(override, dict):
                raise InputError(f"quantization_config: dynamic rule {key!r} must map to an object")
            return {**base, **{k: override[k] for k in (*base, *EXTENDED) if k in override}}
    return base


def layer_plan(layer: dict, where: str) -> LayerPlan:
    """A checkpoint's layer entry (`layer_config`) as a plan entry, checked."""
    bits, group, outliers = layer["bits"], layer["group_size"], layer.get("outliers", 0)
    if not stored_bits_valid(bits, layer.get("vq", False)) or type(group) is not int or (group != -1 and group < 1):
        raise InputError(f"{where}: unsupported bits {bits!r} / group_size {group!r} in quantization_config")
    bits = whole_or_half(bits)
    if type(outliers) not in (int, float) or not 0 <= outliers <= MAX_OUTLIERS:
        raise InputError(f"{where}: outliers {outliers!r} in quantization_config is not a fraction from 0 to "
                         f"{MAX_OUTLIERS}")
    flags = {key: layer.get(key, False) for key in FLAGS}
    for key, flag in flags.items():
        if not isinstance(flag, bool):
            raise InputError(f"{where}: {key} {flag!r} in quantization_config: expected true or false")
    plan = LayerPlan(bits, group, bool(layer["sym"]), outliers=float(outliers), **flags)
    problem = technique_problem(plan)
    if problem:
        raise InputError(f"{where}: {problem} (quantization_config)")
    return plan


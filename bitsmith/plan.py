"""What to quantize and how: the options of `bitsmith quantize`, validated once, before any heavy work."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from .formats.errors import InputError
from .formats.packing import GPTQ_BITS, SUPPORTED_BITS
from .quantize.column_bits import COLUMN_BITS

METHODS = ("rtn", "gptq", "qoq")   # qoq: W4A8 weights (per-channel int8, then per-group uint4)
TECHNIQUES = ("uniform", "wide", "outliers", "lut", "per-ic", "vq",  # what a measured plan may choose from (`--menu`)
              "column-bits", "dq")
FISHER_LABELS = ("model", "data")   # whose next tokens the measurement's Fisher is of (calibration/fisher.py)
ROUNDINGS = ("gptq", "gptaq", "signround")  # gptaq: GPTQ toward the unquantized outputs (quantize/gptq.py
                                            # unquantized_target); signround: GPTQ's result refined per block


@dataclass
class QuantizeOptions:
    method: str = "gptq"
    bits: int = 4
    group_size: int = 128
    sym: bool = False
    act_order: bool = True
    static_groups: bool = False
    true_sequential: bool = False
    mse: bool | None = None        # None: the method's default (on for GPTQ, off for RTN)
    damp: float = 0.01
    calib: list[str] = field(default_factory=lambda: ["self"])
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    batch: int = 8
    calib_dtype: str = "bfloat16"
    fisher_samples: int = 16       # windows whose backward pass weights the measurement (calibration/fisher.py)
    fisher_labels: str = "data"    # the NLL the Fisher is of: the text's next tokens, or labels drawn from the model
    proxy: str = "fisher"          # what the plan minimises: "fisher" (predicted nats/token) or "hessian"
    menu: tuple[str, ...] = TECHNIQUES   # the techniques a measured plan may give a linear (LayerPlan.technique)
    rounding: str = "gptq"         # "signround": each block's rounding and clipping learned on its outputs
    rounding_iters: int = 50       # signround's iterations per block
    tune_epochs: int = 0           # end-to-end tuning of the levels after the blocks (quantize/tune.py); 0: none
    tune_lr: float = 1e-3          # its Adam learning rate
    tune_batch: int = 2            # calibration windows per tuning step (one Adam step each; 2 against 8 at the
                                   # same cost: unseen C4 0.156 against 0.173 nats, bench/results/calib-split-*)
    tune_seqlen: int = 0           # tokens per tuning sequence: consecutive calibration windows joined; 0: one each
    tune_resample: float = 0.0     # share of the tokens of every pass after the first drawn from the unquantized model
    tune_self: int = 0             # windows sampled from the unquantized model that tuning reads beside the calibration's
    rotate: bool = False           # quantize the model rotated (bitsmith/rotation.py), the same function
    device: str = "cpu"            # where blocks, activations, Hessians and GPTQ run ("cpu", "cuda", "cuda:1")
    offload_activations: bool = False   # calibration activations kept on CPU between blocks (device: one batch)

    def validate(self) -> None:
        if self.method not in METHODS:
            raise InputError(f"--method {self.method}: choose one of {', '.join(METHODS)}")
        if self.mse is None:
            self.mse = self.method == "gptq"
        if self.bits not in SUPPORTED_BITS:
            raise InputError(f"--bits {self.bits}: choose one of {', '.join(map(str, SUPPORTED_BITS))}")
        if self.group_size != -1 and self.group_size < 1:
            raise InputError(f"--group-size {self.group_size}: use -1 (per output channel) or a positive size")
        if self.method == "qoq" and self.bits != 4:
            raise InputError(f"--method qoq stores 4-bit weights for int8 activations; --bits {self.bits} is not 4")
        if not 0 < self.damp < 10:
            raise InputError(f"--damp {self.damp}: expected a small positive fraction such as 0.01")
        if self.calib_dtype not in ("bfloat16", "float32"):
            raise InputError(f"--calib-dtype {self.calib_dtype}: choose bfloat16 or float32")
        if self.nsamples < 1 or self.seqlen < 2:
            raise InputError("--nsamples must be >= 1 and --seqlen >= 2")
        if self.fisher_samples < 1:
            raise InputError(f"--fisher-samples {self.fisher_samples}: expected at least 1")
        if self.fisher_labels not in FISHER_LABELS:
            raise InputError(f"--fisher-labels {self.fisher_labels}: choose {' or '.join(FISHER_LABELS)}")
        if self.proxy not in ("fisher", "hessian"):
            raise InputError(f"--proxy {self.proxy}: choose fisher or hessian")
        given = [t.strip() for t in self.menu.split(",") if t.strip()] if isinstance(self.menu, str) else list(self.menu)
        if not given or any(t not in TECHNIQUES for t in given):
            raise InputError(f"--menu {','.join(given)}: a comma-separated choice among {', '.join(TECHNIQUES)}")
        self.menu = tuple(t for t in TECHNIQUES if t in given)       # one spelling per menu: a resume compares it
        if self.rounding not in ROUNDINGS:
            raise InputError(f"--rounding {self.rounding}: choose one of {', '.join(ROUNDINGS)}")
        if self.rounding != "gptq" and self.method != "gptq":
            raise InputError(f"--rounding {self.rounding} works on GPTQ's weights; --method {self.method} is not gptq")
        if self.device != "cpu" and not re.fullmatch(r"cuda(:\d+)?", self.device):
            raise InputError(f"--device {self.device}: choose cpu, cuda or cuda:N")
        if type(self.rounding_iters) is not int or self.rounding_iters < 0:
            raise InputError(f"--rounding-iters {self.rounding_iters}: expected 0 or more iterations per block")
        if type(self.tune_epochs) is not int or self.tune_epochs < 0:
            raise InputError(f"--tune-epochs {self.tune_epochs}: expected 0 or more passes over the calibration windows")
        if not 0 < self.tune_lr < 1:
            raise InputError(f"--tune-lr {self.tune_lr}: expected a small positive learning rate such as 0.001")
        if type(self.tune_batch) is not int or self.tune_batch < 1:
            raise InputError(f"--tune-batch {self.tune_batch}: expected 1 or more windows per tuning step")
        if type(self.tune_seqlen) is not int or self.tune_seqlen < 0 or self.tune_seqlen % self.seqlen:
            raise InputError(f"--tune-seqlen {self.tune_seqlen}: expected a multiple of --seqlen {self.seqlen} "
                             "(tuning joins whole calibration windows), or 0 for one window a sequence")
        if self.tune_seqlen and self.nsamples % (self.tune_seqlen // self.seqlen):
            raise InputError(f"--tune-seqlen {self.tune_seqlen} joins {self.tune_seqlen // self.seqlen} calibration "
                             f"windows a sequence; --nsamples {self.nsamples} is not a multiple of it")
        if type(self.tune_self) is not int or self.tune_self < 0:
            raise InputError(f"--tune-self {self.tune_self}: expected 0 or more windows sampled for tuning")
        if self.tune_self and not self.tune_epochs:
            raise InputError(f"--tune-self {self.tune_self} samples windows for --tune-epochs, which is 0")
        if self.tune_seqlen and self.tune_self % (self.tune_seqlen // self.seqlen):
            raise InputError(f"--tune-seqlen {self.tune_seqlen} joins {self.tune_seqlen // self.seqlen} windows a "
                             f"sequence; --tune-self {self.tune_self} is not a multiple of it")
        if type(self.tune_resample) not in (int, float) or not 0 <= self.tune_resample < 1:
            raise InputError(f"--tune-resample {self.tune_resample}: expected a share of the tokens from 0 to below 1")
        if self.tune_epochs and self.method != "gptq":
            raise InputError(f"--tune-epochs tunes GPTQ's grids and tables on the calibration windows; --method "
                             f"{self.method} is not gptq")

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class LayerPlan:
    """How one linear is quantized: its grid, the fraction of its weights kept in fp16 as sparse outliers
    (quantize/outliers.py; 0: none, the plain GPTQ layout), whether its grid is a lookup table of 2^bits
    centroids per output row instead (quantize/lut.py; group size -1, no symmetry) and, when a measurement chose
    it, the loss increase that measurement predicts (nats per token). With `per_ic` the groups run along the
    output instead: one grid per input channel and `group_size` output rows (quantize/per_ic.py, AdaDim). With
    `vq` pairs of inputs are coded into a codebook of 2^(2 bits) entries per block of `group_size` inputs
    (quantize/vq.py, GPTVQ). With `column_bits` each group of `group_size` columns gets bits - 1, bits or bits + 1
    bits, as many groups above as below (quantize/column_bits.py, BAQ). With `dq` the groups' scales are
    double-quantized, an 8-bit code each under an fp16 unit per row (quantize/grid.py; QLoRA, llama.cpp's K-quants)."""
    bits: int | float          # a half-integer only with `vq` (VQ_BITS)
    group_size: int
    sym: bool
    predicted_error: float | None = None
    outliers: float = 0.0
    lut: bool = False
    per_ic: bool = False
    vq: bool = False
    column_bits: bool = False
    dq: bool = False

    @property
    def technique(self) -> str:
        """Which entry of the menu (TECHNIQUES) this configuration is: a plain uniform grid of GPTQ's widths, one
        of 5 or 6 bits ("wide", which GPTQ loaders do not read), a grid with outliers, a lookup table, grids per
        input channel, codebooks of pairs, bits per group of columns or a grid with double-quantized scales."""
        if self.vq:
            return "vq"
        if self.dq:
            return "dq"
        if self.column_bits:
            return "column-bits"
        if self.per_ic or self.lut or self.outliers:
            return "per-ic" if self.per_ic else "lut" if self.lut else "outliers"
        return "uniform" if self.bits in GPTQ_BITS else "wide"

    def key(self) -> str:
        """A short name of the configuration: w3g64, w4g-1s, w3g128o0.01 (1 % outliers), w3lut, w3ic64
        (per input channel, groups of 64 rows), w3vq128 (codebooks of pairs per 128 inputs), w3cb128 (groups of
        128 columns on 2, 3 or 4 bits, 3 on average), w4g64dq (double-quantized scales), ..."""
        if self.vq:
            return f"w{self.bits}vq{self.group_size}"
        if self.column_bits:
            return f"w{self.bits}cb{self.group_size}"
        if self.lut:
            return f"w{self.bits}lut"
        if self.per_ic:
            return f"w{self.bits}ic{self.group_size}{'s' if self.sym else ''}"
        return f"w{self.bits}g{self.group_size}{'s' if self.sym else ''}" + (
            f"o{self.outliers:g}" if self.outliers else "") + ("dq" if self.dq else "")


@dataclass
class QuantPlan:
    """One entry per decoder linear (full tensor name without `.weight`), decided before the block loop and
    written into the checkpoint; `options` holds what every linear shares (method, act-order, damping)."""
    options: QuantizeOptions
    layers: dict[str, LayerPlan]
    target_bpw: float | None = None

    @classmethod
    def uniform(cls, opts: QuantizeOptions, linears: dict[str, tuple[int, int]]) -> QuantPlan:
        """The trivial plan of `--bits/--group-size/--sym`: every linear alike."""
        return cls(opts, {name: LayerPlan(opts.bits, opts.group_size, opts.sym) for name in linears})

    @property
    def error_unit(self) -> str:
        """What `predicted_error` counts: nats per token under the Fisher proxy; the Hessian proxy's sum of GPTQ
        losses has no unit comparable to a loss."""
        return error_unit(self.options.proxy)

    def predicted_error(self) -> float | None:
        """Sum of the entries' predicted errors (nats per token), when a measurement chose them."""
        errors = [layer.predicted_error for layer in self.layers.values()]
        return None if None in errors else sum(errors)

    def as_dict(self) -> dict:
        """The plan as JSON; `outliers`, `lut`, `per_ic`, `vq` and `column_bits` are written only where they are set
        (a plan without them reads as it always has)."""
        layers = {name: {k: v for k, v in asdict(layer).items()
                         if v is not None and (k not in ("outliers", *FLAGS) or v)}
                  for name, layer in self.layers.items()}
        return {"format_version": PLAN_VERSION, "options": self.options.as_dict(), "target_bpw": self.target_bpw,
                "layers": layers}

    @classmethod
    def from_dict(cls, body, linears: dict[str, tuple[int, int]], opts: QuantizeOptions, where: str) -> QuantPlan:
        """A plan read from a file, checked against the model's linears (name -> (out, in)): every linear
        covered, no unknown names, every entry a valid grid for its shape. The plan's own entries win over
        `opts` for bits, group size and symmetry; the method options stay those of `opts`."""
        if not isinstance(body, dict) or not isinstance(body.get("layers"), dict):
            raise InputError(f"{where}: not a plan (a JSON object with a \"layers\" object)")
        entries = body["layers"]
        unknown = sorted(set(entries) - set(linears))
        if unknown:
            raise InputError(f"{where}: {unknown[0]} is not a linear of this model"
                             + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""))
        missing = [name for name in linears if name not in entries]
        if missing:
            raise InputError(f"{where}: no entry for {missing[0]}" +
                             (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        layers = {name: _layer_from(entries[name], f"{where}: {name}") for name in linears}
        for name, layer in layers.items():
            try:
                check_layer(layer, name, linears[name][1], opts.method)
            except InputError as e:
                raise InputError(f"{where}: {e}") from None
        target = body.get("target_bpw")
        return cls(opts, layers, target if isinstance(target, (int, float)) else None)


PLAN_VERSION = 1


def _layer_from(entry, where: str) -> LayerPlan:
    if not isinstance(entry, dict):
        raise InputError(f"{where}: expected an object with bits, group_size, sym")
    bits, group, sym = entry.get("bits"), entry.get("group_size"), entry.get("sym", False)
    if not stored_bits_valid(bits, entry.get("vq", False)):
        raise InputError(f"{where}: bits {bits!r}: choose one of {', '.join(map(str, SUPPORTED_BITS))}"
                         f" (with vq: {', '.join(map(str, VQ_BITS))})")
    bits = whole_or_half(bits)
    if type(group) is not int or (group != -1 and group < 1):
        raise InputError(f"{where}: group_size {group!r}: use -1 (per output channel) or a positive size")
    if not isinstance(sym, bool):
        raise InputError(f"{where}: sym {sym!r}: expected true or false")
    outliers = entry.get("outliers", 0.0)
    if type(outliers) not in (int, float) or not 0 <= outliers <= MAX_OUTLIERS:
        raise InputError(f"{where}: outliers {outliers!r}: a fraction of the weights from 0 to {MAX_OUTLIERS}")
    error = entry.get("predicted_error")
    flags = {key: entry.get(key, False) for key in FLAGS}
    for key, flag in flags.items():
        if not isinstance(flag, bool):
            raise InputError(f"{where}: {key} {flag!r}: expected true or false")
    return LayerPlan(bits, group, sym, float(error) if isinstance(error, (int, float)) else None, float(outliers),
                     **flags)


FLAGS = ("lut", "per_ic", "vq", "column_bits", "dq")      # the techniques a plan entry names by true or false


MAX_OUTLIERS = 0.25       # SpQR and SqueezeLLM keep about 1 %; beyond a quarter the weight is hardly quantized


def check_outliers(fraction: float, name: str, method: str) -> None:
    """Outliers are chosen inside GPTQ's column loop: other methods keep none."""
    if fraction and method != "gptq":
        raise InputError(f"{name}: outliers {fraction:g} need --method gptq (this run has {method})")


LUT_BITS = (2, 3, 4)      # a table of 2^8 fp16 centroids per row costs more than the 8-bit grid it would replace


VQ_BITS = (2, 2.5, 3, 3.5, 4)     # 16, 32, 64, 128 or 256 entries per codebook of pairs (quantize/vq.py)


def stored_bits_valid(bits, vq) -> bool:
    """Whether `bits` as read from JSON names a width: a whole number of SUPPORTED_BITS, or with codebooks of
    pairs one of VQ_BITS (2.5 and 3.5 written as numbers with a fraction)."""
    if type(bits) is int and bits in SUPPORTED_BITS:
        return True
    return vq is True and type(bits) in (int, float) and bits in VQ_BITS


def whole_or_half(bits: float) -> int | float:
    """A width as a plan holds it: an int where it is whole, else the half-integer float (keys print w3vq128 and
    w3.5vq128, never w3.0vq128)."""
    return int(bits) if float(bits).is_integer() else float(bits)


def technique_problem(layer: LayerPlan) -> str | None:
    """Why the techniques of one entry do not go together, or None: the one rule that plan files, checkpoint
    configs and measurements all check. A lookup table is one per output row; per-input-channel grids and
    codebooks of pairs keep nothing else on them; codebooks code pairs of inputs."""
    if not layer.vq and not float(layer.bits).is_integer():
        return f"{layer.bits} bits: half bits are codebooks' only"
    if layer.lut and layer.bits not in LUT_BITS:
        return f"lut with {layer.bits} bits: choose one of {', '.join(map(str, LUT_BITS))}"
    if layer.lut and (layer.group_size != -1 or layer.sym or layer.outliers):
        return "lut is one table per output row: group_size -1, sym false, no outliers"
    if layer.per_ic and (layer.lut or layer.outliers):
        return "per_ic groups keep no outliers and no lookup table"
    if layer.per_ic and layer.bits not in GPTQ_BITS:
        return f"per_ic with {layer.bits} bits: choose one of {', '.join(map(str, GPTQ_BITS))}"
    if layer.vq and layer.bits not in VQ_BITS:
        return f"vq with {layer.bits} bits: choose one of {', '.join(map(str, VQ_BITS))}"
    if layer.vq and (layer.lut or layer.per_ic or layer.outliers or layer.sym):
        return "vq keeps no outliers, lookup table, per-input-channel grids or symmetry"
    if layer.vq and layer.group_size != -1 and layer.group_size % 2:
        return f"vq codes pairs of inputs: group size {layer.group_size} must be even (or -1)"
    if layer.column_bits and layer.bits not in COLUMN_BITS:
        return f"column_bits around {layer.bits} bits: choose one of {', '.join(map(str, COLUMN_BITS))}"
    if layer.column_bits and (layer.lut or layer.per_ic or layer.vq or layer.outliers or layer.sym):
        return "column_bits keeps no outliers, lookup table, per-input-channel grids, codebooks or symmetry"
    if layer.column_bits and (layer.group_size < 32 or layer.group_size % 32):
        return (f"column_bits packs each group of columns in whole words: group size {layer.group_size} must be a "
                "multiple of 32")
    if layer.dq and (layer.lut or layer.per_ic or layer.vq or layer.column_bits or layer.outliers):
        return "dq scales are those of plain groups along the input: no outliers, lookup table, per-input-channel " \
               "grids, codebooks or column_bits"
    if layer.dq and layer.group_size == -1:
        return "dq quantizes the scales of a row's groups: group_size -1 has one scale a row"
    return None


def check_layer(layer: LayerPlan, name: str, in_features: int, method: str) -> None:
    """Every check of a plan entry for a linear with `in_features` inputs under `method`."""
    if not (layer.per_ic or layer.vq):      # per-IC groups run along the output, codebooks may end short: any size
        check_group(layer.group_size, name, in_features, method)
    check_outliers(layer.outliers, name, method)
    for key in FLAGS:                       # chosen (or fitted) inside GPTQ's column loop
        if getattr(layer, key) and method != "gptq":
            raise InputError(f"{name}: {key} needs --method gptq (this run has {method})")
    problem = technique_problem(layer)
    if problem:
        raise InputError(f"{name}: {problem}")
    if layer.vq and in_features % 2:
        raise InputError(f"{name}: vq codes pairs of inputs: {in_features} inputs must be even")


def check_group(g: int, name: str, in_features: int, method: str) -> None:
    """Groups may end in one partial group (GPTQ convention: ceil(in / g) groups) only when every group
    starts on a packing boundary (a multiple of 32 codes); any other size must divide."""
    if g == -1 or in_features % g == 0 or (g % 32 == 0 and method != "qoq"):
        return
    raise InputError(f"group size {g} does not divide in_features {in_features} of {name} "
                     "(use a divisor or a multiple of 32)")


def error_unit(proxy: str | None) -> str:
    """The unit of a plan's predicted error under `proxy` (a plan without one was made with the Fisher proxy)."""
    return "GPTQ loss (hessian proxy; not nats)" if proxy == "hessian" else "nats/token"

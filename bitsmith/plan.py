"""What to quantize and how: the options of `bitsmith quantize`, validated once, before any heavy work."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .formats.errors import InputError
from .formats.packing import SUPPORTED_BITS

METHODS = ("rtn", "gptq", "qoq")   # qoq: W4A8 weights (per-channel int8, then per-group uint4)


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

    def check_group(self, name: str, in_features: int) -> None:
        """Groups may end in one partial group (GPTQ convention: ceil(in / g) groups) only when every
        group starts on a packing boundary (a multiple of 32 codes); any other size must divide."""
        g = self.group_size
        if g == -1 or in_features % g == 0 or (g % 32 == 0 and self.method != "qoq"):
            return
        raise InputError(f"--group-size {g} does not divide in_features {in_features} of {name} "
                         "(use a divisor or a multiple of 32)")

    def as_dict(self) -> dict:
        return asdict(self)

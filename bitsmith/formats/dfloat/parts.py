"""Coded tensors inside a checkpoint: a coded tensor `name` is one uint8 tensor `name.__df11` holding three
sections back to back: the stream, the sign/mantissa bytes, the code lengths of exponents first..last
(0 = unused); its metadata entry (`to_metadata`: shape, window_bits, stream_bits, exponent range, sha256
of the source) sits in the manifest's `lossless` block. One entry instead of three keeps the safetensors
header small.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import InputError
from .codec import CODEC, CODEC_VERSION, MAX_CODE_LENGTH, MAX_WINDOW_BITS, WINDOW_BITS, Coded, encode
from .cpu_decoder import decode_many

PART = ".__df11"
BATCH_VALUES = 1 << 26   # values checked (`CodedWriter`) or decoded (`decompress_checkpoint`) together


def is_part(name: str) -> bool:
    return name.endswith(PART)


def tensor_names(stored) -> list[str]:
    """Names as a reader shows them: a coded tensor under its own name instead of its `.__df11` part."""
    return [n[: -len(PART)] if is_part(n) else n for n in stored]


def to_parts(name: str, coded: Coded) -> dict[str, torch.Tensor]:
    blob = np.concatenate([coded.stream, coded.sign_mantissa, coded.code_lengths])
    return {name + PART: torch.from_numpy(blob)}


def to_metadata(coded: Coded) -> dict:
    return {"dtype": "bfloat16", "shape": list(coded.shape), "window_bits": coded.window_bits,
            "stream_bits": coded.stream_bits,
            "exponent_range": [coded.first_exponent, coded.first_exponent + coded.code_lengths.size - 1],
            "sha256": coded.sha256}


def from_parts(name: str, meta: dict, read) -> Coded:
    """A Coded from its metadata and `read(stored_name) -> tensor`; a clear InputError when anything is off."""
    check_metadata(name, meta)
    blob = read(name + PART)
    size = part_size(meta)
    if blob.dtype != torch.uint8 or blob.dim() != 1 or blob.numel() != size:
        raise InputError(f"{name + PART}: expected {size} uint8 values for the metadata, "
                         f"got {blob.dtype} {list(blob.shape)} (corrupted coded tensor)")
    shape = tuple(meta["shape"])
    stream, sign_mantissa, code_lengths = np.split(blob.numpy(), np.cumsum([_stream_bytes(meta), math.prod(shape)]))
    return Coded(shape, meta["window_bits"], meta["stream_bits"], meta["exponent_range"][0], code_lengths, stream,
                 sign_mantissa, meta["sha256"])


def check_metadata(name: str, meta) -> None:
    """InputError naming the tensor and the field unless every field of a metadata entry has its type and
    range (the sizes they imply are for the caller to check against the stored part: `part_size`)."""
    if not isinstance(meta, dict):
        raise InputError(f"{name}: lossless metadata is {type(meta).__name__}, not an object")
    for field, (valid, expected) in _FIELDS.items():
        if field not in meta:
            raise InputError(f"{name}: incomplete lossless metadata (no {field})")
        if not valid(meta[field]):
            raise InputError(f"{name}: lossless metadata {field} = {shown(meta[field])} is invalid ({expected})")


def _integer(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)        # JSON true is no number


def _natural(v) -> bool:
    return _integer(v) and v >= 0


def shown(v) -> str:
    """A value from a file for an error message: its repr, cut to 40 characters."""
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


_FIELDS = {   # field -> (valid value, what is expected)
    "dtype": (lambda v: v == "bfloat16", "bfloat16"),
    "shape": (lambda v: isinstance(v, list) and all(map(_natural, v)) and math.prod(d for d in v if d) < 2**63,
              "a list of non-negative integers, an int64 numel"),
    "window_bits": (lambda v: _natural(v) and v % 32 == 0 and 32 <= v <= MAX_WINDOW_BITS,
                    f"a multiple of 32 from 32 to {MAX_WINDOW_BITS}"),
    "stream_bits": (_natural, "a non-negative integer"),
    "exponent_range": (lambda v: isinstance(v, list) and len(v) == 2 and all(map(_integer, v))
                       and 0 <= v[0] <= v[1] + 1 <= 256,
                       "[first, last] exponents, 0 <= first <= last + 1 <= 256"),
    "sha256": (lambda v: isinstance(v, str) and len(v) == 64 and set(v) <= set("0123456789abcdef"),
               "64 lowercase hex digits"),
}


def part_size(meta: dict) -> int:
    """Bytes of the stored part that a checked metadata entry describes: stream, sign/mantissa, code table."""
    first, last = meta["exponent_range"]
    return _stream_bytes(meta) + math.prod(meta["shape"]) + last - first + 1


def _stream_bytes(meta: dict) -> int:
    return 4 * -(-meta["stream_bits"] // 32)


def pays(x: torch.Tensor, coded: Coded, name: str) -> bool:
    """Whether the coded tensor (its longer name included) is smaller than the tensor as is."""
    return coded.nbytes + len(PART) < x.numel() * x.element_size()


class CodedWriter:
    """`add` for a CheckpointWriter that codes BF16 tensors where that saves bytes (`pays`) and stores the
    rest as they are; `coded` maps each coded name to its metadata entry for `lossless_block`.

    Every coded tensor is decoded once and compared with the source before it is written (DFloat11's
    correctness check), a batch of up to BATCH_VALUES values in one `decode_many`; `flush` writes what
    is pending, in the order it was added.
    """

    def __init__(self, writer, window_bits: int = WINDOW_BITS):
        self.writer, self.window_bits = writer, window_bits
        self.coded: dict[str, dict] = {}
        self._pending: list[tuple[str, torch.Tensor, Coded | None]] = []
        self._values = 0

    def add(self, name: str, x: torch.Tensor) -> None:
        coded = encode(x, self.window_bits) if x.dtype == torch.bfloat16 else None
        if coded is not None and not pays(x, coded, name):
            coded = None
        self._pending.append((name, x, coded))
        self._values += x.numel() if coded is not None else 0
        if self._values >= BATCH_VALUES:
            self.flush()

    def flush(self) -> None:
        checked = [(name, x, c) for name, x, c in self._pending if c is not None]
        decoded = decode_many([c for _, _, c in checked], [name for name, _, _ in checked], check=False)
        for (name, x, _), y in zip(checked, decoded):
            if not torch.equal(y.view(torch.int16), x.reshape(y.shape).view(torch.int16)):
                raise RuntimeError(f"{name}: lossless round trip failed")
        for name, x, coded in self._pending:
            if coded is None:
                self.writer.add(name, x)
                continue
            for part, t in to_parts(name, coded).items():
                self.writer.add(part, t)
            self.coded[name] = to_metadata(coded)
        self._pending, self._values = [], 0


def write_coded(writer, name: str, x: torch.Tensor, window_bits: int = WINDOW_BITS) -> dict | None:
    """Store one tensor as `CodedWriter` does; its metadata entry, or None when stored as is."""
    coder = CodedWriter(writer, window_bits)
    coder.add(name, x)
    coder.flush()
    return coder.coded.get(name)


def lossless_block(tensors: dict[str, dict]) -> dict:
    """The manifest's `lossless` entry: the codec and the metadata of every coded tensor."""
    return {"codec": CODEC, "version": CODEC_VERSION, "max_code_length": MAX_CODE_LENGTH, "tensors": tensors}


def config_block(block: dict) -> dict:
    """The `quantization_config["lossless"]` entry: the codec and the coded names (metadata: manifest)."""
    return {**block, "tensors": list(block["tensors"])}


def coded_tensors(manifest: dict | None, config: dict | None) -> dict[str, dict]:
    """name -> metadata of every coded tensor a folder declares (in its manifest), each entry checked
    (`check_metadata`)."""
    block = (manifest or {}).get("lossless")
    if not block:
        qc = (config or {}).get("quantization_config")
        if isinstance(qc, dict) and qc.get("lossless"):
            raise InputError("config.json declares coded tensors but the bitsmith manifest does not describe them")
        return {}
    if not isinstance(block, dict):
        raise InputError(f"manifest lossless block is {type(block).__name__}, not an object")
    if block.get("codec") != CODEC or block.get("version") != CODEC_VERSION:
        raise InputError(f"unsupported lossless codec {block.get('codec')!r} version {block.get('version')!r}")
    tensors = block.get("tensors") or {}
    if not isinstance(tensors, dict):
        raise InputError(f"manifest lossless tensors is {type(tensors).__name__}, not an object of names")
    for name, meta in tensors.items():
        check_metadata(name, meta)
    return dict(tensors)


def describe(name: str, meta: dict) -> dict:
    """An inspect row: original and coded bytes, bits per value (coded = stream + sign/mantissa + table)."""
    n = math.prod(meta["shape"])
    coded = part_size(meta)
    return {"name": name, "shape": list(meta["shape"]), "codec": CODEC, "original_bytes": 2 * n,
            "coded_bytes": coded, "ratio": coded / (2 * n) if n else 0.0,
            "bits_per_value": 8 * coded / n if n else 0.0,
            "exponent_bits_per_value": meta["stream_bits"] / n if n else 0.0}

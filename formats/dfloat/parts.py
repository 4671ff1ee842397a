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
from .codec import CODEC, CODEC_VERSION, MAX_CODE_LENGTH, WINDOW_BITS, Coded, encode
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
    try:
        shape = tuple(int(d) for d in meta["shape"])
        window_bits, stream_bits = int(meta["window_bits"]), int(meta["stream_bits"])
        first, last = (int(e) for e in meta["exponent_range"])
        sha256 = str(meta["sha256"])
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"{name}: incomplete lossless metadata ({e!r})") from None
    blob = read(name + PART)
    sections = np.cumsum([4 * -(-stream_bits // 32), math.prod(shape), last - first + 1])
    if blob.dtype != torch.uint8 or blob.dim() != 1 or blob.numel() != sections[-1] or min(sections) < 0:
        raise InputError(f"{name + PART}: expected {sections[-1]} uint8 values for the metadata, "
                         f"got {blob.dtype} {list(blob.shape)} (corrupted coded tensor)")
    stream, sign_mantissa, code_lengths = np.split(blob.numpy(), sections[:-1])
    return Coded(shape, window_bits, stream_bits, first, code_lengths, stream, sign_mantissa, sha256)


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
    """name -> metadata of every coded tensor a folder declares (in its manifest)."""
    block = (manifest or {}).get("lossless")
    if not block:
        if ((config or {}).get("quantization_config") or {}).get("lossless"):
            raise InputError("config.json declares coded tensors but the bitsmith manifest does not describe them")
        return {}
    if block.get("codec") != CODEC or block.get("version") != CODEC_VERSION:
        raise InputError(f"unsupported lossless codec {block.get('codec')!r} version {block.get('version')!r}")
    return dict(block.get("tensors") or {})


def describe(name: str, meta: dict) -> dict:
    """An inspect row: original and coded bytes, bits per value (coded = stream + sign/mantissa + table)."""
    n = math.prod(meta["shape"])
    stream = 4 * -(-int(meta["stream_bits"]) // 32)
    first, last = meta["exponent_range"]
    coded = stream + n + (last - first + 1)
    return {"name": name, "shape": list(meta["shape"]), "codec": CODEC, "original_bytes": 2 * n,
            "coded_bytes": coded, "ratio": coded / (2 * n) if n else 0.0,
            "bits_per_value": 8 * coded / n if n else 0.0,
            "exponent_bits_per_value": int(meta["stream_bits"]) / n if n else 0.0}

"""The lossless BF16 format: the exponent byte Huffman-coded, sign and mantissa raw (DFloat11, arXiv
2504.11651 section 3).

A BF16 word is sign (1) | exponent (8) | mantissa (7). Trained weights use a few dozen exponents with
about 2.6 bits of entropy while sign and mantissa are close to uniform, so the exponent is coded with a
canonical Huffman code (lengths <= 16, one table per tensor) and sign and mantissa are stored as one raw
byte (sign in bit 7): about 8 + H(exponent) bits per value.

Layout for thousands of parallel decoders. The code stream is cut into windows of `window_bits` bits
(a multiple of 32) and no codeword straddles two windows: where the next codeword would, the window is
filled up with 1 bits and the codeword opens the next window. So window k starts at bit k * window_bits
on a codeword boundary with no side information at all (DFloat11 stores a 5-bit offset for every 64
bits). A decoder of a window stops at the first codeword that would end past it: the fill is a proper
prefix of the longest all-ones codeword, so it never completes one. Each window's decoder counts its
values, a prefix sum over the counts gives every window its first output position, and a second pass
writes (count, then write). The cost is the fill, under 16 bits per window.

Stream: 32-bit words stored little-endian, each filled from its most significant bit (`windows.pack`).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch

from .. import huffman
from ..errors import InputError
from . import windows
from .tasks import Tasks, default_threads

CODEC = "df11-huffman"
CODEC_VERSION = 1
MAX_CODE_LENGTH = 16
WINDOW_BITS = 2048
MAX_WINDOW_BITS = 1 << 14   # the decoder's scratch grows with window_bits times the windows decoded at once
MERGE_VALUES = 1 << 20   # values merged per vectorized step
PARALLEL_VALUES = 1 << 20   # values from which `encode` takes a helper thread
_SIGN_MANTISSA = np.int16(-0x7F81)           # 0x807F


@dataclass(frozen=True)
class Coded:
    """One BF16 tensor in coded form."""
    shape: tuple[int, ...]
    window_bits: int
    stream_bits: int
    first_exponent: int
    code_lengths: np.ndarray      # uint8: length of the code of exponent first_exponent + i
    stream: np.ndarray            # uint8, 4 * ceil(stream_bits / 32) bytes
    sign_mantissa: np.ndarray     # uint8 [numel]
    sha256: str                   # of the source tensor's bytes

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def lengths(self) -> np.ndarray:
        """Code length of every exponent 0..255."""
        full = np.zeros(256, dtype=np.uint8)
        full[self.first_exponent: self.first_exponent + self.code_lengths.size] = self.code_lengths
        return full

    @property
    def nbytes(self) -> int:
        return self.stream.size + self.sign_mantissa.size + self.code_lengths.size


def tensor_sha256(x: torch.Tensor) -> str:
    """sha256 of a tensor's bytes in C order (what `verify` compares after decoding)."""
    flat = x.detach().cpu().contiguous().reshape(-1)
    return bytes_sha256(flat.view(torch.uint8).numpy() if flat.numel() else np.zeros(0, dtype=np.uint8))


def split(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(exponent, sign_mantissa) bytes of a BF16 tensor in C order; the sign is bit 7 of the second."""
    w = x.detach().cpu().contiguous().reshape(-1).view(torch.int16)
    exponent = (w >> 7).to(torch.uint8)                        # the shift keeps the sign: the cast drops it
    sign_mantissa = ((w >> 8) & 0x80 | w & 0x7F).to(torch.uint8)
    return exponent.numpy(), sign_mantissa.numpy()


def merge(exponent: np.ndarray, sign_mantissa: np.ndarray, out: np.ndarray | None = None,
          work: np.ndarray | None = None) -> np.ndarray:
    """BF16 bit patterns (int16) from the two bytes: the inverse of `split` (into `out` when given).

    The sign/mantissa byte read as int8 and widened copies the sign into bits 7..15; masking with
    0x807F keeps the sign in bit 15 and the mantissa, and the exponent goes into bits 7..14. Works
    MERGE_VALUES at a time in `work` (int16, MERGE_VALUES; allocated if not given).
    """
    out = np.empty(exponent.size, dtype=np.int16) if out is None else out
    work = np.empty(min(exponent.size, MERGE_VALUES), dtype=np.int16) if work is None else work
    sign_mantissa = sign_mantissa.view(np.int8)
    for a in range(0, exponent.size, MERGE_VALUES):
        bits, shifted = out[a: a + MERGE_VALUES], work[: min(MERGE_VALUES, exponent.size - a)]
        np.bitwise_and(sign_mantissa[a: a + MERGE_VALUES], _SIGN_MANTISSA, out=bits, dtype=np.int16)
        np.left_shift(exponent[a: a + MERGE_VALUES], 7, out=shifted, dtype=np.int16)
        bits |= shifted
    return out


def encode(x: torch.Tensor, window_bits: int = WINDOW_BITS, threads: int | None = None) -> Coded:
    """Code a BF16 tensor (any shape, including empty) with its own Huffman table, on up to two threads
    (`threads`, default `default_threads()`; one below PARALLEL_VALUES values): a helper thread hashes the
    source and adds the packed codewords into the stream while this one finds the windows."""
    if x.dtype != torch.bfloat16:
        raise ValueError(f"only bfloat16 tensors are coded, got {x.dtype}")
    check_window(window_bits)
    helpers = min((threads or default_threads()) - 1, 1) if x.numel() >= PARALLEL_VALUES else 0
    with Tasks(helpers) as tasks:
        digest = tasks.submit(tensor_sha256, x)
        exponent, sign_mantissa = split(x)
        counts = torch.from_numpy(exponent).bincount(minlength=256).numpy()
        lengths = huffman.code_lengths(counts, MAX_CODE_LENGTH)
        used = np.flatnonzero(lengths)
        first, last = (int(used[0]), int(used[-1])) if used.size else (0, -1)
        stream, stream_bits = windows.pack(exponent, huffman.canonical_codes(lengths), lengths,
                                           int(counts @ lengths.astype(np.int64)), window_bits, MAX_CODE_LENGTH,
                                           tasks)
        tasks.wait([digest])
    return Coded(tuple(x.shape), window_bits, stream_bits, first, lengths[first: last + 1].copy(),
                 stream, sign_mantissa, digest.result())


def check_window(window_bits: int) -> None:
    if not 32 <= window_bits <= MAX_WINDOW_BITS or window_bits % 32:
        raise ValueError(f"window_bits must be a multiple of 32 from 32 to {MAX_WINDOW_BITS}, got {window_bits}")


def check_structure(coded: Coded, name: str) -> None:
    """Sizes and table consistent with the metadata, or a clear InputError."""
    try:
        check_window(coded.window_bits)
        huffman.check_lengths(coded.code_lengths, MAX_CODE_LENGTH)
    except ValueError as e:
        raise InputError(f"{name}: corrupted code table or metadata ({e})") from None
    problems = []
    if not 0 <= coded.first_exponent <= 256 - coded.code_lengths.size:
        problems.append(f"code table of {coded.code_lengths.size} entries from exponent {coded.first_exponent}")
    if coded.sign_mantissa.size != coded.numel:
        problems.append(f"{coded.sign_mantissa.size} sign/mantissa bytes for {coded.numel} values")
    if coded.stream.size != 4 * -(-coded.stream_bits // 32) or coded.stream_bits < 0:
        problems.append(f"{coded.stream.size} stream bytes for {coded.stream_bits} bits")
    if coded.numel and not coded.code_lengths.any():
        problems.append("empty code table")
    if problems:
        raise InputError(f"{name}: corrupted coded tensor: {'; '.join(problems)}")


def bytes_sha256(bits: np.ndarray) -> str:
    return hashlib.sha256(bits).hexdigest()                     # releases the GIL: a task beside the loops

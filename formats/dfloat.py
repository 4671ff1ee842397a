"""Lossless BF16: the exponent byte Huffman-coded, sign and mantissa raw (DFloat11, arXiv 2504.11651 section 3).

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

Stream: 32-bit words stored little-endian, each filled from its most significant bit. In a checkpoint a
coded tensor `name` is one uint8 tensor `name.__df11` holding three sections back to back: the stream,
the sign/mantissa bytes, the code lengths of exponents first..last (0 = unused); its metadata entry
(`to_metadata`: shape, window_bits, stream_bits, exponent range, sha256 of the source) sits in the
manifest's `lossless` block. One entry instead of three keeps the safetensors header small.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import huffman
from .errors import InputError

CODEC = "df11-huffman"
CODEC_VERSION = 1
MAX_CODE_LENGTH = 16
WINDOW_BITS = 2048
PART = ".__df11"


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
    return hashlib.sha256(flat.view(torch.uint8).numpy() if flat.numel() else b"").hexdigest()


def split(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(exponent, sign_mantissa) bytes of a BF16 tensor in C order; the sign is bit 7 of the second."""
    w = x.detach().cpu().contiguous().reshape(-1).view(torch.int16).numpy().view(np.uint16)
    exponent = ((w >> 7) & 0xFF).astype(np.uint8)
    sign_mantissa = (((w >> 8) & 0x80) | (w & 0x7F)).astype(np.uint8)
    return exponent, sign_mantissa


def merge(exponent: np.ndarray, sign_mantissa: np.ndarray) -> np.ndarray:
    """BF16 bit patterns (int16) from the two bytes: the inverse of `split`.

    The sign/mantissa byte read as int8 and widened copies the sign into bits 7..15; masking with
    0x807F keeps the sign in bit 15 and the mantissa, and the exponent goes into bits 7..14.
    """
    bits = sign_mantissa.view(np.int8).astype(np.int16)
    bits &= np.int16(-0x7F81)                      # 0x807F
    shifted = exponent.astype(np.int16)
    shifted <<= 7
    bits |= shifted
    return bits


def encode(x: torch.Tensor, window_bits: int = WINDOW_BITS) -> Coded:
    """Code a BF16 tensor (any shape, including empty) with its own Huffman table."""
    if x.dtype != torch.bfloat16:
        raise ValueError(f"only bfloat16 tensors are coded, got {x.dtype}")
    _check_window(window_bits)
    exponent, sign_mantissa = split(x)
    lengths = huffman.code_lengths(np.bincount(exponent, minlength=256), MAX_CODE_LENGTH)
    used = np.flatnonzero(lengths)
    first, last = (int(used[0]), int(used[-1])) if used.size else (0, -1)
    codes = huffman.canonical_codes(lengths)
    stream, stream_bits = _windows(codes[exponent], lengths[exponent], window_bits)
    return Coded(tuple(x.shape), window_bits, stream_bits, first, lengths[first: last + 1].copy(),
                 stream, sign_mantissa, tensor_sha256(x))


def decode(coded: Coded, name: str = "tensor", check: bool = True) -> torch.Tensor:
    """The BF16 tensor back, on CPU; `check` compares it with the recorded sha256."""
    return decode_many([coded], [name], check)[0]


def decode_many(coded: list[Coded], names: list[str] | None = None, check: bool = True) -> list[torch.Tensor]:
    """Several tensors at once, on CPU: the windows of all of them decode in one lockstep loop."""
    names = names or [f"tensor {i}" for i in range(len(coded))]
    for c, name in zip(coded, names):
        check_structure(c, name)
    exponents = _decode_exponents(coded, names) if coded else []
    out = []
    for c, name, exponent in zip(coded, names, exponents):
        bits = merge(exponent, c.sign_mantissa)
        x = torch.from_numpy(bits).view(torch.bfloat16).reshape(c.shape)
        if check and tensor_sha256(x) != c.sha256:
            raise InputError(f"{name}: decoded tensor does not match its recorded sha256 (corrupted coded data)")
        out.append(x)
    return out


# ---- encoder ------------------------------------------------------------------------------------------

SEGMENT = 1 << 18        # codewords handled per vectorized step of the encoder (keeps temporaries in cache)


def _windows(code: np.ndarray, length: np.ndarray, window_bits: int) -> tuple[np.ndarray, int]:
    """Pack codewords MSB first into windows of `window_bits` that no codeword straddles; 1-fill the rest."""
    total = int(length.sum(dtype=np.int64))
    nwords = -(-(total + 16 * (total // (window_bits - MAX_CODE_LENGTH) + 2)) // 32)   # fill < 16 per window
    words = np.zeros(nwords + 2, dtype=np.uint32)
    cursor, window_end = 0, window_bits          # where the next codeword goes; end of the current window
    for a in range(0, length.size, SEGMENT):
        seg_length = length[a: a + SEGMENT].astype(np.int64)
        end = np.cumsum(seg_length)               # ends in an unbroken stream from the segment's start
        piece_first, piece_at = [0], [cursor]     # pieces of the segment that fall in one window each
        fill_at, fill = [], []                    # 1-fills closing the windows
        while True:
            base = int(end[piece_first[-1] - 1]) if piece_first[-1] else 0
            j = int(np.searchsorted(end, base + window_end - piece_at[-1], side="right"))
            if j == end.size:
                cursor = piece_at[-1] + int(end[-1]) - base
                break
            stop = piece_at[-1] + (int(end[j - 1]) - base if j > piece_first[-1] else 0)
            fill_at.append(stop)                  # codeword j would straddle: fill up, open the next window
            fill.append(window_end - stop)
            if j > piece_first[-1]:
                piece_first.append(j)
                piece_at.append(window_end)
            else:                                 # nothing of this segment fitted: it starts the next window
                piece_at[-1] = window_end
            window_end += window_bits
        first = np.asarray(piece_first, dtype=np.int64)
        at = np.asarray(piece_at, dtype=np.int64)
        base = np.where(first > 0, end[first - 1], 0)
        piece = np.repeat(np.arange(first.size), np.diff(np.append(first, end.size)))
        start = at[piece] + (end - seg_length - base[piece])
        fill = np.asarray(fill, dtype=np.int64)
        _place(words, np.concatenate([start, np.asarray(fill_at, dtype=np.int64)]),
               np.concatenate([seg_length, fill]),
               np.concatenate([code[a: a + SEGMENT].astype(np.uint64),
                               (np.uint64(1) << fill.astype(np.uint64)) - np.uint64(1)]))
    _place(words, np.array([cursor]), np.array([-cursor % 32]),                 # 1-fill the last word
           np.array([(1 << (-cursor % 32)) - 1], dtype=np.uint64))
    return words[: -(-cursor // 32)].astype("<u4").view(np.uint8), cursor


def _place(words: np.ndarray, start: np.ndarray, length: np.ndarray, value: np.ndarray) -> None:
    """OR non-overlapping bit fields (at most 32 bits each, MSB first) into 32-bit words, in place."""
    if start.size == 0:
        return
    word = start >> 5
    lo = int(word.min())
    r = (start & 31) + length                     # bit of the word where the field ends (> 32: spills over)
    head = (value << np.maximum(32 - r, 0).astype(np.uint64)) >> np.maximum(r - 32, 0).astype(np.uint64)
    tail = (value << np.clip(64 - r, 0, 63).astype(np.uint64)) & np.uint64(0xFFFFFFFF)
    tail[r <= 32] = 0
    # the fields are disjoint, so adding is OR and every word sum stays below 2**32: exact in float64
    n = int(word.max()) - lo + 2
    add = np.bincount(word - lo, weights=head.astype(np.float64), minlength=n)
    add[1:] += np.bincount(word - lo, weights=tail.astype(np.float64), minlength=n - 1)
    words[lo: lo + n] += add.astype(np.uint32)


# ---- CPU decoder --------------------------------------------------------------------------------------

LANE_BLOCK = 1024        # windows whose decoded bytes are laid out together (keeps temporaries in cache)


def _decode_exponents(coded: list[Coded], names: list[str]) -> list[np.ndarray]:
    """Exponents of every window of every tensor, decoded in lockstep one byte of every window per step.

    A byte-at-a-time finite-state decoder (Choueka, Klein & Perl 1985) consumes 8 bits per step in
    every window whatever the codewords, so step j of all windows is one table lookup on byte j of each.
    """
    lanes = [-(-c.stream_bits // c.window_bits) if c.numel else 0 for c in coded]
    if not any(lanes):
        return _exponents_per_tensor(np.zeros(0, dtype=np.uint8), np.zeros(0, dtype=np.int64), coded, names, lanes)
    keys = [(c.first_exponent, c.code_lengths.tobytes()) for c in coded]
    tables = {k: c.lengths() for k, c, n in zip(keys, coded, lanes) if n}
    decoder = huffman.ByteDecoder.build(np.stack(list(tables.values())))
    root = dict(zip(tables, decoder.root.tolist()))
    start = np.repeat([root.get(k, 0) for k in keys], lanes)
    window_bytes = _window_bytes(coded, lanes)
    entry = _run(decoder.next, window_bytes, start)
    sizes = np.concatenate([np.minimum(c.window_bits, c.stream_bits - c.window_bits * np.arange(n))
                            for c, n in zip(coded, lanes)])
    exponent, per_lane = _gather(entry, decoder, sizes, sum(c.numel for c in coded))
    return _exponents_per_tensor(exponent, per_lane, coded, names, lanes)


def _window_bytes(coded: list[Coded], lanes: list[int]) -> np.ndarray:
    """[byte j of a window, window] over all windows: the stream in bit order, windows 1-padded."""
    width = max(c.window_bits // 32 for c, n in zip(coded, lanes) if n)
    words = np.full((sum(lanes), width), 0xFFFFFFFF, dtype=np.uint32)
    row = 0
    for c, n in zip(coded, lanes):
        stream = c.stream.view("<u4")
        if c.window_bits // 32 == width:
            words[row: row + n].reshape(-1)[: stream.size] = stream
        elif n:
            padded = np.full(n * c.window_bits // 32, 0xFFFFFFFF, dtype=np.uint32)
            padded[: stream.size] = stream
            words[row: row + n, : c.window_bits // 32] = padded.reshape(n, -1)
        row += n
    return words.byteswap().view(np.uint8).T.copy()      # words are filled from their most significant bit


def _run(next_state: np.ndarray, window_bytes: np.ndarray, start: np.ndarray) -> np.ndarray:
    """The entry (state * 256 + byte) of the decoder at every byte of every window: [step, window]."""
    next_entry = (next_state * 256).astype(np.int32).reshape(-1)
    entry = np.empty(window_bytes.shape, dtype=np.int32)
    state = (start * 256).astype(np.int32)
    for j in range(window_bytes.shape[0]):
        np.add(state, window_bytes[j], out=entry[j])
        np.take(next_entry, entry[j], out=state)
    return entry


def _gather(entry: np.ndarray, decoder: huffman.ByteDecoder, sizes: np.ndarray, total: int):
    """(the emitted symbols of all entries, window after window; how many each window emitted).

    Every entry stores its 8 symbol bytes at its output position; the bytes past its count are
    overwritten by the entries after it, as entries are stored in output order. A window shorter than
    the rest (the last of a tensor) emits nothing past its last bit.
    """
    count, symbols, ends = (a.reshape(-1) for a in (decoder.count, decoder.symbols, decoder.ends))
    steps, lanes = entry.shape
    short = np.flatnonzero(sizes < 8 * steps)
    last = -(-sizes[short] // 8) - 1                       # byte holding the last bit, and its bits in the stream
    last_bits = (sizes[short] - 8 * last).astype(np.uint8)
    per_lane = np.empty(lanes, dtype=np.int64)
    out = np.empty(total + 8, dtype=np.uint8)
    store = np.ndarray((total + 1,), dtype=np.uint64, buffer=out, strides=(1,))   # 8 bytes from any byte
    at = 0
    for a in range(0, lanes, LANE_BLOCK):
        block = entry[:, a: a + LANE_BLOCK].T.copy()
        emitted = np.take(count, block)
        inside = (short >= a) & (short < a + LANE_BLOCK)
        if inside.any():
            w, k = short[inside] - a, last[inside]
            emitted[w] *= np.arange(steps) <= k[:, None]
            emitted[w, k] = np.bitwise_count(ends[block[w, k]] >> (np.uint8(8) - last_bits[inside]))
        per_lane[a: a + LANE_BLOCK] = emitted.sum(axis=1)
        emitted = emitted.reshape(-1)
        position = np.empty(emitted.size, dtype=np.int64)
        position[0] = at
        np.cumsum(emitted[:-1], out=position[1:])
        position[1:] += at
        at = int(position[-1]) + int(emitted[-1])
        if at <= total:                                    # more symbols than values: corrupted, reported below
            store[position] = np.take(symbols, block.reshape(-1))
    return out[:min(at, total)], per_lane


def _exponents_per_tensor(exponent, per_lane, coded, names, lanes) -> list[np.ndarray]:
    """Each tensor's slice of the exponents, after checking that its windows emitted one per value."""
    out, at, lane = [], 0, 0
    for c, name, n in zip(coded, names, lanes):
        got = int(per_lane[lane: lane + n].sum())
        if got != c.numel:
            raise InputError(f"{name}: coded stream holds {got} values, expected {c.numel} "
                             "(corrupted stream or code table)")
        out.append(exponent[at: at + got])
        at, lane = at + got, lane + n
    return out


def _check_window(window_bits: int) -> None:
    if window_bits < 32 or window_bits % 32:
        raise ValueError(f"window_bits must be a positive multiple of 32, got {window_bits}")


def check_structure(coded: Coded, name: str) -> None:
    """Sizes and table consistent with the metadata, or a clear InputError."""
    try:
        _check_window(coded.window_bits)
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


# ---- checkpoint parts and metadata --------------------------------------------------------------------

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


def write_coded(writer, name: str, x: torch.Tensor, window_bits: int = WINDOW_BITS) -> dict | None:
    """Store `x` into a CheckpointWriter coded when it is BF16 and coding saves bytes, else as is.

    Returns the metadata entry for `lossless_block` (None when stored as is). Every coded tensor is
    decoded once and compared with the source before it is written (DFloat11's correctness check).
    """
    if x.dtype != torch.bfloat16:
        writer.add(name, x)
        return None
    coded = encode(x, window_bits)
    if not pays(x, coded, name):
        writer.add(name, x)
        return None
    if not torch.equal(decode(coded, name, check=False).view(torch.int16), x.reshape(coded.shape).view(torch.int16)):
        raise RuntimeError(f"{name}: lossless round trip failed")
    for part, t in to_parts(name, coded).items():
        writer.add(part, t)
    return to_metadata(coded)


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


# ---- checkpoint folders -------------------------------------------------------------------------------

BATCH_VALUES = 1 << 26   # values decoded together by `decompress_checkpoint`
NOT_SIDE_FILES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".index.json")


def compress_checkpoint(src, out, overwrite: bool = False, window_bits: int = WINDOW_BITS,
                        progress: bool = False) -> dict:
    """A folder of safetensors -> the same tensors with every BF16 one coded where that saves bytes."""
    from .checkpoint import Checkpoint, CheckpointWriter
    _check_window(window_bits)
    source = Checkpoint(src)
    if source.coded:
        raise InputError(f"{source.path}: already holds losslessly coded tensors")
    coded, names = {}, source.keys()
    with CheckpointWriter(out, overwrite) as writer:
        for name in tqdm(names, desc="compress", unit="tensor", disable=not progress):
            meta = write_coded(writer, name, source.get(name), window_bits)
            if meta is not None:
                coded[name] = meta
        _copy_side_files(source.path, writer)
        block = lossless_block(coded)
        writer.commit(_config_with(source.config, config_block(block) if coded else None), {"lossless": block})
    return _summary(source.path, Path(out), len(names), coded)


def decompress_checkpoint(src, out, overwrite: bool = False, progress: bool = False) -> dict:
    """A folder with coded tensors -> plain safetensors, every tensor bit for bit as before compression."""
    from .checkpoint import Checkpoint, CheckpointWriter
    source = Checkpoint(src)
    names = source.keys()
    with CheckpointWriter(out, overwrite) as writer:
        batch, values = [], 0
        for name in tqdm(names, desc="decompress", unit="tensor", disable=not progress):
            batch.append(name)
            values += math.prod(source.coded[name]["shape"]) if name in source.coded else 0
            if values >= BATCH_VALUES or name == names[-1]:
                _write_decoded(source, batch, writer)
                batch, values = [], 0
        _copy_side_files(source.path, writer)
        writer.commit(_config_with(source.config, None), {})
    return _summary(source.path, Path(out), len(names), source.coded)


def _write_decoded(source, names: list[str], writer) -> None:
    coded = [n for n in names if n in source.coded]
    decoded = dict(zip(coded, decode_many([from_parts(n, source.coded[n], source.stored) for n in coded], coded)))
    for name in names:
        writer.add(name, decoded[name] if name in decoded else source.stored(name))


def _config_with(config: dict | None, block: dict | None) -> dict | None:
    """config.json with the lossless block set (or removed, block=None), other keys untouched."""
    if config is None:
        return None
    config = dict(config)
    qc = dict(config.get("quantization_config") or {"quant_method": "bitsmith", "format_version": 1})
    if qc.get("quant_method") != "bitsmith":
        return config                              # a foreign quantization_config: the manifest alone describes
    qc.pop("lossless", None)
    if block is not None:
        qc["lossless"] = block
    if set(qc) <= {"quant_method", "format_version"}:
        config.pop("quantization_config", None)
    else:
        config["quantization_config"] = qc
    return config


def _copy_side_files(folder: Path, writer) -> None:
    from .checkpoint import MANIFEST
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.name not in (MANIFEST, "config.json") and not f.name.endswith(NOT_SIDE_FILES):
            writer.add_file(f.name, f)


def _summary(src: Path, out: Path, tensors: int, coded: dict) -> dict:
    def size(folder):
        return sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    return {"tensors": tensors, "coded": len(coded), "source_bytes": size(src), "output_bytes": size(out),
            "coded_values": sum(math.prod(m["shape"]) for m in coded.values())}

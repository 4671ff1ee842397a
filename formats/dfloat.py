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

CPU decoder (`decode_many`: numpy, and torch's scatter-add). The windows are the lanes of a byte-at-a-
time finite-state decoder run in lockstep, one table lookup per byte of every window of a block of
windows (`_run`); a lookup gives the next state, the symbol count and the first four symbols. Two steps
at a time make a pair of at most eight symbols (`_pairs`), which is added at its bit position into
zeroed 64-bit words (`_gather`); the rare steps with more symbols and the partial bytes that end a
stream go apart (`_Exact`). The calling thread runs the lockstep loops, block after block; helper
threads (`_Tasks`) merge each block's exponents with the sign/mantissa bytes into the outputs and hash
each output once complete, beside the next loops: numpy and hashlib release the GIL in long calls.

Stream: 32-bit words stored little-endian, each filled from its most significant bit. In a checkpoint a
coded tensor `name` is one uint8 tensor `name.__df11` holding three sections back to back: the stream,
the sign/mantissa bytes, the code lengths of exponents first..last (0 = unused); its metadata entry
(`to_metadata`: shape, window_bits, stream_bits, exponent range, sha256 of the source) sits in the
manifest's `lossless` block. One entry instead of three keeps the safetensors header small.
"""
from __future__ import annotations

import bisect
import hashlib
import math
import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Self

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
    return _sha256(flat.view(torch.uint8).numpy() if flat.numel() else np.zeros(0, dtype=np.uint8))


def split(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(exponent, sign_mantissa) bytes of a BF16 tensor in C order; the sign is bit 7 of the second."""
    w = x.detach().cpu().contiguous().reshape(-1).view(torch.int16).numpy().view(np.uint16)
    exponent = ((w >> 7) & 0xFF).astype(np.uint8)
    sign_mantissa = (((w >> 8) & 0x80) | (w & 0x7F)).astype(np.uint8)
    return exponent, sign_mantissa


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


def decode_many(coded: list[Coded], names: list[str] | None = None, check: bool = True,
                threads: int | None = None) -> list[torch.Tensor]:
    """Several tensors at once, on CPU, on `threads` threads (default: `default_threads()`; one for at most
    BLOCK_WINDOWS windows): the calling thread runs the lockstep loops, the others (and the calling thread
    while it waits) merge the decoded blocks into the outputs and hash each output as soon as it is
    complete (see `_Tasks`)."""
    names = names or [f"tensor {i}" for i in range(len(coded))]
    for c, name in zip(coded, names):
        check_structure(c, name)
    # torch's allocator: numpy asks for transparent huge pages from 4 MiB, whose first writes stall on
    # memory compaction at times (here up to 100 ms for 45 MB, against 25 ms for 4 KiB pages)
    tensors = [torch.empty(c.numel, dtype=torch.int16) for c in coded]
    out = [t.numpy() for t in tensors]
    few = sum(_window_counts(coded)) <= BLOCK_WINDOWS               # then helpers cost more than they save
    with _Tasks(0 if few else (threads or default_threads()) - 1) as tasks:
        digests = _Digests(out, tasks) if check else None
        _decode_into(coded, names, out, tasks, digests)
        for i, (c, name) in enumerate(zip(coded, names)):
            if digests and digests.hexdigest(i) != c.sha256:
                raise InputError(f"{name}: decoded tensor does not match its recorded sha256 (corrupted coded data)")
    return [t.view(torch.bfloat16).reshape(c.shape) for t, c in zip(tensors, coded)]


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

BLOCK_WINDOWS = 8192     # most windows decoded in lockstep together (each step: numpy calls on this many)
CHUNK_ROWS = 8           # step pairs made into pairs, or gathered, per vectorized step (temporaries in L2)
MERGE_VALUES = 1 << 20   # values merged per vectorized step
AHEAD = 1                # blocks whose merges may wait, beyond one a helper thread (see `_Lockstep.decode`)
_NEXT = 0xFFFFFF                             # `_Tables.step` bits holding 256 * the next state
_BYTE_OF_WORD = np.array([3, 2, 1, 0])       # stream words are little-endian, read from their top byte
_SIGN_MANTISSA = np.int16(-0x7F81)           # 0x807F


def default_threads() -> int:
    """Threads `decode_many` uses unless told: torch's intra-op thread count (`torch.set_num_threads`)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(torch.get_num_threads(), cores))


@dataclass(frozen=True)
class _Tables:
    """A `huffman.ByteDecoder` flattened over entry = state * 256 + byte, in the form the decoder reads.

    One lookup a step gives both the next state and what the step emits: `step` packs 256 * the next state
    (bits 0..23), 8 * the symbol count (bits 24..31) and the first four symbols (bits 32..63, the first
    lowest). Only a code with a 1-bit codeword emits more than four symbols in a step: those rare escapes
    and the partial bytes that end a stream read `symbols` and `ends` instead (`_Exact`).
    """
    step: np.ndarray         # int64
    symbols: np.ndarray      # uint64: all the symbols, up to eight
    ends: np.ndarray         # uint8: bit 7 - i set when a codeword ends with bit i of the byte

    MAX_STATES = (_NEXT + 1) // 256

    @classmethod
    def of(cls, decoder: huffman.ByteDecoder) -> _Tables:
        symbols = decoder.symbols.reshape(-1)
        step = np.left_shift(symbols, np.uint64(32))
        part = np.left_shift(decoder.next.reshape(-1).view(np.uint64), np.uint64(8))   # one temporary: the
        step |= part                                                                   # tables are large
        step |= np.left_shift(decoder.count.reshape(-1), np.uint64(27), out=part)
        return cls(step.view(np.int64), symbols, decoder.ends.reshape(-1))


@dataclass(frozen=True)
class _Windows:
    """The windows of some tensors (a part of a `decode_many` call) in order: the lanes of the lockstep loop."""
    coded: list[Coded]
    first: np.ndarray        # int64 [tensors + 1]: the first window of each tensor, then the window count
    start: np.ndarray        # int64 [windows]: the decoder's root entry (root state * 256) for the window's code
    bits: np.ndarray         # int64 [windows]: stream bits in the window (fewer in the last one of a tensor)
    escapes: np.ndarray      # bool [windows]: the window's code has a 1-bit codeword (see `_Tables`)
    words: int               # 32-bit words of the widest window

    @classmethod
    def of(cls, coded: list[Coded], roots: list[int]) -> _Windows:
        count = _window_counts(coded)
        bits = [np.minimum(c.window_bits, c.stream_bits - c.window_bits * np.arange(n)) for c, n in zip(coded, count)]
        return cls(coded, np.concatenate([[0], np.cumsum(count)]).astype(np.int64),
                   np.repeat(np.asarray(roots, dtype=np.int64) * 256, count), np.concatenate(bits).astype(np.int64),
                   np.repeat([1 in c.code_lengths for c in coded], count),
                   max(c.window_bits // 32 for c, n in zip(coded, count) if n))

    def columns(self, a: int, b: int, out: np.ndarray) -> np.ndarray:
        """Words of windows a..b-1 as the columns of `out` [word, window], 1-filled past each stream's end."""
        for t in range(int(np.searchsorted(self.first, a, "right")) - 1, len(self.coded)):
            lo, hi = max(a, int(self.first[t])), min(b, int(self.first[t + 1]))
            if lo >= b:
                break
            if lo >= hi:
                continue
            width = self.coded[t].window_bits // 32
            words = self.coded[t].stream.view("<u4")[(lo - self.first[t]) * width: (hi - self.first[t]) * width]
            full = words.size // width
            np.copyto(out[:width, lo - a: lo - a + full], words[: full * width].reshape(full, width).T)
            out[width:, lo - a: hi - a] = 0xFFFFFFFF                # windows narrower than the widest
            if full < hi - lo:                                   # the end of the stream
                out[:, lo - a + full] = 0xFFFFFFFF
                out[: words.size - full * width, lo - a + full] = words[full * width:]
        return out


def _window_counts(coded: list[Coded]) -> list[int]:
    return [-(-c.stream_bits // c.window_bits) if c.numel else 0 for c in coded]


class _Tasks:
    """Tasks run by `helpers` threads, and by the calling thread while it waits for some (`wait`).

    numpy and hashlib release the GIL in their loops, but a thread that makes many short numpy calls
    hands the GIL over and over: two threads running lockstep loops (hundreds of calls of a few
    microseconds) run no faster than one. So the calling thread alone runs those loops, and the tasks
    (gathering and merging a block, hashing an output) make fewer, longer calls.
    """

    def __init__(self, helpers: int):
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.helpers = [threading.Thread(target=self._serve, daemon=True) for _ in range(max(helpers, 0))]
        for thread in self.helpers:
            thread.start()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        for _ in self.helpers:                                   # after the tasks still queued
            self.queue.put(None)
        for thread in self.helpers:
            thread.join()

    def submit(self, fn: Callable, *args) -> Future:
        future = Future()
        self.queue.put((future, fn, args))
        return future

    def wait(self, futures: list[Future], work: bool = True) -> None:
        """Until these tasks are done, run queued ones here (if not `work`, only where there are no helper
        threads to run them); raise what they raised."""
        work = work or not self.helpers
        for future in futures:
            while work and not future.done() and self._run_one(block=False):
                pass
            future.result()

    def _run_one(self, block: bool) -> bool:
        try:
            task = self.queue.get(block=block)
        except queue.Empty:
            return False
        if task is None:
            return False
        future, fn, args = task
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - raised again by `wait`, as concurrent.futures does
                future.set_exception(e)
        return True

    def _serve(self) -> None:
        while self._run_one(block=True):
            pass


class _Digests:
    """The sha256 of each output, a task as soon as all its values are in (`add`)."""

    def __init__(self, out: list[np.ndarray], tasks: _Tasks):
        self.out, self.tasks, self.lock = out, tasks, threading.Lock()
        self.missing = [bits.size for bits in out]
        self.hashed: dict[int, Future] = {}

    def add(self, i: int, values: int) -> None:
        """Values of output i are in."""
        with self.lock:
            self.missing[i] -= values
            if self.missing[i]:
                return
        self.hashed[i] = self.tasks.submit(_sha256, self.out[i])

    def hexdigest(self, i: int) -> str:
        if i not in self.hashed:
            return _sha256(self.out[i])
        self.tasks.wait([self.hashed[i]])
        return self.hashed[i].result()


def _sha256(bits: np.ndarray) -> str:
    return hashlib.sha256(bits).hexdigest()                     # releases the GIL: a task beside the loops


def _decode_into(coded: list[Coded], names: list[str], out: list[np.ndarray], tasks: _Tasks,
                 digests: _Digests | None) -> None:
    """Decode every tensor into its BF16 bit patterns `out` (int16), or raise InputError. A helper thread
    builds the tables for the tensors past the first half of the windows while this thread builds the
    first half's and runs their loops."""
    count = np.cumsum(_window_counts(coded))
    h = int(np.searchsorted(count, count[-1] / 2)) + 1 if tasks.helpers and count.size else len(coded)
    later, merges = tasks.submit(_Lockstep.build, coded[h:], out[h:], h, digests), []
    per_window = [part.decode(tasks, merges) for part in _Lockstep.build(coded[:h], out[:h], 0, digests)]
    tasks.wait([later])
    per_window += [part.decode(tasks, merges) for part in later.result()]
    tasks.wait(merges)
    per_window = np.concatenate(per_window) if per_window else np.zeros(0, dtype=np.int64)
    at = np.concatenate([[0], np.cumsum(_window_counts(coded))])
    for c, name, a, b in zip(coded, names, at[:-1], at[1:]):
        got = int(per_window[a:b].sum())
        if got != c.numel:
            raise InputError(f"{name}: coded stream holds {got} values, expected {c.numel} "
                             "(corrupted stream or code table)")


class _Scratch:
    """Named arrays for a block, reused by later blocks and calls: fresh memory costs a page fault every
    4 KiB, more than decoding the values in it. `take` a set from `_SCRATCH`, `give` it back; the sets
    stay there, at most one a core and AHEAD (about 3 KiB a window of a block: 22 MiB at 8192)."""

    def __init__(self):
        self.buffers: dict[str, np.ndarray] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        size = math.prod(shape) * np.dtype(dtype).itemsize
        buffer = self.buffers.get(name)
        if buffer is None or buffer.size < size:
            buffer = self.buffers[name] = np.empty(max(size, 8), dtype=np.uint8)
        return buffer[:size].view(dtype).reshape(shape)

    @staticmethod
    def take() -> _Scratch:
        try:
            return _SCRATCH.pop()
        except IndexError:
            return _Scratch()

    def give(self) -> None:
        if len(_SCRATCH) < (os.cpu_count() or 1) + AHEAD:
            _SCRATCH.append(self)


_SCRATCH: list[_Scratch] = []          # list.pop and list.append are atomic


@dataclass(frozen=True)
class _Block:
    """A block of windows after the lockstep loop, in the scratch arrays that hold it."""
    pair: np.ndarray
    at: np.ndarray
    per_window: np.ndarray   # bits of each window
    exact: _Exact
    scratch: _Scratch


class _Lockstep:
    """The decoder of the windows of some tensors (a part of a `decode_many` call), in blocks."""

    def __init__(self, tables: _Tables, windows: _Windows, out: list[np.ndarray], first: int,
                 digests: _Digests | None):
        self.tables, self.windows, self.out, self.first, self.digests = tables, windows, out, first, digests
        n = int(windows.first[-1])
        self.blocks = -(-n // BLOCK_WINDOWS)
        self.block = -(-n // self.blocks)                         # blocks of about equal size
        self.offsets = np.cumsum([0] + [c.numel for c in windows.coded]).tolist()

    @classmethod
    def build(cls, coded: list[Coded], out: list[np.ndarray], first: int, digests: _Digests | None) -> list[_Lockstep]:
        """The decoder of these tensors, outputs first.. of the call (in parts if their codes have too many
        states together)."""
        count = _window_counts(coded)
        keys = [(c.first_exponent, c.code_lengths.tobytes()) for c in coded]
        lengths = {k: c.lengths() for k, c, n in zip(keys, coded, count) if n}
        if not lengths:
            return []
        decoder = huffman.ByteDecoder.build(np.stack(list(lengths.values())))
        if decoder.next.shape[0] > _Tables.MAX_STATES and len(coded) > 1:   # too many for one table: halves
            h = len(coded) // 2
            return cls.build(coded[:h], out[:h], first, digests) + cls.build(coded[h:], out[h:], first + h, digests)
        root = dict(zip(lengths, decoder.root.tolist()))
        return [cls(_Tables.of(decoder), _Windows.of(coded, [root.get(k, 0) for k in keys]), out, first, digests)]

    def decode(self, tasks: _Tasks, merges: list[Future]) -> np.ndarray:
        """Run the lockstep loop of each block here, one block after another, each followed by a task that
        merges it (appended to `merges`); the values of each window. Before a loop, this thread waits for
        all merges but the last few (one a helper thread, and AHEAD), so that few blocks hold scratch
        arrays at once."""
        per_window, start = [], 0
        for k in range(self.blocks):
            tasks.wait(merges[: max(len(merges) - len(tasks.helpers) - AHEAD, 0)], work=False)
            block = self._lockstep(k * self.block, min((k + 1) * self.block, int(self.windows.first[-1])))
            merges.append(tasks.submit(self._merge, block, start))
            per_window.append(block.per_window // 8)
            start += int(block.per_window.sum()) // 8
        return np.concatenate(per_window).astype(np.int64)

    def _lockstep(self, a: int, b: int) -> _Block:
        """The lockstep loop of windows a..b-1."""
        scratch = _Scratch.take()
        windows, bits = self.windows, self.windows.bits[a:b]
        words = windows.columns(a, b, scratch.get("words", (windows.words, b - a), np.uint32))
        watch = np.flatnonzero((bits < 32 * words.shape[0]) | windows.escapes[a:b])   # see `_Exact`
        start = windows.start[a:b]
        pair, at, watched = _run(self.tables.step, words, start, watch, scratch)
        exact = _Exact.of(self.tables, bits[watch], start[watch], np.take(words, watch, axis=1), watched,
                          windows.escapes[a:b][watch], watch)
        return _Block(pair, at, exact.apply(pair, at), exact, scratch)

    def _merge(self, block: _Block, start: int) -> None:
        """Merge the exponents of a block, values start.., into the outputs of the tensors they belong to."""
        exponent = _gather(block.pair, block.at, block.per_window, block.exact, block.scratch)
        offsets, stop = self.offsets, min(start + exponent.size, self.offsets[-1])   # more: corrupted
        for t in range(max(bisect.bisect_right(offsets, start) - 1, 0), len(self.out)):
            lo, hi = max(start, offsets[t]), min(stop, offsets[t + 1])
            if lo >= stop:
                break
            if lo < hi:
                merge(exponent[lo - start: hi - start],
                      self.windows.coded[t].sign_mantissa[lo - offsets[t]: hi - offsets[t]],
                      self.out[t][lo - offsets[t]: hi - offsets[t]], block.scratch.get("merge", (MERGE_VALUES,), np.int16))
                if self.digests:
                    self.digests.add(self.first + t, hi - lo)
        block.scratch.give()


def _run(step: np.ndarray, words: np.ndarray, start: np.ndarray, watch: np.ndarray,
         scratch: _Scratch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode every window of a block, all in lockstep; `words` [word, window].

    A byte-at-a-time finite-state decoder (Choueka, Klein & Perl 1985) consumes 8 bits a step in every
    window whatever the codewords, so step j of all windows is one lookup in `_Tables.step` on byte j of
    each. Every CHUNK_ROWS pairs of steps, `_pairs` turns them into what they emit.

    Returns (pair, at, watched): for each pair of steps and window what the two steps emit and the bit of
    the window where that starts (`at` has one more row: where the window ends), both [step pair, window];
    the steps themselves only for the `watch` windows, [step % 2, step // 2, window].
    """
    rows, n = 2 * words.shape[0], start.size
    pair, at = scratch.get("pair", (rows, n), np.uint64), scratch.get("at", (rows + 1, n), np.uint32)
    watched = scratch.get("watched", (2, rows, watch.size), np.int64)
    steps = scratch.get("steps", (2, CHUNK_ROWS, n), np.int64)
    state, entry = start.copy(), scratch.get("entry", (n,), np.int64)
    as_bytes = words.view(np.uint8).reshape(*words.shape, 4)
    at[0] = 0
    for r in range(0, rows, CHUNK_ROWS):
        c = min(CHUNK_ROWS, rows - r)
        for j in range(2 * r, 2 * (r + c)):
            row = steps[j & 1, (j >> 1) - r]
            np.add(state, as_bytes[j >> 2, :, _BYTE_OF_WORD[j & 3]], out=entry)
            np.take(step, entry, out=row, mode="clip")         # in range by construction: no check needed
            np.bitwise_and(row, _NEXT, out=state)
        if watch.size:
            watched[:, r: r + c] = steps[:, :c, watch]
        _pairs(steps[:, :c], pair[r: r + c], at[r: r + c + 1], scratch)
    return pair, at, watched


def _pairs(steps: np.ndarray, pair: np.ndarray, at: np.ndarray, scratch: _Scratch) -> None:
    """What two steps of a window emit together (`steps` [2, step pair, window], overwritten): into `pair`
    the symbols of the even step then those of the odd one (at most eight bytes, as a step emits at most
    four symbols but for escapes), and into at[1:] their end, at[0] + 8 bits a symbol."""
    even, odd = steps[0].view(np.uint64), steps[1].view(np.uint64)
    shift = np.right_shift(even, 24, out=scratch.get("shift", even.shape, np.uint64))
    shift &= 0xFF                                                # 8 * count of the even step
    part = np.right_shift(odd, 32, out=scratch.get("part", even.shape, np.uint64))
    part <<= shift                                               # << 64 == 0
    np.bitwise_or(np.right_shift(even, 32, out=pair), part, out=pair)
    odd >>= 24
    odd &= 0xFF                                                  # 8 * count of the odd step
    bits = np.add(odd, shift, out=scratch.get("bits", odd.shape, np.uint32), casting="unsafe")
    for i in range(bits.shape[0]):
        np.add(at[i], bits[i], out=at[i + 1])


@dataclass(frozen=True)
class _Exact:
    """The pairs that `pair` cannot hold, for `_gather` to add apart: those with an escape, and the last pair
    of each window shorter than the steps (nothing past its last bit counts, the pairs after it are
    cleared). `row` and `column` place them in [step pair, window]; the bits and symbols are each step's."""
    row: np.ndarray
    column: np.ndarray
    even_bits: np.ndarray
    even: np.ndarray
    odd: np.ndarray
    short: np.ndarray        # windows shorter than the steps ...
    last: np.ndarray         # ... their last pair ...
    last_bits: np.ndarray    # ... and its bits

    @classmethod
    def of(cls, tables: _Tables, window_bits: np.ndarray, start: np.ndarray, words: np.ndarray, steps: np.ndarray,
           escapes: np.ndarray, columns: np.ndarray) -> _Exact:
        """From the steps of some windows (the block's `columns`; their bits, root entries, words, escapes)."""
        _, rows, n = steps.shape
        short = np.flatnonzero(window_bits < 16 * rows)
        last = (window_bits[short] - 1) // 16
        escape = np.flatnonzero(escapes)
        row, column = np.nonzero(((steps[:, :, escape] >> 24 & 0xFF) > 32).any(axis=0))
        flat = np.unique(np.concatenate([row * n + escape[column], last * n + short]))
        row, window = np.divmod(flat, n)
        valid = window_bits[window] - 16 * row                # bits of the window from the pair's first byte
        even_bits, even = _symbols_within(tables, _entry_at(steps, words, start, 2 * row, window), valid)
        odd_bits, odd = _symbols_within(tables, _entry_at(steps, words, start, 2 * row + 1, window), valid - 8)
        last_bits = (even_bits + odd_bits)[np.searchsorted(flat, last * n + short)]
        return cls(row, columns[window], even_bits, even, odd, columns[short], last, last_bits)

    def apply(self, pair: np.ndarray, at: np.ndarray) -> np.ndarray:
        """Take these pairs out of `pair` and clear those past each short window; the bits of each window."""
        for column, last in zip(self.short.tolist(), self.last.tolist()):
            pair[last + 1:, column] = 0
        pair[self.row, self.column] = 0
        bits = at[-1].astype(np.uint64)
        bits[self.short] = at[self.last, self.short] + self.last_bits
        return bits


def _entry_at(steps: np.ndarray, words: np.ndarray, start: np.ndarray, step: np.ndarray,
              window: np.ndarray) -> np.ndarray:
    """The entry (state * 256 + byte) that the decoder read at `step` of each `window`."""
    before = np.maximum(step - 1, 0)
    state = np.where(step > 0, steps[before & 1, before >> 1, window] & _NEXT, start[window])
    return state + words.view(np.uint8).reshape(*words.shape, 4)[step >> 2, window, _BYTE_OF_WORD[step & 3]]


def _symbols_within(tables: _Tables, entry: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(8 * count, symbols) of the codewords that end within the first `valid` bits of each entry's byte."""
    ends = tables.ends[entry] >> (8 - np.clip(valid, 0, 8)).astype(np.uint8)
    bits = np.bitwise_count(ends).astype(np.uint64) << np.uint64(3)
    return bits, tables.symbols[entry] & ((np.uint64(1) << bits) - np.uint64(1))   # 1 << 64 == 0: all


def _gather(pair: np.ndarray, at: np.ndarray, per_window: np.ndarray, exact: _Exact,
            scratch: _Scratch) -> np.ndarray:
    """The exponent bytes of a block: every pair's symbols at its bit, the windows one after another.

    The symbols are added into zeroed 64-bit words, which ORs them as the fields are disjoint, so the
    order of the additions does not matter. The cleared pairs past a short window's end may lie past the
    block's end, up to 128 bits a pair: the words have room for them.
    """
    rows, n = pair.shape
    base = np.cumsum(per_window) - per_window                     # each window's first bit
    total = int(per_window.sum())
    words = scratch.get("exponent", ((total + 128 * rows) // 64 + 2,), np.int64)
    words.fill(0)
    out = torch.from_numpy(words)
    for r in range(0, rows, CHUNK_ROWS):
        c = min(CHUNK_ROWS, rows - r)
        _add_bits(out, np.add(at[r: r + c], base, out=scratch.get("position", (c, n), np.uint64)),
                  pair[r: r + c], scratch)
    first = base[exact.column] + at[exact.row, exact.column]
    _add_bits(out, np.concatenate([first, first + exact.even_bits]), np.concatenate([exact.even, exact.odd]), scratch)
    return words.view(np.uint8)[: total // 8]


def _add_bits(words: torch.Tensor, at: np.ndarray, value: np.ndarray, scratch: _Scratch) -> None:
    """Add each value (uint64; destroyed) at bit `at` of the little-endian words: split over two words."""
    shift = np.bitwise_and(at, 63, out=scratch.get("shift", at.shape, np.uint64))
    index = torch.from_numpy(np.right_shift(at, 6, out=scratch.get("index", at.shape, np.uint64))
                             .view(np.int64).reshape(-1))
    low = np.left_shift(value, shift, out=scratch.get("low", at.shape, np.uint64))
    high = np.right_shift(value, np.subtract(64, shift, out=shift), out=value)   # >> 64 == 0
    words.scatter_add_(0, index, torch.from_numpy(low.view(np.int64).reshape(-1)))
    words[1:].scatter_add_(0, index, torch.from_numpy(high.view(np.int64).reshape(-1)))


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

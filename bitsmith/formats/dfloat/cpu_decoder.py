"""CPU decoder of lossless BF16 tensors (codec.py), vectorized across windows: numpy, and torch's scatter-add.

The windows are the lanes of a byte-at-a-time finite-state decoder run in lockstep, one table lookup per
byte of every window of a block of windows (`_run`); a lookup gives the next state, the symbol count and
the first four symbols. Two steps at a time make a pair of at most eight symbols (`_pairs`), which is
added at its bit position into zeroed 64-bit words (`_gather`); the rare steps with more symbols and the
partial bytes that end a stream go apart (`_Exact`). The calling thread runs the lockstep loops, block
after block; helper threads (`tasks.Tasks`) merge each block's exponents with the sign/mantissa bytes
into the outputs and hash each output once complete, beside the next loops: numpy and hashlib release
the GIL in long calls.
"""
from __future__ import annotations

import bisect
import math
import os
import threading
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np
import torch

from .. import huffman
from ..errors import InputError
from .codec import MERGE_VALUES, Coded, bytes_sha256, check_structure, merge
from .tasks import Tasks, default_threads

BLOCK_WINDOWS = 8192     # most windows decoded in lockstep together (each step: numpy calls on this many)
CHUNK_ROWS = 8           # step pairs made into pairs, or gathered, per vectorized step (temporaries in L2)
AHEAD = 1                # blocks whose merges may wait, beyond one a helper thread (see `_Lockstep.decode`)
_NEXT = 0xFFFFFF                             # `_Tables.step` bits holding 256 * the next state
_BYTE_OF_WORD = np.array([3, 2, 1, 0])       # stream words are little-endian, read from their top byte


def decode(coded: Coded, name: str = "tensor", check: bool = True) -> torch.Tensor:
    """The BF16 tensor back, on CPU; `check` compares it with the recorded sha256."""
    return decode_many([coded], [name], check)[0]


def decode_many(coded: list[Coded], names: list[str] | None = None, check: bool = True,
                threads: int | None = None) -> list[torch.Tensor]:
    """Several tensors at once, on CPU, on `threads` threads (default: `default_threads()`; one for at most
    BLOCK_WINDOWS windows): the calling thread runs the lockstep loops, the others (and the calling thread
    while it waits) merge the decoded blocks into the outputs and hash each output as soon as it is
    complete (see `Tasks`)."""
    names = names or [f"tensor {i}" for i in range(len(coded))]
    for c, name in zip(coded, names):
        check_structure(c, name)
    # torch's allocator: numpy asks for transparent huge pages from 4 MiB, whose first writes stall on
    # memory compaction at times (here up to 100 ms for 45 MB, against 25 ms for 4 KiB pages)
    tensors = [torch.empty(c.numel, dtype=torch.int16) for c in coded]
    out = [t.numpy() for t in tensors]
    few = sum(_window_counts(coded)) <= BLOCK_WINDOWS               # then helpers cost more than they save
    with Tasks(0 if few else (threads or default_threads()) - 1) as tasks:
        digests = _Digests(out, tasks) if check else None
        _decode_into(coded, names, out, tasks, digests)
        for i, (c, name) in enumerate(zip(coded, names)):
            if digests and digests.hexdigest(i) != c.sha256:
                raise InputError(f"{name}: decoded tensor does not match its recorded sha256 (corrupted coded data)")
    return [t.view(torch.bfloat16).reshape(c.shape) for t, c in zip(tensors, coded)]


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


class _Digests:
    """The sha256 of each output, a task as soon as all its values are in (`add`)."""

    def __init__(self, out: list[np.ndarray], tasks: Tasks):
        self.out, self.tasks, self.lock = out, tasks, threading.Lock()
        self.missing = [bits.size for bits in out]
        self.hashed: dict[int, Future] = {}

    def add(self, i: int, values: int) -> None:
        """Values of output i are in."""
        with self.lock:
            self.missing[i] -= values
            if self.missing[i]:
                return
        self.hashed[i] = self.tasks.submit(bytes_sha256, self.out[i])

    def hexdigest(self, i: int) -> str:
        if i not in self.hashed:
            return bytes_sha256(self.out[i])
        self.tasks.wait([self.hashed[i]])
        return self.hashed[i].result()


def _decode_into(coded: list[Coded], names: list[str], out: list[np.ndarray], tasks: Tasks,
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

    def decode(self, tasks: Tasks, merges: list[Future]) -> np.ndarray:
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
                      self.out[t][lo - offsets[t]: hi - offsets[t]],
                      block.scratch.get("merge", (MERGE_VALUES,), np.int16))
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

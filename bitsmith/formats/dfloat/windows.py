"""The encoder's half of the window layout (codec.py): codewords packed MSB first into 32-bit words, in
windows of `window_bits` that no codeword straddles, the rest of each window 1-filled.

Vectorized over codewords (numpy and torch): a pass over cumulative code lengths finds, window after
window, the codeword that would straddle the window's end and how long the fill before it is; the
codewords then go two at a time, fills joined in, into 64-bit words by scatter-add.
"""
from __future__ import annotations

from concurrent.futures import Future

import numpy as np
import torch

from .tasks import Tasks

SEGMENT = 1 << 16        # pairs of codewords handled per vectorized step of the encoder (temporaries in cache)
AHEAD = 2                # segments found but not yet added, at most
TABLE_PAIRS = 1 << 15    # pairs from which the code of every pair is tabled first (`_PairCode`)


class _PairCode:
    """The code of two exponents at once, looked up by the pair's index a + 256 * b (two exponent bytes read
    as one little-endian uint16): the codeword of a then that of b, left-aligned in 64 bits (`code`), and
    their length, up to 32 (`length`). From TABLE_PAIRS pairs on, a table of all 65536 pairs."""

    def __init__(self, codes: np.ndarray, lengths: np.ndarray, pairs: int):
        self.codes, self.lengths = codes.astype(np.uint64), lengths.astype(np.uint8)
        self.table = None
        if pairs >= TABLE_PAIRS:
            every = np.arange(1 << 16, dtype=np.uint16)
            self.table = self.code(every), self.length(every)

    def length(self, pair: np.ndarray) -> np.ndarray:
        if self.table is not None:
            return np.take(self.table[1], pair)
        return np.take(self.lengths, pair & 0xFF) + np.take(self.lengths, pair >> 8)

    def code(self, pair: np.ndarray) -> np.ndarray:
        if self.table is not None:
            return np.take(self.table[0], pair)
        a, b = pair & 0xFF, pair >> 8
        second = np.take(self.lengths, b).astype(np.uint64)
        value = (np.take(self.codes, a) << second) | np.take(self.codes, b)
        return value << (np.uint64(64) - second - np.take(self.lengths, a))     # << 64 == 0: no codeword


def pack(exponent: np.ndarray, codes: np.ndarray, lengths: np.ndarray, total: int, window_bits: int,
         max_length: int, tasks: Tasks) -> tuple[np.ndarray, int]:
    """Pack the codewords of `exponent` MSB first into windows of `window_bits` that no codeword straddles,
    1-filling the rest of each window; `total` = the codeword bits, `max_length` the longest codeword.
    Returns the stream bytes and its length in bits.

    Codewords go two at a time (`_PairCode`), and each 1-fill joins the pair that follows it, before or
    between its two codewords, so that the units (a pair and any fill in it, at most 47 bits) lie back to
    back and each is added into at most two 64-bit words (`_add_units`). This thread finds the fills,
    segment after segment; adding a segment's units is a task (`tasks`, whose one helper thread runs them
    in order, so no two add into the same word at once).
    """
    pairs = _PairCode(codes, lengths, exponent.size // 2)
    length_of = lengths.tolist()
    even = exponent.size - exponent.size % 2
    index = exponent[:even].view("<u2")
    words = np.zeros(-(-(total + 16 * (total // (window_bits - max_length) + 2)) // 64) + 2, dtype=np.uint64)
    out = torch.from_numpy(words.view(np.int64))
    cursor, window_end = 0, window_bits           # where the next unit goes; end of the current window
    placed: list[Future] = []
    for a in range(0, index.size, SEGMENT):
        tasks.wait(placed[: max(len(placed) - AHEAD, 0)], work=False)   # few segments in memory at once
        seg = index[a: a + SEGMENT]
        length = pairs.length(seg)
        end = torch.from_numpy(length).cumsum(0).numpy()   # ends in an unbroken stream from the segment's start
        offset, fill_at, fill, between = cursor, [], [], []
        while True:
            j = int(end.searchsorted(window_end - offset, "right"))   # the first pair that overruns the window
            if j == end.size:
                break
            start = offset + (end.item(j - 1) if j else 0)
            head = length_of[exponent.item(2 * (a + j))]
            inside = start + head <= window_end       # its first codeword still fits: fill between the two
            gap = window_end - start - (head if inside else 0)
            if gap:
                fill_at.append(j)
                fill.append(gap)
                between.append(inside)
            offset += gap
            window_end += window_bits
        fills = None
        if fill_at:
            at = np.asarray(fill_at)
            fills = at, *_join_fills(exponent[2 * (a + at)], exponent[2 * (a + at) + 1], np.asarray(fill),
                                     np.asarray(between), codes, lengths)
        placed.append(tasks.submit(_place, out, pairs, seg, length, cursor, fills))
        cursor = offset + end.item(-1)
    tasks.wait(placed, work=False)
    if exponent.size % 2:                         # an odd last codeword: a unit of its own
        e = int(exponent[-1])
        if cursor + length_of[e] > window_end:
            _add_units(out, np.array([cursor]), _field(np.array([window_end - cursor]), None))
            cursor = window_end
        _add_units(out, np.array([cursor]), _field(lengths[e: e + 1], codes[e: e + 1]))
        cursor += length_of[e]
    _add_units(out, np.array([cursor]), _field(np.array([-cursor % 32]), None))   # 1-fill the last 32-bit word
    return words.astype(">u8").view(">u4")[: -(-cursor // 32)].astype("<u4").view(np.uint8), cursor


def _place(words: torch.Tensor, code: _PairCode, pairs: np.ndarray, length: np.ndarray, cursor: int,
           fills: tuple[np.ndarray, np.ndarray, np.ndarray] | None) -> None:
    """Add a segment's `pairs` (their `length`) from bit `cursor` on, with the fills joined in (`fills`:
    pairs, units, lengths)."""
    value = code.code(pairs)
    if fills is not None:
        at, value[at], length[at] = fills
    end = torch.from_numpy(length).cumsum(0).numpy()
    _add_units(words, end - length + cursor, value)


def _join_fills(first: np.ndarray, second: np.ndarray, fill: np.ndarray, between: np.ndarray,
                codes: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(value, length) units of the pairs of exponents (first, second) with a 1-fill of `fill` bits in
    front of the pair, or `between` its two codewords."""
    a, b = codes[first].astype(np.uint64), codes[second].astype(np.uint64)
    la, lb, fill = lengths[first].astype(np.int64), lengths[second].astype(np.int64), fill.astype(np.int64)
    ones = _field(fill, None) >> (np.uint64(64) - fill.astype(np.uint64))
    unit = np.where(between, (((a << fill.astype(np.uint64)) | ones) << lb.astype(np.uint64)) | b,
                    (((ones << la.astype(np.uint64)) | a) << lb.astype(np.uint64)) | b)
    length = fill + la + lb
    return _field(length, unit), length.astype(np.uint8)


def _field(length: np.ndarray, value: np.ndarray | None) -> np.ndarray:
    """`value` (all ones when None), `length` bits long, left-aligned in 64 bits (a unit of `_add_units`)."""
    length = np.asarray(length).astype(np.uint64)
    if value is None:
        value = (np.uint64(1) << length) - np.uint64(1)
        value[length == 64] = np.uint64(0xFFFFFFFFFFFFFFFF)
    return value.astype(np.uint64) << (np.uint64(64) - length)     # << 64 == 0: an empty field


def _add_units(words: torch.Tensor, start: np.ndarray, value: np.ndarray) -> None:
    """Add bit fields, left-aligned in `value`, from bit `start` of the MSB-first 64-bit words (at most 64
    bits each, so a field covers at most two words); the fields are disjoint, so adding is OR."""
    shift = (start & 63).astype(np.uint64)
    index = torch.from_numpy(start >> 6)
    words.scatter_add_(0, index, torch.from_numpy((value >> shift).view(np.int64)))
    words[1:].scatter_add_(0, index, torch.from_numpy((value << (np.uint64(64) - shift)).view(np.int64)))

"""Canonical Huffman codes with a length limit, over a small alphabet (the 256 values of a byte).

- `code_lengths`: optimal code lengths no longer than `max_length`, by package-merge
  (Larmore & Hirschberg, "A fast algorithm for optimal length-limited Huffman codes", JACM 1990).
- `canonical_codes`: codes given by the lengths alone, counted up in order of (length, symbol)
  (DEFLATE, RFC 1951 section 3.2.2), so a table of lengths is the whole code book.
- Decoding tables for a decoder that peeks `width` bits, MSB first: one symbol per lookup
  (`lookup_table`), several symbols per lookup (`multi_symbol_table`), and the per-length limits of a
  canonical decoder that needs no table beyond the symbol list (`canonical_limits`).
"""
from __future__ import annotations

import numpy as np


def code_lengths(counts: np.ndarray, max_length: int) -> np.ndarray:
    """Lengths (uint8, 0 = unused symbol) minimizing sum(counts * lengths) with every length <= max_length."""
    counts = np.asarray(counts, dtype=np.int64)
    lengths = np.zeros(counts.shape[0], dtype=np.uint8)
    symbols = np.flatnonzero(counts)
    if symbols.size == 1:
        lengths[symbols[0]] = 1                 # one symbol still spends one bit, so every code has a length
        return lengths
    if symbols.size > 1 << max_length:
        raise ValueError(f"{symbols.size} symbols do not fit in codes of at most {max_length} bits")
    if symbols.size == 0:
        return lengths
    order = np.argsort(counts[symbols], kind="stable")
    leaf_weight = counts[symbols][order]
    leaf_rows = np.eye(symbols.size, dtype=np.int32)[order]   # row i: how often each leaf occurs in item i
    weight, rows = leaf_weight, leaf_rows
    for _ in range(max_length - 1):             # package-merge: pair up the list, merge packages with the leaves
        m = weight.size // 2 * 2
        weight = np.concatenate([leaf_weight, weight[0:m:2] + weight[1:m:2]])
        rows = np.concatenate([leaf_rows, rows[0:m:2] + rows[1:m:2]])
        keep = np.argsort(weight, kind="stable")
        weight, rows = weight[keep], rows[keep]
    lengths[symbols] = rows[: 2 * symbols.size - 2].sum(axis=0)   # a leaf's depth = the chosen items holding it
    return lengths


def check_lengths(lengths: np.ndarray, max_length: int) -> None:
    """Raise ValueError unless `lengths` describe a prefix code (Kraft sum <= 1) within `max_length` bits."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and int(lengths.max()) > max_length:
        raise ValueError(f"code length {int(lengths.max())} exceeds the limit of {max_length} bits")
    used = lengths[lengths > 0]
    if int((np.int64(1) << (max_length - used)).sum()) > 1 << max_length:   # Kraft inequality
        raise ValueError("code lengths violate the Kraft inequality: not a prefix code")


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Codes (uint32) of the canonical prefix code with these lengths (RFC 1951 section 3.2.2)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    codes = np.zeros(lengths.size, dtype=np.uint32)
    code, previous = 0, 0
    for s in np.lexsort((np.arange(lengths.size), lengths)):
        if lengths[s] == 0:
            continue
        code <<= int(lengths[s]) - previous
        codes[s], code, previous = code, code + 1, int(lengths[s])
    return codes


def lookup_table(lengths: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(symbol, length) of the codeword that starts each `width`-bit pattern.

    Length 0 where no codeword of at most `width` bits starts the pattern (a longer one, or none at all).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    codes = canonical_codes(lengths).astype(np.int64)
    symbol = np.zeros(1 << width, dtype=np.uint8)
    length = np.zeros(1 << width, dtype=np.uint8)
    for s in np.flatnonzero((lengths > 0) & (lengths <= width)):
        shift = width - int(lengths[s])
        first = int(codes[s]) << shift
        symbol[first: first + (1 << shift)] = s
        length[first: first + (1 << shift)] = lengths[s]
    return symbol, length


def multi_symbol_table(lengths: np.ndarray, width: int, max_symbols: int = 8):
    """For every `width`-bit pattern, the whole codewords it holds from its first bit on (at most `max_symbols`).

    Returns (symbols uint64: symbol j in byte j, count uint8, used bits uint8, ends uint8 [2**width,
    max_symbols]: bit where symbol j ends, 255 past `count`). A decoder consumes `used` bits per lookup.
    """
    symbol1, length1 = lookup_table(lengths, width)
    pattern = np.arange(1 << width, dtype=np.int64)
    mask = (1 << width) - 1
    symbols = np.zeros(1 << width, dtype=np.uint64)
    count = np.zeros(1 << width, dtype=np.uint8)
    used = np.zeros(1 << width, dtype=np.int64)
    ends = np.full((1 << width, max_symbols), 255, dtype=np.uint8)
    live = np.ones(1 << width, dtype=bool)
    for j in range(max_symbols):
        rest = (pattern << used) & mask          # the bits after the codewords taken so far, zero-filled
        n = length1[rest].astype(np.int64)
        live &= (n > 0) & (used + n <= width)    # the next codeword must lie wholly inside the pattern
        symbols |= np.where(live, symbol1[rest].astype(np.uint64) << np.uint64(8 * j), np.uint64(0))
        used += np.where(live, n, 0)
        ends[live, j] = used[live]
        count += live
    return symbols, count, used.astype(np.uint8), ends


def canonical_limits(lengths: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Tables of a canonical decoder reading a `width`-bit pattern v (RFC 1951 order).

    Returns (limit, first, offset, sorted_symbols), the first three indexed by length 0..width:
    the codeword length is the smallest l with v < limit[l]; its symbol is
    sorted_symbols[offset[l] + (v >> (width - l)) - first[l]]. A pattern >= limit[width] starts no
    codeword (only possible for an incomplete code).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    n_of = np.bincount(lengths[lengths > 0], minlength=width + 1)[: width + 1]
    first = np.zeros(width + 1, dtype=np.int64)
    limit = np.zeros(width + 1, dtype=np.int64)
    offset = np.zeros(width + 1, dtype=np.int64)
    code, seen = 0, 0
    for l in range(1, width + 1):
        code <<= 1
        first[l], offset[l] = code, seen
        code += int(n_of[l])
        seen += int(n_of[l])
        limit[l] = code << (width - l)
    used = np.flatnonzero(lengths)
    sorted_symbols = used[np.lexsort((used, lengths[used]))]
    return limit, first, offset, sorted_symbols

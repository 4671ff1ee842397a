"""Canonical Huffman codes with a length limit, over a small alphabet (the 256 values of a byte).

- `code_lengths`: optimal code lengths no longer than `max_length`: Huffman's where they fit, else by
  package-merge (Larmore & Hirschberg, "A fast algorithm for optimal length-limited Huffman codes", JACM 1990).
- `canonical_codes`: codes given by the lengths alone, counted up in order of (length, symbol)
  (DEFLATE, RFC 1951 section 3.2.2), so a table of lengths is the whole code book.
- Decoding tables for a decoder that peeks `width` bits, MSB first: one symbol per lookup
  (`lookup_table`) and the per-length limits of a canonical decoder that needs no table beyond the
  symbol list (`canonical_limits`).
- `ByteDecoder`: a finite-state decoder that reads one byte per step whatever the codeword lengths
  (table-driven Huffman decoding: Choueka, Klein & Perl, "Efficient variants of Huffman codes in high
  level languages", SIGIR 1985), for many codes at once.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

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
    depths = _huffman_depths(counts[symbols].tolist())
    if max(depths) <= max_length:               # the limit does not bind: Huffman's code is optimal
        lengths[symbols] = depths
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


def _huffman_depths(weights: list[int]) -> list[int]:
    """Leaf depths of a Huffman tree over `weights` (Huffman, "A method for the construction of
    minimum-redundancy codes", Proc. IRE 1952): merge the two lightest nodes until one is left."""
    heap = [(w, i) for i, w in enumerate(weights)]
    heapq.heapify(heap)
    parent = [0] * (2 * len(weights) - 1)
    for node in range(len(weights), 2 * len(weights) - 1):
        (wa, a), (wb, b) = heapq.heappop(heap), heapq.heappop(heap)
        parent[a] = parent[b] = node
        heapq.heappush(heap, (wa + wb, node))
    depth = [0] * len(parent)                   # the root, created last, has depth 0
    for node in range(len(parent) - 2, -1, -1):
        depth[node] = depth[parent[node]] + 1
    return depth[: len(weights)]


def check_lengths(lengths: np.ndarray, max_length: int) -> None:
    """Raise ValueError unless `lengths` describe a prefix code (Kraft sum <= 1) within `max_length` bits."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and int(lengths.max()) > max_length:
        raise ValueError(f"code length {int(lengths.max())} exceeds the limit of {max_length} bits")
    used = lengths[lengths > 0]
    if int((np.int64(1) << (max_length - used)).sum()) > 1 << max_length:   # Kraft inequality
        raise ValueError("code lengths violate the Kraft inequality: not a prefix code")


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Codes (uint32) of the canonical prefix code with these lengths (RFC 1951 section 3.2.2).

    Each row of a 2-D `lengths` is a code of its own. Symbols of length l take the codes
    next_code[l], next_code[l] + 1, ... in symbol order, next_code[l] = (next_code[l-1] + n[l-1]) << 1.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    rows = lengths.reshape(-1, lengths.shape[-1])
    width = int(rows.max(initial=0)) + 1
    key = (np.arange(rows.shape[0])[:, None] * width + rows).reshape(-1)     # (code, length)
    n = np.bincount(key, minlength=rows.shape[0] * width)
    order = np.argsort(key.astype(np.min_scalar_type(n.size)), kind="stable")   # then symbol (a radix sort)
    rank = np.empty_like(key)                                                # earlier symbols of the same length
    rank[order] = np.arange(key.size) - (np.cumsum(n) - n)[key[order]]
    n = n.reshape(-1, width)
    next_code = np.zeros_like(n)
    for l in range(2, width):
        next_code[:, l] = (next_code[:, l - 1] + n[:, l - 1]) << 1
    codes = next_code.reshape(-1)[key] + rank
    return np.where(rows.reshape(-1) > 0, codes, 0).astype(np.uint32).reshape(lengths.shape)


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


@dataclass(frozen=True)
class ByteDecoder:
    """A finite-state Huffman decoder for several codes that consumes 8 bits per step.

    A state is a proper prefix of a codeword of one code (its root: the empty prefix), or the shared
    dead state that an invalid bit string falls into and never leaves. Reading byte b in state s emits
    the codewords that the bits of s followed by b complete, in order, and moves to the prefix left over.
    """
    root: np.ndarray       # int64 [codes]: the start state of each code
    next: np.ndarray       # int64 [states, 256]: the state after the byte
    ends: np.ndarray       # uint8 [states, 256]: bit 7 - i set when a codeword ends with bit i of the byte
    symbols: np.ndarray    # uint64 [states, 256]: the emitted symbols, the first in the lowest byte

    @property
    def count(self) -> np.ndarray:
        """How many codewords each (state, byte) emits: at most 8."""
        return np.bitwise_count(self.ends)

    @classmethod
    def build(cls, lengths: np.ndarray) -> ByteDecoder:
        """The decoder of the canonical codes with these lengths (one code per row of [codes, symbols])."""
        next1, emits1, symbol1, root = _bit_steps(np.atleast_2d(np.asarray(lengths, dtype=np.int64)))
        nibble = np.arange(16)
        state = np.repeat(np.arange(next1.shape[0]), 16)
        ends, symbols = np.zeros(state.size, dtype=np.uint8), np.zeros(state.size, dtype=np.uint64)
        for i in range(4):                        # 4 bits one at a time ...
            bit = np.tile(nibble >> (3 - i) & 1, next1.shape[0])
            emits = emits1[state, bit]
            shift = (8 * np.bitwise_count(ends)).astype(np.uint64)
            symbols |= np.where(emits, symbol1[state, bit].astype(np.uint64) << shift, np.uint64(0))
            ends |= emits.astype(np.uint8) << np.uint8(3 - i)
            state = next1[state, bit]
        # ... then a byte as two nibbles, [state, high nibble, low nibble]: `low` indexes the second's entry
        state4, ends4, symbols4 = (a.reshape(-1, 16, 1) for a in (state, ends, symbols))
        low = state4 * 16 + nibble
        byte_symbols = symbols[low]                                         # in place: the tables are large
        byte_symbols <<= (np.bitwise_count(ends4) << np.uint8(3)).astype(np.uint64)
        byte_symbols |= symbols4
        return cls(root, state[low].reshape(-1, 256), ((ends4 << np.uint8(4)) | ends[low]).reshape(-1, 256),
                   byte_symbols.reshape(-1, 256))


def _bit_steps(lengths: np.ndarray):
    """One bit at a time: (next state, emits a codeword, its symbol) [states, 2] and each code's root.

    States are numbered by the key (code << 20) | (1 << prefix length) | prefix bits, the dead state last.
    """
    code, symbol = np.nonzero(lengths)
    length = lengths[code, symbol]
    bits = canonical_codes(lengths)[code, symbol].astype(np.int64)
    prefixes = [(code[length > j] << 20) | (1 << j) | (bits[length > j] >> (length[length > j] - j))
                for j in range(int(length.max(initial=0)))]
    states = np.unique(np.concatenate(prefixes)) if prefixes else np.zeros(0, dtype=np.int64)
    words = (code << 20) | (np.int64(1) << length) | bits
    order = np.argsort(words)
    words, word_symbol = words[order], symbol[order]
    dead = states.size
    root_key = (np.arange(lengths.shape[0]) << 20) | 1
    root = np.minimum(np.searchsorted(states, root_key), max(dead - 1, 0))
    root = np.where(states[root] == root_key, root, dead) if dead else np.zeros_like(root)   # no symbols: dead
    child = (states[:, None] << 1) - ((states[:, None] >> 20) << 20) + np.arange(2)   # append a bit
    w = np.minimum(np.searchsorted(words, child), max(words.size - 1, 0))
    s = np.minimum(np.searchsorted(states, child), max(dead - 1, 0))
    emits = words[w] == child if words.size else np.zeros(child.shape, dtype=bool)
    inner = states[s] == child if dead else np.zeros(child.shape, dtype=bool)
    next1 = np.where(emits, root[states[:, None] >> 20] if dead else 0, np.where(inner, s, dead))
    pad = np.full((1, 2), dead)
    return (np.concatenate([next1, pad]), np.concatenate([emits, pad < 0]),
            np.concatenate([word_symbol[w] if words.size else np.zeros_like(w), pad]), root)


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

"""Canonical, length-limited Huffman codes: optimality, limits, prefix property, decoding tables."""
from __future__ import annotations

import heapq

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bitsmith.formats import huffman

counts_strategy = st.lists(st.integers(0, 10**6), min_size=1, max_size=256).map(np.array)


def huffman_cost(counts: np.ndarray) -> int:
    """Total code length of an unlimited Huffman code (sum of merged weights)."""
    heap = [int(c) for c in counts if c > 0]
    if len(heap) == 1:
        return heap[0]
    heapq.heapify(heap)
    cost = 0
    while len(heap) > 1:
        a, b = heapq.heappop(heap), heapq.heappop(heap)
        cost += a + b
        heapq.heappush(heap, a + b)
    return cost


@settings(max_examples=60, deadline=None)
@given(counts_strategy)
def test_lengths_are_optimal_when_the_limit_does_not_bind(counts):
    lengths = huffman.code_lengths(counts, 32)
    assert int((lengths.astype(np.int64) * counts).sum()) == huffman_cost(counts)
    assert ((lengths > 0) == (counts > 0)).all()


@settings(max_examples=60, deadline=None)
@given(counts_strategy, st.integers(8, 16))
def test_lengths_respect_the_limit_and_form_a_complete_prefix_code(counts, limit):
    lengths = huffman.code_lengths(counts, limit)
    used = lengths[lengths > 0].astype(np.int64)
    assert used.max(initial=0) <= limit
    huffman.check_lengths(lengths, limit)
    if used.size >= 2:
        assert (2.0 ** -used).sum() == 1.0          # complete: the 1-fill of a window never decodes
    assert int((lengths.astype(np.int64) * counts).sum()) >= huffman_cost(counts)


def test_limit_binds_on_a_skewed_alphabet():
    counts = np.array([2**k for k in range(30)])    # unlimited Huffman would need 29-bit codes
    lengths = huffman.code_lengths(counts, 16)
    assert lengths.max() == 16
    huffman.check_lengths(lengths, 16)


@settings(max_examples=40, deadline=None)
@given(counts_strategy)
def test_canonical_codes_are_prefix_free_and_decode_through_every_table(counts):
    lengths = huffman.code_lengths(counts, 16)
    codes = huffman.canonical_codes(lengths)
    used = np.flatnonzero(lengths)
    words = sorted(format(int(codes[s]), f"0{lengths[s]}b") for s in used)
    assert all(not b.startswith(a) for a, b in zip(words, words[1:]))
    symbol, length = huffman.lookup_table(lengths, 16)
    limit, first, offset, ordered = huffman.canonical_limits(lengths, 16)
    for s in used:
        v = int(codes[s]) << (16 - int(lengths[s]))
        assert (symbol[v], length[v]) == (s, lengths[s])
        l = 1 + int((v >= limit[1:]).sum())
        assert l == lengths[s] and ordered[offset[l] + (v >> (16 - l)) - first[l]] == s


@settings(max_examples=20, deadline=None)
@given(counts_strategy)
def test_multi_symbol_table_matches_one_codeword_at_a_time(counts):
    lengths = huffman.code_lengths(counts, 16)
    width = 12
    symbols, count, used, ends = huffman.multi_symbol_table(lengths, width)
    symbol1, length1 = huffman.lookup_table(lengths, width)
    for v in np.random.default_rng(0).integers(0, 1 << width, 200):
        at, expected = 0, []
        while True:
            rest = (int(v) << at) & ((1 << width) - 1)
            n = int(length1[rest])
            if n == 0 or at + n > width or len(expected) == 8:
                break
            expected.append(int(symbol1[rest]))
            at += n
        assert count[v] == len(expected) and used[v] == at
        assert [(int(symbols[v]) >> 8 * j) & 0xFF for j in range(count[v])] == expected
        assert ends[v, count[v] - 1] == at if count[v] else True


def test_one_symbol_gets_one_bit_and_no_symbol_none():
    assert huffman.code_lengths(np.array([0, 5, 0]), 16).tolist() == [0, 1, 0]
    assert huffman.code_lengths(np.zeros(4, dtype=int), 16).tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize("lengths, message", [([1, 1, 1], "Kraft"), ([17, 1], "exceeds")])
def test_check_lengths_rejects_impossible_codes(lengths, message):
    with pytest.raises(ValueError, match=message):
        huffman.check_lengths(np.array(lengths), 16)

"""Canonical, length-limited Huffman codes: optimality, limits, prefix property, decoding tables."""
from __future__ import annotations

import heapq
import itertools

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
    assert all(not b.startswith(a) for a, b in itertools.pairwise(words))
    symbol, length = huffman.lookup_table(lengths, 16)
    limit, first, offset, ordered = huffman.canonical_limits(lengths, 16)
    for s in used:
        v = int(codes[s]) << (16 - int(lengths[s]))
        assert (symbol[v], length[v]) == (s, lengths[s])
        l = 1 + int((v >= limit[1:]).sum())
        assert l == lengths[s] and ordered[offset[l] + (v >> (16 - l)) - first[l]] == s


def one_codeword_at_a_time(lengths, bits):
    """Reference decoding of a bit string by the single-symbol table: (symbols, bit after each, rest)."""
    symbol, length = huffman.lookup_table(lengths, 16)
    symbols, ends, at = [], [], 0
    while True:
        v = int((bits[at: at + 16] + "0" * 16)[:16], 2)
        n = int(length[v])
        if n == 0 or at + n > len(bits) or bits[at: at + n] != format(v >> (16 - n), f"0{n}b"):
            return symbols, ends, bits[at:]
        symbols.append(int(symbol[v]))
        at += n
        ends.append(at)


skewed_counts = st.integers(17, 40).map(lambda n: np.array([2**i for i in range(n)]))   # lengths up to 16
byte_strings = st.lists(st.integers(0, 255), min_size=1, max_size=40)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.one_of(counts_strategy, skewed_counts), min_size=1, max_size=3), byte_strings, st.data())
def test_byte_decoder_matches_one_codeword_at_a_time(many_counts, data, draw):
    lengths = np.zeros((len(many_counts), 256), dtype=np.uint8)
    for row, counts in zip(lengths, many_counts):
        row[:] = huffman.code_lengths(np.pad(counts, (0, 256 - counts.size)), 16)
    decoder = huffman.ByteDecoder.build(lengths)
    code = draw.draw(st.integers(0, len(many_counts) - 1))
    bits = "".join(format(b, "08b") for b in data)
    expected, ends, rest = one_codeword_at_a_time(lengths[code], bits)
    state, got, got_ends = decoder.root[code], [], []
    for j, b in enumerate(data):
        n = int(decoder.count[state, b])
        assert n <= 8
        got += [(int(decoder.symbols[state, b]) >> 8 * i) & 0xFF for i in range(n)]
        got_ends += [8 * j + i + 1 for i in range(8) if decoder.ends[state, b] >> (7 - i) & 1]
        state = decoder.next[state, b]
    assert got == expected and got_ends == ends
    dead = decoder.next.shape[0] - 1
    if len(rest) >= 16 or (rest and not any(
            format(int(c), f"0{l}b").startswith(rest) for c, l in
            zip(huffman.canonical_codes(lengths[code]), lengths[code]) if l > len(rest))):
        assert state == dead                             # no codeword starts with the rest
    else:
        assert state != dead


def test_byte_decoder_of_a_one_symbol_code_rejects_a_one_bit():
    decoder = huffman.ByteDecoder.build(np.array([[0, 1] + [0] * 254]))
    root = decoder.root[0]
    assert decoder.count[root, 0b00000000] == 8 and decoder.symbols[root, 0] == 0x0101010101010101
    assert decoder.count[root, 0b00111111] == 2 and decoder.next[root, 0b00111111] == decoder.next.shape[0] - 1


def test_one_symbol_gets_one_bit_and_no_symbol_none():
    assert huffman.code_lengths(np.array([0, 5, 0]), 16).tolist() == [0, 1, 0]
    assert huffman.code_lengths(np.zeros(4, dtype=int), 16).tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize("lengths, message", [([1, 1, 1], "Kraft"), ([17, 1], "exceeds")])
def test_check_lengths_rejects_impossible_codes(lengths, message):
    with pytest.raises(ValueError, match=message):
        huffman.check_lengths(np.array(lengths), 16)

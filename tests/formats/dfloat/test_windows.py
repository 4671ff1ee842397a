"""The window layout: windows start on codeword boundaries, fills cost under 16 bits, segments join."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from bf16_cases import bf16, bit_patterns, one_bit_code_weights, same_bits, weights_like
from hypothesis import given, settings
from hypothesis import strategies as st

from bitsmith.formats import dfloat, huffman
from bitsmith.formats.dfloat import codec, windows


def test_windows_start_on_codeword_boundaries_and_fill_costs_under_16_bits_each():
    x = weights_like(20000)
    window_bits = 64
    coded = dfloat.encode(x, window_bits)
    exponent, _ = dfloat.split(x)
    lengths = coded.lengths()
    code_bits = int(lengths[exponent].astype(np.int64).sum())
    count = -(-coded.stream_bits // window_bits)
    assert code_bits <= coded.stream_bits < code_bits + 16 * count
    # every window decodes on its own: cut the stream at a window boundary and decode the tail alone
    cut = (count // 2) * window_bits
    tail = dataclasses.replace(coded, stream=coded.stream[cut // 8:], stream_bits=coded.stream_bits - cut)
    head = dataclasses.replace(coded, stream=coded.stream[: cut // 8], stream_bits=cut)
    symbols = _decode_loose(head) + _decode_loose(tail)
    assert symbols == exponent.tolist()


def _decode_loose(coded):
    """Decode a stream slice without a value count: one codeword at a time, window by window."""
    symbol, length = huffman.lookup_table(coded.lengths(), dfloat.MAX_CODE_LENGTH)
    bits = np.unpackbits(coded.stream.view("<u4").astype(">u4").view(np.uint8))
    out = []
    for begin in range(0, coded.stream_bits, coded.window_bits):
        stop, pos = min(begin + coded.window_bits, coded.stream_bits), begin
        while True:
            peek = bits[pos: pos + 16]
            v = int("".join(map(str, peek)).ljust(16, "1"), 2)
            n = int(length[v])
            if n == 0 or pos + n > stop:
                break
            out.append(int(symbol[v]))
            pos += n
    return out


@settings(max_examples=30, deadline=None)
@given(st.integers(17, 21), st.integers(0, 2**32 - 1), st.sampled_from([32, 64, 96, 160, 2048]))
def test_byte_decoder_matches_one_codeword_at_a_time_with_16_bit_codes_and_fills(symbols, seed, window_bits):
    """Fibonacci counts push the code to its 16-bit limit; short windows end in fills of every length."""
    fibonacci = [1, 1]
    while len(fibonacci) < symbols:
        fibonacci.append(fibonacci[-1] + fibonacci[-2])
    rng = np.random.default_rng(seed)
    exponent = rng.permutation(np.repeat(np.arange(symbols) + 1 + rng.integers(0, 255 - symbols), fibonacci))
    bits = (exponent.astype(np.uint16) << 7) | rng.integers(0, 1 << 16, exponent.size).astype(np.uint16) & 0x807F
    coded = dfloat.encode(bf16(bits), window_bits)
    assert coded.code_lengths.max() == dfloat.MAX_CODE_LENGTH
    exponent, _ = dfloat.split(dfloat.decode(coded, check=False))
    assert (exponent == _decode_loose(coded)).all()
    assert same_bits(dfloat.decode(coded), bf16(bits))


@settings(max_examples=80, deadline=None)
@given(bit_patterns(), st.integers(1, 40), st.sampled_from([32, 64]))
def test_encoder_segments_join_exactly(bits, segment, window_bits):
    """The encoder works in segments of codeword pairs; windows continue across segment boundaries."""
    x = bf16(bits)
    whole = dfloat.encode(x, window_bits)
    saved, windows.SEGMENT = windows.SEGMENT, segment        # not monkeypatch: hypothesis reruns the body
    try:
        coded = dfloat.encode(x, window_bits)
    finally:
        windows.SEGMENT = saved
    assert np.array_equal(coded.stream, whole.stream) and coded.stream_bits == whole.stream_bits
    assert same_bits(dfloat.decode(coded), x)


def _encode_loose(exponent: np.ndarray, lengths: np.ndarray, window_bits: int) -> tuple[np.ndarray, int]:
    """The layout written out one codeword at a time as a string of bits: the definition the encoder meets."""
    codes = huffman.canonical_codes(lengths)
    bits = ""
    for e in exponent.tolist():
        word = format(int(codes[e]), f"0{int(lengths[e])}b")
        room = window_bits - len(bits) % window_bits
        if len(word) > room:
            bits += "1" * room                               # the codeword opens the next window
        bits += word
    n = len(bits)
    bits += "1" * (-n % 32)
    return np.array([int(bits[i: i + 32], 2) for i in range(0, len(bits), 32)], dtype="<u4").view(np.uint8), n


@settings(max_examples=80, deadline=None)
@given(bit_patterns(300), st.sampled_from([32, 64, 96, 160]), st.booleans())
def test_stream_is_the_layout_written_one_codeword_at_a_time(bits, window_bits, table):
    """Pairs of codewords (from a table of all pairs or not), fills in front of a pair or between its two
    codewords, an odd last codeword."""
    x = bf16(bits)
    saved, windows.TABLE_PAIRS = windows.TABLE_PAIRS, 0 if table else 1 << 40
    try:
        coded = dfloat.encode(x, window_bits)
    finally:
        windows.TABLE_PAIRS = saved
    stream, stream_bits = _encode_loose(dfloat.split(x)[0], coded.lengths(), window_bits)
    assert coded.stream_bits == stream_bits and np.array_equal(coded.stream, stream)


@pytest.mark.parametrize("threads", [1, 2])
def test_segments_added_on_a_helper_thread_give_the_same_stream(monkeypatch, threads):
    """Many small segments, found on this thread and added on the helper thread, in order."""
    x = torch.cat([weights_like(40_001, 1), one_bit_code_weights(30_000, 2), weights_like(9_999, 3, scale=5.0)])
    whole = dfloat.encode(x, 96, threads=1)
    monkeypatch.setattr(codec, "PARALLEL_VALUES", 0)
    monkeypatch.setattr(windows, "SEGMENT", 1000)
    coded = dfloat.encode(x, 96, threads=threads)
    assert np.array_equal(coded.stream, whole.stream) and coded.stream_bits == whole.stream_bits
    assert coded.sha256 == whole.sha256 and same_bits(dfloat.decode(coded), x)

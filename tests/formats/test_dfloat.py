"""The lossless BF16 codec: exact round trips on any bit pattern, the window layout, corruption is caught."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from bitsmith.formats import dfloat, huffman
from bitsmith.formats.errors import InputError

SPECIAL = [0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC0, 0xFFC1, 0x7F81, 0x0001, 0x807F, 0x3F80, 0x7F7F]  # +-0, +-inf,
# NaNs with payloads, subnormals, 1.0, the largest finite value


def bf16(bits) -> torch.Tensor:
    return torch.from_numpy(np.asarray(bits, dtype=np.uint16).view(np.int16)).view(torch.bfloat16)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.view(torch.int16), b.view(torch.int16))


def weights_like(n: int, seed: int = 0, scale: float = 0.02) -> torch.Tensor:
    return (torch.randn(n, generator=torch.Generator().manual_seed(seed)) * scale).to(torch.bfloat16)


bit_patterns = st.one_of(
    st.lists(st.integers(0, 0xFFFF), max_size=700),                             # anything at all
    st.lists(st.sampled_from(SPECIAL), max_size=300),                           # only special values
    st.builds(lambda n, v: [v] * n, st.integers(1, 500), st.integers(0, 0xFFFF)),   # one distinct value
    st.builds(lambda n, seed: weights_like(n, seed).view(torch.int16).numpy().view(np.uint16).tolist(),
              st.integers(0, 3000), st.integers(0, 99)),                        # weight-like, odd sizes
)


@settings(max_examples=150, deadline=None)
@given(bit_patterns, st.sampled_from([32, 64, 96, 2048]))
def test_round_trip_is_bit_exact(bits, window_bits):
    x = bf16(bits)
    coded = dfloat.encode(x, window_bits)
    assert same_bits(dfloat.decode(coded), x)


@settings(max_examples=40, deadline=None)
@given(st.lists(bit_patterns, min_size=1, max_size=5), st.lists(st.sampled_from([32, 64, 96, 2048]), min_size=5,
                                                               max_size=5), st.integers(1, 3))
def test_batched_decode_equals_one_by_one(many, window_bits, threads):
    """Window sizes mixed in one call, on one thread or several."""
    xs = [bf16(b) for b in many]
    coded = [dfloat.encode(x, w) for x, w in zip(xs, window_bits)]
    assert all(same_bits(y, x) for y, x in zip(dfloat.decode_many(coded, threads=threads), xs))


def one_bit_code_weights(n: int, seed: int) -> torch.Tensor:
    """Most values share one exponent (a 1-bit codeword), so a byte can end up to eight codewords."""
    rng = np.random.default_rng(seed)
    exponent = np.where(rng.random(n) < 0.9, 120, rng.integers(100, 127, n)).astype(np.uint16)
    return bf16((exponent << 7) | (rng.integers(0, 1 << 16, n).astype(np.uint16) & 0x807F))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_many_blocks_and_escapes_on_threads(monkeypatch, threads):
    """Small blocks, so that windows go in many blocks, tensors across blocks and blocks across tensors,
    merged while the next blocks decode; 1-bit codes make steps emit more than four symbols."""
    monkeypatch.setattr(dfloat, "BLOCK_WINDOWS", 7)
    monkeypatch.setattr(dfloat, "CHUNK_ROWS", 3)
    xs = [weights_like(3000, 1), one_bit_code_weights(5000, 2), weights_like(1, 3), one_bit_code_weights(700, 4),
          weights_like(0, 5), weights_like(9000, 6, scale=3.0)]
    coded = [dfloat.encode(x, w) for x, w in zip(xs, [64, 96, 32, 2048, 64, 160])]
    assert all(same_bits(y, x) for y, x in zip(dfloat.decode_many(coded, threads=threads), xs))


def test_task_errors_reach_the_caller():
    for helpers in (0, 2):
        with dfloat._Tasks(helpers) as tasks:
            ok, failed = tasks.submit(int, "7"), tasks.submit(int, "x")
            tasks.wait([ok])
            with pytest.raises(ValueError, match="invalid literal"):
                tasks.wait([failed])
        assert ok.result() == 7


def test_codes_with_too_many_states_for_one_table_decode_in_parts(monkeypatch):
    monkeypatch.setattr(dfloat._Tables, "MAX_STATES", 40)
    xs = [weights_like(2000, seed, scale=0.02 * (seed + 1)) for seed in range(4)]
    coded = [dfloat.encode(x, 64) for x in xs]
    assert all(same_bits(y, x) for y, x in zip(dfloat.decode_many(coded, threads=2), xs))


@pytest.mark.parametrize("shape", [(0,), (1,), (3, 0, 2), (1, 1), (17, 33), (2, 3, 5)])
def test_shapes_survive(shape):
    x = torch.randn(shape).to(torch.bfloat16)
    assert same_bits(dfloat.decode(dfloat.encode(x, 32)), x)


def test_windows_start_on_codeword_boundaries_and_fill_costs_under_16_bits_each():
    x = weights_like(20000)
    window_bits = 64
    coded = dfloat.encode(x, window_bits)
    exponent, _ = dfloat.split(x)
    lengths = coded.lengths()
    code_bits = int(lengths[exponent].astype(np.int64).sum())
    windows = -(-coded.stream_bits // window_bits)
    assert code_bits <= coded.stream_bits < code_bits + 16 * windows
    # every window decodes on its own: cut the stream at a window boundary and decode the tail alone
    cut = (windows // 2) * window_bits
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


def test_size_is_near_the_exponent_entropy_on_weight_like_data():
    x = weights_like(200_000)
    coded = dfloat.encode(x)
    exponent, _ = dfloat.split(x)
    p = np.bincount(exponent, minlength=256) / exponent.size
    entropy = -(p[p > 0] * np.log2(p[p > 0])).sum()
    bits_per_value = 8 * coded.nbytes / x.numel()
    assert 8 + entropy <= bits_per_value < 8 + entropy + 0.08


def test_only_bfloat16_is_coded():
    with pytest.raises(ValueError, match="bfloat16"):
        dfloat.encode(torch.zeros(4, dtype=torch.float16))
    with pytest.raises(ValueError, match="multiple of 32"):
        dfloat.encode(torch.zeros(4, dtype=torch.bfloat16), window_bits=48)


# ---- corruption: a clear error, never a wrong tensor --------------------------------------------------

@pytest.fixture
def coded():
    return dfloat.encode(weights_like(5000, seed=1), 64)


def test_flipped_stream_bits_are_caught_or_harmless(coded):
    rng = np.random.default_rng(0)
    source, caught = dfloat.decode(coded), 0
    for _ in range(40):
        stream = coded.stream.copy()
        stream[rng.integers(stream.size)] ^= np.uint8(1 << int(rng.integers(8)))
        try:
            assert same_bits(dfloat.decode(dataclasses.replace(coded, stream=stream)), source)  # a fill bit
        except InputError as e:
            assert "corrupted" in str(e) or "sha256" in str(e)
            caught += 1
    assert caught >= 30


def test_flipped_sign_mantissa_is_caught_by_the_checksum(coded):
    sign_mantissa = coded.sign_mantissa.copy()
    sign_mantissa[7] ^= 0x40
    with pytest.raises(InputError, match="sha256"):
        dfloat.decode(dataclasses.replace(coded, sign_mantissa=sign_mantissa))


def test_broken_code_table_is_caught(coded):
    lengths = coded.code_lengths.copy()
    lengths[:] = 1                                           # Kraft sum > 1: not a prefix code
    with pytest.raises(InputError, match="code table"):
        dfloat.decode(dataclasses.replace(coded, code_lengths=lengths))
    lengths = coded.code_lengths.copy()
    lengths[np.argmax(lengths)] += 1                          # still a prefix code, but a different one
    with pytest.raises(InputError, match="corrupted|sha256"):
        dfloat.decode(dataclasses.replace(coded, code_lengths=lengths))


def test_truncated_parts_and_bad_metadata_are_caught(coded):
    meta = dfloat.to_metadata(coded)
    parts = dfloat.to_parts("w", coded)
    assert dfloat.is_part("w" + dfloat.PART) and dfloat.tensor_names(parts) == ["w"]
    assert same_bits(dfloat.decode(dfloat.from_parts("w", meta, parts.__getitem__)), dfloat.decode(coded))
    short = {k: v[:-1] for k, v in parts.items()}
    with pytest.raises(InputError, match="expected"):
        dfloat.from_parts("w", meta, short.__getitem__)
    with pytest.raises(InputError, match="metadata"):
        dfloat.from_parts("w", {k: v for k, v in meta.items() if k != "stream_bits"}, parts.__getitem__)
    with pytest.raises(InputError, match="corrupted"):
        dfloat.decode(dataclasses.replace(coded, stream_bits=coded.stream_bits - 40))


def test_describe_row_counts_every_byte(coded):
    row = dfloat.describe("w", dfloat.to_metadata(coded))
    assert row["coded_bytes"] == coded.nbytes and row["original_bytes"] == 2 * coded.numel
    assert row["bits_per_value"] == pytest.approx(8 * coded.nbytes / coded.numel)


# ---- real weights -------------------------------------------------------------------------------------

def test_stories260k_weights_round_trip_below_70_percent(stories_path):
    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(str(stories_path / "model.safetensors")).items()
               if v.dim() == 2}
    coded = [dfloat.encode(x) for x in tensors.values()]
    assert all(same_bits(y, x) for y, x in zip(dfloat.decode_many(coded), tensors.values()))
    ratio = sum(c.nbytes for c in coded) / sum(2 * x.numel() for x in tensors.values())
    assert ratio < 0.70


@settings(max_examples=80, deadline=None)
@given(bit_patterns, st.integers(1, 40), st.sampled_from([32, 64]))
def test_encoder_segments_join_exactly(bits, segment, window_bits):
    """The encoder works in segments of codewords; windows continue across segment boundaries."""
    x = bf16(bits)
    whole = dfloat.encode(x, window_bits)
    saved, dfloat.SEGMENT = dfloat.SEGMENT, segment
    try:
        coded = dfloat.encode(x, window_bits)
    finally:
        dfloat.SEGMENT = saved
    assert np.array_equal(coded.stream, whole.stream) and coded.stream_bits == whole.stream_bits
    assert same_bits(dfloat.decode(coded), x)

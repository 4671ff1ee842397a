"""The lossless BF16 codec: exact round trips on any bit pattern, size near the entropy, corruption is caught."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from bf16_cases import bf16, bit_patterns, same_bits, weights_like
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from bitsmith.formats import dfloat
from bitsmith.formats.errors import InputError


@settings(max_examples=150, deadline=None)
@given(bit_patterns(), st.sampled_from([32, 64, 96, 2048]))
def test_round_trip_is_bit_exact(bits, window_bits):
    x = bf16(bits)
    coded = dfloat.encode(x, window_bits)
    assert same_bits(dfloat.decode(coded), x)


@pytest.mark.parametrize("shape", [(0,), (1,), (3, 0, 2), (1, 1), (17, 33), (2, 3, 5)])
def test_shapes_survive(shape):
    x = torch.randn(shape).to(torch.bfloat16)
    assert same_bits(dfloat.decode(dfloat.encode(x, 32)), x)


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


def test_stories260k_weights_round_trip_below_70_percent(stories_path):
    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(str(stories_path / "model.safetensors")).items()
               if v.dim() == 2}
    coded = [dfloat.encode(x) for x in tensors.values()]
    assert all(same_bits(y, x) for y, x in zip(dfloat.decode_many(coded), tensors.values()))
    ratio = sum(c.nbytes for c in coded) / sum(2 * x.numel() for x in tensors.values())
    assert ratio < 0.70

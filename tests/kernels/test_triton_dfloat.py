"""The Triton decoder of lossless BF16 tensors: bit-exact against the source, on CPU through the Triton
interpreter with small tensors (conftest sets TRITON_INTERPRET=1), on a GPU when there is one."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from bf16_cases import bf16, bit_patterns, same_bits
from hypothesis import given, settings
from hypothesis import strategies as st

from bitsmith.formats import dfloat
from bitsmith.formats.errors import InputError
from bitsmith.kernels import triton_dfloat

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@settings(max_examples=12, deadline=None)
@given(bit_patterns(max_size=120), st.sampled_from([32, 64]))
def test_triton_decode_is_bit_exact(bits, window_bits):
    x = bf16(bits)
    assert same_bits(triton_dfloat.decode(dfloat.encode(x, window_bits), DEVICE), x)


def test_every_output_element_is_written(poisoned_outputs):
    x = (torch.randn(3, 97) * 0.05).to(torch.bfloat16)      # several programs of lanes, odd length
    assert same_bits(triton_dfloat.decode(dfloat.encode(x, 32), DEVICE), x)


def test_empty_tensor():
    x = torch.zeros(0, 4, dtype=torch.bfloat16)
    assert same_bits(triton_dfloat.decode(dfloat.encode(x, 32), DEVICE), x)


def test_corrupted_stream_or_table_is_an_error():
    coded = dfloat.encode((torch.randn(300) * 0.02).to(torch.bfloat16), 64)
    with pytest.raises(InputError, match="corrupted"):
        triton_dfloat.decode(dataclasses.replace(coded, stream_bits=coded.stream_bits - 64), DEVICE)
    lengths = coded.code_lengths.copy()
    lengths[:] = 1
    with pytest.raises(InputError, match="code table"):
        triton_dfloat.decode(dataclasses.replace(coded, code_lengths=lengths), DEVICE)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the interpreter runs small shapes)")
def test_gpu_decode_of_a_layer_sized_tensor():
    x = (torch.randn(1024, 4096) * 0.02).to(torch.bfloat16)
    coded = dfloat.encode(x)
    assert same_bits(triton_dfloat.decode(coded, "cuda"), x)
    assert same_bits(dfloat.decode(coded), x)

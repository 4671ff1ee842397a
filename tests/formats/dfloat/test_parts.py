"""Coded tensors as checkpoint parts: metadata round trip, truncation caught, inspect rows."""
from __future__ import annotations

import dataclasses

import pytest
from bf16_cases import same_bits, weights_like

from bitsmith.formats import dfloat
from bitsmith.formats.errors import InputError


@pytest.fixture
def coded():
    return dfloat.encode(weights_like(5000, seed=1), 64)


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

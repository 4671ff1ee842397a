"""The CPU decoder: batches of tensors, many blocks on several threads, escapes, codes in parts."""
from __future__ import annotations

import pytest
from bf16_cases import bf16, bit_patterns, one_bit_code_weights, same_bits, weights_like
from hypothesis import given, settings
from hypothesis import strategies as st

from bitsmith.formats import dfloat
from bitsmith.formats.dfloat import cpu_decoder
from bitsmith.formats.dfloat.tasks import Tasks


@settings(max_examples=40, deadline=None)
@given(st.lists(bit_patterns(), min_size=1, max_size=5),
       st.lists(st.sampled_from([32, 64, 96, 2048]), min_size=5, max_size=5), st.integers(1, 3))
def test_batched_decode_equals_one_by_one(many, window_bits, threads):
    """Window sizes mixed in one call, on one thread or several."""
    xs = [bf16(b) for b in many]
    coded = [dfloat.encode(x, w) for x, w in zip(xs, window_bits)]
    assert all(same_bits(y, x) for y, x in zip(dfloat.decode_many(coded, threads=threads), xs))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_many_blocks_and_escapes_on_threads(monkeypatch, threads):
    """Small blocks, so that windows go in many blocks, tensors across blocks and blocks across tensors,
    merged while the next blocks decode; 1-bit codes make steps emit more than four symbols."""
    monkeypatch.setattr(cpu_decoder, "BLOCK_WINDOWS", 7)
    monkeypatch.setattr(cpu_decoder, "CHUNK_ROWS", 3)
    xs = [weights_like(3000, 1), one_bit_code_weights(5000, 2), weights_like(1, 3), one_bit_code_weights(700, 4),
          weights_like(0, 5), weights_like(9000, 6, scale=3.0)]
    coded = [dfloat.encode(x, w) for x, w in zip(xs, [64, 96, 32, 2048, 64, 160])]
    assert all(same_bits(y, x) for y, x in zip(dfloat.decode_many(coded, threads=threads), xs))


def test_codes_with_too_many_states_for_one_table_decode_in_parts(monkeypatch):
    monkeypatch.setattr(cpu_decoder._Tables, "MAX_STATES", 40)
    xs = [weights_like(2000, seed, scale=0.02 * (seed + 1)) for seed in range(4)]
    coded = [dfloat.encode(x, 64) for x in xs]
    assert all(same_bits(y, x) for y, x in zip(dfloat.decode_many(coded, threads=2), xs))


def test_task_errors_reach_the_caller():
    for helpers in (0, 2):
        with Tasks(helpers) as tasks:
            ok, failed = tasks.submit(int, "7"), tasks.submit(int, "x")
            tasks.wait([ok])
            with pytest.raises(ValueError, match="invalid literal"):
                tasks.wait([failed])
        assert ok.result() == 7

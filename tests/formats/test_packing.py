import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitsmith.formats.packing import PACKED_BITS, pack, packed_length, unpack


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from(PACKED_BITS), n=st.integers(1, 100), m=st.integers(1, 5), dim=st.integers(0, 1),
       seed=st.integers(0, 2**31))
def test_round_trip(bits, n, m, dim, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 1 << bits, (n, m) if dim == 0 else (m, n), generator=g)
    packed = pack(q, bits, dim=dim)
    assert packed.dtype == torch.int32
    assert packed.shape[dim] == packed_length(n, bits)
    assert torch.equal(unpack(packed, bits, n, dim=dim).long(), q)


def test_four_bit_nibbles_low_first():
    q = torch.arange(8).repeat(4)[:, None]                  # 32 codes: 0..7, 0..7, ...
    words = pack(q, 4)[:, 0]
    assert words[0].item() == 0x76543210
    assert words.shape == (4,)


def test_three_bit_codes_straddle_words():
    q = torch.zeros(32, 1, dtype=torch.long)
    q[10] = 0b111                                          # bits 30..32: two in word 0, one in word 1
    words = pack(q, 3)[:, 0].long() & 0xFFFFFFFF
    assert words.tolist() == [0b11 << 30, 0b1, 0]


def test_all_ones_survive_sign_bit():
    q = torch.full((32, 2), 15)
    assert (pack(q, 4) == -1).all()                        # 0xFFFFFFFF as int32
    assert (unpack(pack(q, 4), 4, 32) == 15).all()


@pytest.mark.parametrize("bad", [-1, 16])
def test_out_of_range_codes_rejected(bad):
    with pytest.raises(ValueError, match="out of range"):
        pack(torch.tensor([[bad]]), 4)


def test_five_six_and_seven_bit_codes_straddle_words():
    q = torch.zeros(32, 1, dtype=torch.long)
    q[6] = 0b11111                                         # 5 bits: stream bits 30..34, two in word 0, three in word 1
    assert (pack(q, 5)[:, 0].long() & 0xFFFFFFFF).tolist() == [0b11 << 30, 0b111, 0, 0, 0]
    q[6], q[5] = 0, 0b111111                               # 6 bits: stream bits 30..35, two in word 0, four in word 1
    assert (pack(q, 6)[:, 0].long() & 0xFFFFFFFF).tolist() == [0b11 << 30, 0b1111, 0, 0, 0, 0]
    q[5], q[4] = 0, 0b1111111                              # 7 bits: stream bits 28..34, four in word 0, three in word 1
    assert (pack(q, 7)[:, 0].long() & 0xFFFFFFFF).tolist() == [0b1111 << 28, 0b111, 0, 0, 0, 0, 0]


@pytest.mark.parametrize("bits", [1, 9, 16])
def test_unsupported_width_rejected(bits):
    with pytest.raises(ValueError, match=f"unsupported bit width {bits}"):
        pack(torch.zeros(32, 1, dtype=torch.long), bits)


def test_packing_stays_on_the_device_of_its_input():
    """pack and unpack allocate where their input lives (a CUDA tensor must not come back on the CPU)."""
    words = torch.zeros(6, 5, dtype=torch.int32, device="meta")
    assert unpack(words, 3, 64, dim=0).device.type == "meta"
    if torch.cuda.is_available():                 # pack reads its codes' range first: it needs real values
        codes = torch.randint(0, 8, (64, 5), dtype=torch.uint8, device="cuda")
        assert torch.equal(unpack(pack(codes, 3, dim=0), 3, 64, dim=0), codes)

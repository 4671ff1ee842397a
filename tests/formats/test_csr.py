import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitsmith.formats.csr import CSR, csr_bits, from_csr, index_dtype, to_csr


def stored_bits(csr: CSR) -> int:
    return sum(8 * t.numel() * t.element_size() for t in (csr.values, csr.cols, csr.row_ptr))


@settings(max_examples=80, deadline=None)
@given(out=st.integers(0, 12), inp=st.one_of(st.integers(1, 40), st.integers(32760, 32775)),
       density=st.sampled_from([0.0, 0.05, 0.3, 1.0]), seed=st.integers(0, 2**31))
def test_round_trip(out, inp, density, seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(out, inp, generator=g) < density
    if out > 1:
        mask[out // 2] = False                                  # always an empty row
    values = torch.randn(out, inp, generator=g).to(torch.float16)
    csr = to_csr(mask, values)
    nnz = int(mask.sum())
    assert csr.values.dtype == torch.float16 and csr.values.shape == (nnz,)
    assert csr.cols.dtype == index_dtype(inp) and csr.cols.shape == (nnz,)
    assert csr.row_ptr.dtype == torch.int32 and csr.row_ptr.shape == (out + 1,)
    assert csr.row_ptr[0] == 0 and csr.row_ptr[-1] == nnz and (csr.row_ptr.diff() >= 0).all()
    assert torch.equal(from_csr(csr), torch.where(mask, values, torch.zeros((), dtype=torch.float16)))
    rows, cols = csr.positions()
    assert torch.equal(torch.zeros_like(mask).index_put_((rows, cols), torch.tensor(True)), mask)
    assert csr_bits(out, inp, nnz) == stored_bits(csr)


def test_columns_ascend_within_rows():
    mask = torch.tensor([[0, 1, 0, 1], [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    csr = to_csr(mask, torch.arange(16.0).reshape(4, 4))
    assert csr.row_ptr.tolist() == [0, 2, 3, 3, 7]
    assert csr.cols.tolist() == [1, 3, 0, 0, 1, 2, 3]
    assert csr.values.tolist() == [1, 3, 4, 12, 13, 14, 15]


def test_index_dtype_boundary():
    assert index_dtype(1) == index_dtype(32767) == torch.int16
    assert index_dtype(32768) == index_dtype(1 << 20) == torch.int32


def test_csr_bits_counts_every_tensor():
    assert csr_bits(4, 100, 0) == 32 * 5
    assert csr_bits(4, 100, 10) == 10 * (16 + 16) + 32 * 5
    assert csr_bits(4, 40000, 10) == 10 * (16 + 32) + 32 * 5
    assert csr_bits(4096, 11008, 4096 * 110) == 4096 * 110 * 32 + 32 * 4097   # 1 % of a LLaMA-7B down_proj

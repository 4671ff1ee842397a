"""Triton CSR add (the sparse half of a dense-and-sparse linear) against the torch reference, interpreted on CPU."""
import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: Triton kernels cannot be tested")

from bitsmith.formats.csr import to_csr
from bitsmith.kernels import reference, triton_csr


def sparse(N, K, per_row, seed=0, empty_rows=()):
    """CSR of an [N, K] matrix with `per_row` random entries in each row (none in `empty_rows`), and it dense."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(N, K, dtype=torch.bool)
    mask.scatter_(1, torch.rand(N, K, generator=g).argsort(dim=1)[:, :per_row], True)
    mask[list(empty_rows)] = False
    values = torch.randn(N, K, generator=g)
    csr = to_csr(mask, values)
    return csr, torch.where(mask, values.half().float(), 0.0)


@pytest.mark.parametrize("M,N,K,per_row", [(1, 7, 40, 3), (5, 33, 96, 1), (70, 16, 64, 20), (3, 9, 50, 0)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_csr_add_matches_the_reference(M, N, K, per_row, dtype):
    csr, S = sparse(N, K, per_row, seed=M, empty_rows=(0,) if N > 1 else ())
    g = torch.Generator().manual_seed(N)
    x = torch.randn(M, K, generator=g).to(dtype)
    y = torch.randn(M, N, generator=g).to(dtype)
    expected = reference.csr_add(y, x, csr.values, csr.cols, csr.row_ptr)
    tol = 2e-3 if dtype == torch.float16 else 1e-5                  # one rounding of the result to fp16
    assert torch.allclose(expected.double(), y.double() + x.double() @ S.double().t(), rtol=tol, atol=tol)
    got = triton_csr.csr_add_(y.clone(), x, csr.values, csr.cols.to(torch.int32), csr.row_ptr)
    assert got.dtype == dtype and got.shape == (M, N)
    assert torch.allclose(got.double(), expected.double(), rtol=tol, atol=tol)


def test_csr_add_is_in_place_and_leaves_x():
    csr, _ = sparse(8, 32, 2)
    x, y = torch.randn(4, 32), torch.zeros(4, 8)
    x0 = x.clone()
    out = triton_csr.csr_add_(y, x, csr.values, csr.cols.to(torch.int32), csr.row_ptr)
    assert out is y and torch.equal(x, x0) and y.abs().sum() > 0

"""Scales refitted to GPTQ's codes (bitsmith/quantize/refit.py)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitsmith.calibration.hessian import Hessian
from bitsmith.quantize.gptq import gptq_quantize
from bitsmith.quantize.grid import fake_quantize, group_index
from bitsmith.quantize.refit import refit_scales


def hessian_of(X):
    h = Hessian(X.shape[1])
    h.add(X)
    return h.H


def row_error(W, Q, H):
    """(W - Q) H (W - Q)^T / 2 per row, GPTQ's loss units."""
    D = (W - Q).double()
    return ((D @ H.double()) * D).sum(1) / 2


def dequantized(codes, scales, zeros, g):
    return fake_quantize(codes, scales[g].t(), zeros[g].t())


@pytest.mark.parametrize("bits,group,act_order", [(3, 32, True), (2, 32, False), (4, -1, True), (3, 64, False)])
def test_refit_never_raises_a_rows_error_and_its_gain_is_the_drop(stories_down, bits, group, act_order):
    W, X = stories_down
    H = hessian_of(X)
    plain = gptq_quantize(W, H, bits, group, act_order=act_order, mse=True)
    g = plain.group_index().long()
    scales, gain = refit_scales(W, H, plain.codes, plain.scales, plain.zeros, g)
    before, after = row_error(W, plain.Q, H), row_error(W, dequantized(plain.codes, scales, plain.zeros, g), H)
    assert (after <= before * (1 + 1e-6) + 1e-9).all()
    assert after.sum() < before.sum()                                   # it does find something on a real layer
    torch.testing.assert_close(gain.double(), before - after, rtol=1e-3, atol=1e-6 * before.max().item())
    unchanged = gain == 0
    assert torch.equal(scales.t()[unchanged], plain.scales.t()[unchanged])


def test_gptq_with_refit_stores_what_it_reports(stories_down):
    W, X = stories_down
    H = hessian_of(X)
    plain = gptq_quantize(W, H, 3, 32, act_order=True, mse=True)
    refit = gptq_quantize(W, H, 3, 32, act_order=True, mse=True, refit=True)
    g = refit.group_index().long()
    assert torch.equal(refit.codes, plain.codes) and torch.equal(refit.zeros, plain.zeros)
    assert torch.equal(refit.Q, dequantized(refit.codes, refit.scales, refit.zeros, g))
    assert refit.loss < plain.loss
    drop = (row_error(W, plain.Q, H) - row_error(W, refit.Q, H)).sum().item()
    assert plain.loss - refit.loss == pytest.approx(drop, rel=1e-3)


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 6), groups=st.integers(1, 4), size=st.integers(2, 9), bits=st.sampled_from([2, 3, 4]),
       seed=st.integers(0, 2 ** 16))
def test_scales_of_an_exactly_representable_matrix_are_recovered(rows, groups, size, bits, seed):
    """W = s* (q - z) on the grid: from any other positive scales, the refit lands on s* (as fp16) and the error
    on 0; a group whose codes all sit on its zero point keeps its old scale."""
    gen = torch.Generator().manual_seed(seed)
    K = groups * size
    g = group_index(K, size).long()
    codes = torch.randint(0, 1 << bits, (rows, K), generator=gen, dtype=torch.uint8)
    zeros = torch.randint(0, 1 << bits, (groups, rows), generator=gen, dtype=torch.int32)
    codes[0, :size] = zeros[0, 0].to(torch.uint8)                     # row 0's first group: all on the zero point
    target = (torch.rand(groups, rows, generator=gen) + 0.5).half()
    W = dequantized(codes, target, zeros, g)
    X = torch.randn(4 * K, K, generator=gen)
    H = hessian_of(X)
    start = (torch.rand(groups, rows, generator=gen) + 0.5).half()
    scales, _ = refit_scales(W, H, codes, start, zeros, g)
    determined = torch.ones(groups, rows, dtype=torch.bool)
    determined[0, 0] = False
    assert torch.equal(scales[determined], target[determined]) or \
        row_error(W, dequantized(codes, scales, zeros, g), H).max() <= 1e-6 * row_error(W, 0 * W, H).max()
    assert scales[0, 0] == start[0, 0]

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitsmith.kernels.reference import fake_quantize
from bitsmith.quantize.grid import ERROR_NORM, fit_grid, quantize_codes
from bitsmith.quantize.rtn import rtn_quantize


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 5, 6, 8]), sym=st.booleans(), group=st.sampled_from([-1, 16, 32]),
       seed=st.integers(0, 2**31))
def test_rtn_error_within_half_step(bits, sym, group, seed):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(8, 64, generator=g)
    qw = rtn_quantize(W, bits, group, sym)
    gi = qw.group_index().long()
    step = qw.scales.float()[gi].t()
    assert int(qw.codes.max()) < 2**bits
    # min-max grids cover every weight, so rounding moves none by more than half a step; the fp16
    # rounding of the scale can shrink the grid's reach by up to maxq * 2^-11 steps at the clipped end. A row
    # whose zero point was raised to 1 may instead have clipped its top step (grid.py): one step at most.
    raised = (qw.zeros == 1)[gi].t() & (not sym)
    bound = torch.where(raised, 1.0, 0.5 + 2**bits * 2**-11) * step
    assert ((W - qw.Q).abs() <= bound + 1e-7).all()
    assert sym or int(qw.zeros.min()) >= 1


def test_grid_contains_zero_and_is_exact_in_fp16():
    x = torch.tensor([[0.5, 1.0, 2.0], [-3.0, -1.0, -0.5], [0.0, 0.0, 0.0]])
    scale, zero = fit_grid(x, 4, sym=False)
    assert scale.dtype == torch.float16 and (scale > 0).all()
    assert zero.tolist()[0] == 1 and zero.tolist()[1] == 15       # all-positive row (raised) / all-negative row
    _sscale, szero = fit_grid(x, 4, sym=True)
    assert (szero == 8).all()


def test_per_channel_sym_has_one_group():
    qw = rtn_quantize(torch.randn(4, 40), 4, -1, sym=True)
    assert qw.scales.shape == (1, 4) and (qw.zeros == 8).all()


def grid_error(x, scale, zero, bits):
    """sum over each row of |x - q(x)|^2.4 on the given grid."""
    Q = fake_quantize(quantize_codes(x, scale[:, None], zero[:, None], bits), scale[:, None], zero[:, None])
    return (Q - x).abs().pow(ERROR_NORM).sum(dim=1)


@settings(max_examples=30, deadline=None)
@given(bits=st.sampled_from([2, 3, 4]), sym=st.booleans(), seed=st.integers(0, 2**31))
def test_shrink_search_never_worse_than_min_max(bits, sym, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 128, generator=g) * torch.rand(16, 1, generator=g)
    plain = grid_error(x, *fit_grid(x, bits, sym), bits)
    searched = grid_error(x, *fit_grid(x, bits, sym, mse=True), bits)
    assert (searched <= plain).all()
    assert searched.sum() < plain.sum()                   # Gaussian rows: clipping the tails pays


def test_shrink_search_on_a_real_layer(stories_down):
    W, _ = stories_down
    plain, searched = rtn_quantize(W, 3, 32), rtn_quantize(W, 3, 32, mse=True)
    assert ((searched.Q - W) ** 2).sum() < ((plain.Q - W) ** 2).sum()

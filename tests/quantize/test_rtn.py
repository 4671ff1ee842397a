import torch
from hypothesis import given, settings, strategies as st

from bitsmith.quantize.rtn import fit_grid, rtn_quantize


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), sym=st.booleans(), group=st.sampled_from([-1, 16, 32]),
       seed=st.integers(0, 2**31))
def test_rtn_error_within_half_step(bits, sym, group, seed):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(8, 64, generator=g)
    qw = rtn_quantize(W, bits, group, sym)
    gi = qw.group_index().long()
    step = qw.scales.float()[gi].t()
    assert int(qw.codes.max()) < 2**bits
    # min-max grids cover every weight, so rounding moves none by more than half a step; the fp16
    # rounding of the scale can shrink the grid's reach by up to maxq * 2^-11 steps at the clipped end
    assert ((W - qw.Q).abs() <= step * (0.5 + 2**bits * 2**-11) + 1e-7).all()


def test_grid_contains_zero_and_is_exact_in_fp16():
    x = torch.tensor([[0.5, 1.0, 2.0], [-3.0, -1.0, -0.5], [0.0, 0.0, 0.0]])
    scale, zero = fit_grid(x, 4, sym=False)
    assert scale.dtype == torch.float16 and (scale > 0).all()
    assert zero.tolist()[0] == 0 and zero.tolist()[1] == 15       # all-positive row / all-negative row
    sscale, szero = fit_grid(x, 4, sym=True)
    assert (szero == 8).all()


def test_per_channel_sym_has_one_group():
    qw = rtn_quantize(torch.randn(4, 40), 4, -1, sym=True)
    assert qw.scales.shape == (1, 4) and (qw.zeros == 8).all()

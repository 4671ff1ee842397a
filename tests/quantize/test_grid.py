"""The batched shrink search picks exactly what trying the factors one after another picks."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitsmith.quantize import grid


def one_by_one(x, bits, sym, every):
    """GPTQ's loop (quant.py): each factor in turn, a row's grid replaced only by a strictly smaller error."""
    g = grid.RowGrid(bits, sym)
    xmin, xmax = x.min(1).values.clamp(max=0), x.max(1).values.clamp(min=0)
    s = g.symmetric(xmin)
    peak = torch.maximum(xmin.abs(), xmax)
    xmax, xmin = torch.where(s, peak, xmax), torch.where(s & (xmin < 0), -peak, xmin)
    flat = (xmin == 0) & (xmax == 0)
    xmin, xmax = torch.where(flat, -1.0, xmin), torch.where(flat, 1.0, xmax)
    best_scale, best_zero = grid._grid(xmin, xmax, g)
    best = torch.full_like(xmin, float("inf"))
    for i in range(0, 80, every):
        scale, zero = grid._grid((1 - i / 100) * xmin, (1 - i / 100) * xmax, g)
        q = grid.quantize_codes(x, scale[:, None], zero[:, None], g.maxq(xmin)[:, None])
        err = ((q.float() - zero[:, None]) * scale.float()[:, None] - x).abs().pow(2.4).sum(1)
        better = err < best
        best = torch.where(better, err, best)
        best_scale, best_zero = torch.where(better, scale, best_scale), torch.where(better, zero, best_zero)
    return best_scale, best_zero


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 40), n=st.integers(1, 70), seed=st.integers(0, 2**16), every=st.sampled_from([1, 3, 8]),
       batch=st.sampled_from([1, 50, 1 << 18]), positive=st.booleans())
def test_batched_search_equals_the_sequential_loop(rows, n, seed, every, batch, positive):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=gen) * 0.05
    x = x.abs() if positive else x
    bits = torch.tensor([2, 3, 4, 5, 6, 8])[torch.randint(0, 6, (rows,), generator=gen)]
    sym = torch.rand(rows, generator=gen) < 0.5
    saved, grid.SEARCH_ELEMENTS = grid.SEARCH_ELEMENTS, batch
    try:
        got = grid.fit_grid(x, grid.RowGrid(bits, sym), mse=True, shrink_every=every)
    finally:
        grid.SEARCH_ELEMENTS = saved
    want = one_by_one(x, bits, sym, every)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 30), n=st.integers(1, 80), seed=st.integers(0, 2**16), mse=st.booleans(),
       low=st.sampled_from([0.0, 0.001, 0.05, 1.0]))
def test_asymmetric_zero_points_are_never_zero(rows, n, seed, mse, low):
    """Rows whose minimum is at or just below 0 get a zero point of 1 (GPTQ v1 stores zero - 1 and must not
    wrap), on the grid of least error among the whole range on a coarser step (rescale) and the min-max step
    with the top step clipped (shift); other rows keep their min-max grid."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(rows, n, generator=gen) - low * torch.rand(rows, 1, generator=gen)
    bits = torch.tensor([2, 3, 4, 5, 6, 8])[torch.randint(0, 6, (rows,), generator=gen)]
    g = grid.RowGrid(bits, False)
    scale, zero = grid.fit_grid(x, g, mse=mse)
    maxq = g.maxq(scale)
    assert (zero >= 1).all() and (zero <= maxq).all()
    xmin, xmax = x.min(1).values.clamp(max=0), x.max(1).values.clamp(min=0)
    raised = grid._zero_raised(xmin, xmax, g)
    plain_scale, plain_zero = grid._grid(xmin, xmax, g)                 # zero >= 1 already: the rescaled grid
    err = lambda s, z: ((grid.quantize_codes(x, s[:, None], z[:, None], maxq[:, None]).float() - z[:, None])
                        * s.float()[:, None] - x).abs().pow(grid.ERROR_NORM).sum(1)
    chosen = err(scale, zero)
    assert (chosen <= err(plain_scale, plain_zero) * (1 + 1e-6)).all()     # never worse than rescaling
    if not mse:                  # (the shrink search tries factors 1 - i/100 of every range instead)
        p = 1 - 1 / maxq
        shift_scale, shift_zero = grid._grid(p * xmin, p * xmax, g)        # the min-max step, zero 1, top clipped
        assert (chosen[raised] <= err(shift_scale, shift_zero)[raised] * (1 + 1e-6)).all()
        assert torch.equal(scale[~raised], plain_scale[~raised]) and torch.equal(zero[~raised], plain_zero[~raised])
        assert (zero[raised] == 1).all()


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 12), n=st.integers(1, 80), bits=st.sampled_from([3, 4, 5, 6]), mse=st.booleans(),
       magnitude=st.sampled_from([1e-4, 0.05, 3.0]), seed=st.integers(0, 999))
def test_double_quantized_scales_are_whole_codes_of_the_row_unit(rows, n, bits, mse, magnitude, seed):
    """Every group of a row, fitted on the lattice of its unit, gets a scale fp16(c u) with c in 1..255 that its
    code gives back exactly; the row's own min-max scale is on it within one code."""
    W = torch.randn(rows, 4 * n, generator=torch.Generator().manual_seed(seed)) * magnitude
    unit = grid.scale_unit(W, bits)
    g = grid.RowGrid(bits, False, unit)
    fits = [grid.fit_grid(W[:, k * n:(k + 1) * n], g, mse=mse) for k in range(4)]
    scales = torch.stack([s for s, _ in fits])
    codes = grid.scale_codes(scales, unit)
    assert torch.equal(grid.coded_scales(codes, unit), scales)
    assert int(codes.min()) >= 1
    whole, _ = grid.fit_grid(W, grid.RowGrid(bits, False))        # fp16 scale of the whole row's range
    assert (whole.float() <= 255 * unit.float() * (1 + 1e-3)).all()

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
    bits = torch.tensor([2, 3, 4, 8])[torch.randint(0, 4, (rows,), generator=gen)]
    sym = torch.rand(rows, generator=gen) < 0.5
    saved, grid.SEARCH_ELEMENTS = grid.SEARCH_ELEMENTS, batch
    try:
        got = grid.fit_grid(x, grid.RowGrid(bits, sym), mse=True, shrink_every=every)
    finally:
        grid.SEARCH_ELEMENTS = saved
    want = one_by_one(x, bits, sym, every)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])

"""Lookup-table quantization (quantize/lut.py): weighted k-means per row, nearest-centroid codes, GPTQ with the
table as its column quantizer."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitsmith.quantize.lut import (
    KMEANS_ITERS,
    _nearest_in_sorted,
    gptq_lut,
    gptq_lut_configs,
    lloyd,
    nearest,
    starts,
    weighted_kmeans,
)


def weighted_error(W, weight, centroids):
    codes = nearest(W, centroids)
    return float((weight * (W - centroids.gather(1, codes)) ** 2).sum())


def test_kmeans_is_exact_on_rows_of_few_values():
    g = torch.Generator().manual_seed(0)
    values = torch.tensor([[-1.0, -0.25, 0.5, 2.0]])
    W = values[0][torch.randint(0, 4, (3, 50), generator=g)]
    W[:, :4] = values                                      # every value present in every row
    centroids = weighted_kmeans(W, torch.rand(50, generator=g) + 0.1, 4)
    assert torch.equal(centroids, values.expand(3, 4))
    assert torch.equal(centroids.gather(1, nearest(W, centroids)), W)


@pytest.mark.parametrize("seed", range(5))
def test_kmeans_recovers_the_means_of_a_mixture(seed):
    """Rows drawn from a mixture of 8 well-separated normals (means apart by 10 standard deviations, shares up to
    several times each other, weights of the columns random): the table lands on the component means, to within
    6 standard errors of a component's mean. Lloyd's steps from the equal-mass quantiles alone merge two
    components and split another on 4 of these 5 draws."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(4, 1, generator=g) + torch.arange(8.0)          # every row: 8 means 1 apart, its own offset
    sigma = 0.1
    share = torch.softmax(torch.randn(8, generator=g) * 0.8, 0)
    component = torch.multinomial(share, 4 * 2000, replacement=True, generator=g).reshape(4, 2000)
    W = means.gather(1, component) + sigma * torch.randn(4, 2000, generator=g)
    centroids = weighted_kmeans(W, torch.rand(2000, generator=g) + 0.5, 8)
    assert torch.allclose(centroids, means, atol=6 * sigma / (2000 * share.min()) ** 0.5 + 1e-4)


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 6), cols=st.integers(8, 200), k=st.sampled_from([4, 8, 16]), seed=st.integers(0, 999))
def test_the_best_of_the_starts_is_no_worse_than_lloyd_from_equal_mass(rows, cols, k, seed):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g)
    weight = (torch.rand(cols, generator=g) ** 4).expand(rows, cols) + 1e-12    # skewed, as Hessian diagonals are
    order = torch.argsort(W, dim=1)
    sorted_w = W.gather(1, order)
    equal_mass = lloyd(W, weight, sorted_w, order, starts(sorted_w, weight.gather(1, order), k)[0], KMEANS_ITERS)
    fitted = weighted_kmeans(W, weight, k)
    for row in range(rows):
        assert (weighted_error(W[row:row + 1], weight[row], fitted[row:row + 1])
                <= weighted_error(W[row:row + 1], weight[row], equal_mass[row:row + 1]) * (1 + 1e-6) + 1e-12)


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 6), cols=st.integers(8, 200), k=st.sampled_from([4, 8, 16]), seed=st.integers(0, 999))
def test_kmeans_centroids_ascend_and_lloyd_does_not_lose_to_its_start(rows, cols, k, seed):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g)
    weight = torch.rand(cols, generator=g) ** 3
    start = weighted_kmeans(W, weight, k, iters=0)
    fitted = weighted_kmeans(W, weight, k)
    assert fitted.shape == (rows, k) and torch.all(fitted[:, 1:] >= fitted[:, :-1])
    assert weighted_error(W, weight, fitted) <= weighted_error(W, weight, start) * (1 + 1e-5) + 1e-9


@settings(max_examples=50, deadline=None)
@given(rows=st.integers(1, 5), cols=st.integers(1, 40), k=st.sampled_from([2, 4, 8]), seed=st.integers(0, 999))
def test_nearest_is_the_closest_centroid(rows, cols, k, seed):
    g = torch.Generator().manual_seed(seed)
    centroids = torch.sort(torch.randn(rows, k, generator=g), dim=1).values
    W = 2 * torch.randn(rows, cols, generator=g)
    codes = nearest(W, centroids)
    distance = (W[:, :, None] - centroids[:, None, :]).abs()
    assert codes.min() >= 0 and codes.max() < k
    assert torch.allclose(distance.gather(2, codes[:, :, None])[:, :, 0], distance.min(dim=2).values)


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 5), cols=st.integers(1, 40), k=st.sampled_from([2, 4, 16]), levels=st.integers(2, 50),
       seed=st.integers(0, 999))
def test_codes_from_the_sorted_rows_equal_nearest(rows, cols, k, levels, seed):
    """k-means' assignment step searches the midpoints among the sorted weights (`_nearest_in_sorted`): the same
    codes as `nearest`, ties (weights on a midpoint, repeated weights, repeated centroids) included; so is a
    column's count of the midpoints below it."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randint(-levels, levels + 1, (rows, cols), generator=g).float() / 4      # many ties
    centroids = torch.sort(torch.randint(-levels, levels + 1, (rows, k), generator=g).float() / 4, dim=1).values
    order = torch.argsort(W, dim=1)
    assert torch.equal(_nearest_in_sorted(W.gather(1, order), order, centroids), nearest(W, centroids))
    mid = (centroids[:, 1:] + centroids[:, :-1]) / 2
    assert torch.equal(nearest(W[:, 0], centroids), torch.searchsorted(mid, W[:, :1].contiguous())[:, 0])


def correlated(seed, rows=32, cols=96, n=1024):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, cols, generator=g) @ (torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=g))
    return torch.randn(rows, cols, generator=g) * 0.05, 2 * X.t() @ X / n


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_lut_holds_its_codes_and_beats_rounding_to_its_own_tables(bits, act_order):
    W, H = correlated(bits)
    qw = gptq_lut(W, H, bits, act_order=act_order)
    assert qw.codes.dtype == torch.uint8 and int(qw.codes.max()) < 2 ** bits
    assert qw.lut.dtype == torch.float16 and qw.lut.shape == (32, 2 ** bits)
    assert torch.equal(qw.Q, qw.lut.float().gather(1, qw.codes.long()))           # Q is what is stored

    def output_error(Q):
        E = W - Q
        return float(((E @ H) * E).sum())
    rounded = qw.lut.float().gather(1, nearest(W, qw.lut.float()))
    assert output_error(qw.Q) < output_error(rounded)                              # error compensation pays


def test_stacked_tables_equal_one_run_each():
    W, H = correlated(7)
    together, losses = gptq_lut_configs(W, H, [2, 3, 4], act_order=True)
    for qw, row_losses in zip(together, losses):
        alone = gptq_lut(W, H, qw.bits, act_order=True)
        assert torch.equal(alone.codes, qw.codes) and torch.equal(alone.lut, qw.lut)
        assert alone.loss == pytest.approx(float(row_losses.sum()))

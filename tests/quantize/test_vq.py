"""Codebooks of pairs (quantize/vq.py): weighted k-means in two dimensions, the importance draw it is fitted on,
the weight they stand for, and GPTQ's loop choosing each pair's entry jointly."""
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitsmith.layouts import VQLayout
from bitsmith.plan import LayerPlan
from bitsmith.quantize.gptq import gptq_quantize
from bitsmith.quantize.vq import (
    dequantize,
    entries,
    gptq_vq,
    importance_sample,
    nearest_entry,
    pair_order,
    product_grid,
    weighted_kmeans2,
)


def test_kmeans_recovers_the_centres_of_a_known_mixture():
    """16 well separated Gaussian clusters of unequal sizes and weights: Lloyd's steps from the product grid of
    quantiles find every centre."""
    g = torch.Generator().manual_seed(0)
    centres = torch.cartesian_prod(torch.tensor([-3.0, -1.0, 0.5, 2.5]), torch.tensor([-2.0, 0.0, 1.0, 4.0]))
    centres = centres + 0.3 * torch.randn(16, 2, generator=g)
    sizes = torch.randint(50, 400, (16,), generator=g)
    X = torch.cat([c + 0.05 * torch.randn(int(n), 2, generator=g) for c, n in zip(centres, sizes)])
    weight = torch.rand(X.shape[0], 2, generator=g) + 0.5
    found = weighted_kmeans2(X, weight, 16)
    distance = torch.cdist(centres, found)
    assert distance.min(dim=1).values.max() < 0.02                     # every centre has an entry on it
    assert distance.min(dim=0).values.max() < 0.02                     # and every entry sits on a centre


@settings(max_examples=25, deadline=None)
@given(n=st.integers(20, 400), k=st.sampled_from([4, 16, 32, 64, 128]), seed=st.integers(0, 999))
def test_lloyd_does_not_lose_to_its_product_grid(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 2, generator=g) * torch.tensor([1.0, 0.2])
    weight = torch.rand(n, 2, generator=g) ** 2

    def error(C):
        return float((weight[:, None, :] * (X[:, None, :] - C[None]).square()).sum(-1).min(dim=1).values.sum())

    start, fitted = product_grid(X, weight, k), weighted_kmeans2(X, weight, k)
    assert start.shape == fitted.shape == (k, 2) and torch.isfinite(fitted).all()
    assert error(fitted) <= error(start) * (1 + 1e-5) + 1e-9


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 300), k=st.sampled_from([4, 16, 64, 256]), levels=st.integers(2, 6), seed=st.integers(0, 999))
def test_nearest_entry_is_the_first_of_least_weighted_distance(n, k, levels, seed):
    """On points and entries of a few integer levels (many exact ties), each point's entry is the first of least
    sum_t w_t (x_t - c_t)^2, as an argmin over the explicit distances picks it."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randint(0, levels, (n, 2), generator=g).float()
    C = torch.randint(0, levels, (k, 2), generator=g).float()
    weight = torch.randint(1, 3, (n, 2), generator=g).float()
    distance = (weight[:, None, :] * (X[:, None, :] - C[None]).square()).sum(-1)
    features = torch.cat([weight, -2 * weight * X], dim=1)
    assert torch.equal(nearest_entry(features, C), torch.argmin(distance, dim=1))


def test_fewer_points_than_entries_are_each_an_entry():
    X = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    C = weighted_kmeans2(X, torch.ones(2, 2), 16)
    assert C.shape == (16, 2) and {tuple(r) for r in C.tolist()} == {(1.0, 2.0), (3.0, 4.0)}


def test_the_importance_draw_is_unbiased_and_keeps_the_rare_large_pairs():
    g = torch.Generator().manual_seed(3)
    X = torch.randn(100_000, 2, generator=g) * 0.1
    X[:20] = 10.0                                                      # 0.02 % of the pairs, most of the error
    weight = torch.rand(100_000, 2, generator=g)
    picked, w = importance_sample(X, weight, 4096, g)
    total = float((weight * X.square()).sum())
    assert float((w * picked.square()).sum()) == pytest.approx(total, rel=0.05)
    assert int((picked == 10.0).all(dim=1).sum()) > 1000            # a uniform draw would hold about one


def test_pairs_stay_together_in_act_order():
    H = torch.diag(torch.tensor([1.0, 5.0, 3.0, 0.0, 2.0, 2.5]))
    assert pair_order(H, act_order=True).tolist() == [0, 1, 4, 5, 2, 3]
    assert pair_order(H, act_order=False).tolist() == list(range(6))


def test_weight_is_the_row_scale_times_the_entry_of_each_pair():
    codes = torch.tensor([[0, 1], [1, 0]], dtype=torch.uint8)            # 2 rows, 2 pairs, one codebook per pair
    books = torch.tensor([[[1.0, 2.0], [3.0, 4.0]] + [[0.0, 0.0]] * 14,
                          [[5.0, 6.0], [7.0, 8.0]] + [[0.0, 0.0]] * 14]).half()
    scales = torch.tensor([1.0, 0.5]).half()
    assert torch.equal(dequantize(codes, books, scales, 2),
                       torch.tensor([[1.0, 2.0, 7.0, 8.0], [1.5, 2.0, 2.5, 3.0]]))


def test_vq_beats_scalar_gptq_of_the_same_bits_on_gaussian_weights():
    """Two-dimensional codebooks fill the plane better than a square grid of scalar levels (GPTVQ, table 1): on
    Gaussian rows and correlated inputs the GPTQ loss at 2 and 3 bits is lower with codebooks of pairs, at fewer
    stored bits than groups of 128."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(2048, 256, generator=g) @ (0.1 * torch.randn(256, 256, generator=g) + torch.eye(256))
    H, W = 2 * X.t() @ X / 2048, 0.02 * torch.randn(128, 256, generator=g)
    for bits in (2, 3):
        vq, losses = gptq_vq(W, H, bits, 128, act_order=True)
        scalar = gptq_quantize(W, H, bits, 128, act_order=True, mse=True)
        assert vq.loss == pytest.approx(float(losses.sum()))
        assert vq.loss < 0.9 * scalar.loss
        vq_bits = VQLayout.stored_bits(128, 256, LayerPlan(bits, 128, False, vq=True))
        assert vq_bits < 128 * 256 * (bits + 0.25)


def test_gptq_loss_is_the_output_error_without_damping():
    """The loop's loss is GPTQ's: with no damping and act-order, sum of (w - q)^2 / [H^-1]_qq^2 / 2 over the pairs
    equals tr((W - Q) H (W - Q)^T) / 2 (Frantar et al. 2023, eq. (2) summed over the columns)."""
    g = torch.Generator().manual_seed(1)
    X = torch.randn(512, 64, generator=g)
    H, W = 2 * X.t() @ X / 512, torch.randn(16, 64, generator=g)
    qw, losses = gptq_vq(W, H, 3, 32, act_order=True, damp=1e-9)
    E = W - qw.Q
    assert losses.sum().item() == pytest.approx(float(((E @ H) * E).sum() / 2), rel=1e-3)


def test_codebooks_are_fitted_on_the_whole_matrix_when_a_sample_of_rows_is_measured():
    g = torch.Generator().manual_seed(2)
    X = torch.randn(256, 64, generator=g)
    H, W = 2 * X.t() @ X / 256, torch.randn(32, 64, generator=g)
    whole, _ = gptq_vq(W, H, 2, 64)
    _, sampled = gptq_vq(W[:8], H, 2, 64, fit=W, keep=False)
    _, rows = gptq_vq(W, H, 2, 64, keep=False)
    assert torch.allclose(sampled, rows[:8], rtol=1e-4, atol=1e-6)
    assert torch.equal(whole.codes, gptq_vq(W, H, 2, 64)[0].codes)           # seeded: the same codebooks again


@pytest.mark.parametrize("act_order", [False, True])
def test_codes_are_in_range_and_the_weight_is_what_they_stand_for(act_order):
    g = torch.Generator().manual_seed(4)
    X = torch.randn(512, 96, generator=g)
    H, W = 2 * X.t() @ X / 512, torch.randn(24, 96, generator=g)
    H[5, :] = H[:, 5] = 0                                             # an input never active: its weights are free
    for bits in (2, 2.5, 3, 3.5, 4):
        qw, losses = gptq_vq(W, H, bits, 32, act_order=act_order)
        assert qw.codes.shape == (24, 48) and int(qw.codes.max()) < entries(bits)
        assert qw.codebooks.shape == (3, entries(bits), 2) and qw.codebooks.dtype == qw.scales.dtype == torch.float16
        assert torch.equal(qw.Q, dequantize(qw.codes, qw.codebooks, qw.scales, 32))
        assert losses.shape == (24,) and bool((losses >= 0).all())


def test_odd_inputs_or_groups_are_refused():
    H = torch.eye(6)
    with pytest.raises(ValueError, match="must be even"):
        gptq_vq(torch.randn(4, 5), torch.eye(5), 2, -1)
    with pytest.raises(ValueError, match="must be even"):
        gptq_vq(torch.randn(4, 6), H, 2, 3)


def test_half_bits_sit_between_whole_bits():
    """Indices of 5 and 7 bits a pair (2.5 and 3.5 bits a weight): the loss falls with every half bit, and the
    half-bit codebook holds 2^(2 bits) entries."""
    g = torch.Generator().manual_seed(5)
    X = torch.randn(1024, 128, generator=g)
    H, W = 2 * X.t() @ X / 1024, torch.randn(64, 128, generator=g)
    losses = [gptq_vq(W, H, bits, 128, act_order=True)[0].loss for bits in (2, 2.5, 3, 3.5, 4)]
    assert all(a > 1.2 * b for a, b in itertools.pairwise(losses))
    assert entries(2.5) == 32 and entries(3.5) == 128
    with pytest.raises(ValueError, match="half bits"):
        entries(3.25)

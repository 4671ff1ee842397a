"""Per-input-channel grouping (quantize/per_ic.py; AdaDim): GPTQ with grids per input channel and run of output
rows. Without cross-column error feedback it is round-to-nearest onto each column's grids; stacked with other
configurations it is the same as alone; where a few input channels are huge it beats groups along the input at
equal bits."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitsmith.quantize.gptq import GridConfig, gptq_configs, gptq_quantize
from bitsmith.quantize.grid import RowGrid, fake_quantize, quantize_codes
from bitsmith.quantize.per_ic import PerICWeight, expand_rows, fit_column, row_span


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 70), group=st.sampled_from([-1, 1, 8, 16, 32]), bits=st.sampled_from([2, 3, 4, 8]),
       seed=st.integers(0, 99))
def test_fit_column_gives_one_grid_per_run_of_rows_and_the_last_its_own(rows, group, bits, seed):
    w = torch.randn(rows, generator=torch.Generator().manual_seed(seed))
    scale, zero = fit_column(w, group, RowGrid(bits, False))
    g = row_span(group, rows)
    assert scale.shape == zero.shape == (-(-rows // g),)
    for k in range(len(scale)):                         # each run alone gets exactly the grid fit_column gave it
        s, z = fit_column(w[k * g:(k + 1) * g], -1, RowGrid(bits, False))
        assert (s.item(), z.item()) == (scale[k].item(), zero[k].item())
    assert expand_rows(scale, group, rows).shape == (rows,)


def test_without_feedback_between_columns_it_is_round_to_nearest_per_column():
    """H diagonal: GPTQ's update of later columns is zero, so each column is rounded onto its own grids."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(50, 24, generator=g)
    H = torch.diag(torch.rand(24, generator=g) + 0.5)
    qw = gptq_quantize(W, H, 3, 16, per_ic=True)
    assert isinstance(qw, PerICWeight) and qw.scales.shape == qw.zeros.shape == (4, 24) and qw.g_idx is None
    for j in range(24):
        scale, zero = fit_column(W[:, j], 16, RowGrid(3, False))
        assert torch.equal(qw.scales[:, j], scale) and torch.equal(qw.zeros[:, j], zero)
        q = quantize_codes(W[:, j], expand_rows(scale, 16, 50), expand_rows(zero, 16, 50), 3)
        assert torch.equal(qw.codes[:, j], q)
    assert torch.equal(qw.Q, PerICWeight.dequantize(qw.codes, qw.scales, qw.zeros, 16))
    assert torch.equal(qw.Q, fake_quantize(qw.codes, expand_rows(qw.scales, 16, 50), expand_rows(qw.zeros, 16, 50)))


@pytest.mark.parametrize("act_order", [False, True])
def test_stacked_with_other_configurations_it_is_the_same_as_alone(act_order):
    g = torch.Generator().manual_seed(1)
    W, X = torch.randn(40, 64, generator=g), torch.randn(200, 64, generator=g)
    H = 2 * X.t() @ X / 200
    configs = [GridConfig(3, 32), GridConfig(3, 16, per_ic=True), GridConfig(4, -1, per_ic=True),
               GridConfig(2, 32, outliers=0.05)]
    stacked, losses = gptq_configs(W, H, configs, act_order=act_order, mse=True)
    for c, config in enumerate(configs):
        (alone,), loss = gptq_configs(W, H, [config], act_order=act_order, mse=True)
        assert type(alone) is type(stacked[c])
        assert torch.equal(alone.codes, stacked[c].codes) and torch.equal(alone.Q, stacked[c].Q)
        assert torch.allclose(loss[0], losses[c], rtol=1e-5)      # lazy-update blocks differ: float sums do


def test_a_few_huge_input_channels_favour_groups_along_the_output():
    """Three input channels with weights 30x the rest: with groups along the input every group holding one is
    coarse; with grids per input channel only those channels are."""
    g = torch.Generator().manual_seed(2)
    W = 0.02 * torch.randn(128, 256, generator=g)
    W[:, [5, 77, 190]] *= 30
    X = torch.randn(1024, 256, generator=g)
    H = 2 * X.t() @ X / 1024

    def output_error(qw):
        return ((W - qw.Q) @ X.t()).square().mean().item()

    per_oc = gptq_quantize(W, H, 3, 128, act_order=True, mse=True)
    per_ic = gptq_quantize(W, H, 3, 128, act_order=True, mse=True, per_ic=True)
    assert per_oc.scales.numel() == per_ic.scales.numel()          # the same metadata: 2 x 128 x 256 / 128
    assert output_error(per_ic) < 0.5 * output_error(per_oc)


def test_outliers_on_per_input_channel_grids_are_refused():
    with pytest.raises(ValueError, match="per-input-channel groups keep no outliers"):
        GridConfig(3, 64, outliers=0.01, per_ic=True)


def test_per_ic_configurations_fitted_together_equal_each_fitted_alone():
    """The grids of every per-input-channel configuration of a stack are fitted in one call per column
    (gptq.PerICGrids), zero-padded to the longest span, and each is the grid a run of its own gives: spans that
    divide the rows, one that does not (100 of 256, its last run shorter) and the whole column (-1)."""
    torch.manual_seed(0)
    W, X = torch.randn(256, 96), torch.randn(1000, 96)
    H = 2 * X.T @ X / 1000
    configs = [GridConfig(b, g, s, per_ic=True) for b in (2, 3, 4) for g in (64, 128, -1, 100) for s in (False, True)]
    _, together = gptq_configs(W, H, configs, True, False, 0.01, mse=True, shrink_every=8, keep=False)
    for c, config in enumerate(configs):
        _, alone = gptq_configs(W, H, [config], True, False, 0.01, mse=True, shrink_every=8, keep=False)
        assert torch.equal(alone[0], together[c]), config

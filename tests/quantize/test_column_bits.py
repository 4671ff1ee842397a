"""Bits per group of columns (bitsmith/quantize/column_bits.py, BAQ): the allocation keeps the total, raises the
groups that lose most and stops where a pair no longer pays; GPTQ with every group on the same width is GPTQ; on
a matrix whose act-ordered groups differ in importance it loses less than uniform grids at the same code bits."""
import pytest
import torch

from bitsmith.quantize.column_bits import (
    THETA,
    allocate_widths,
    gptq_column_bits,
    gptq_column_bits_configs,
    group_losses,
)
from bitsmith.quantize.gptq import GridConfig, gptq_configs, gptq_quantize


def test_allocation_pairs_the_largest_losses_with_the_smallest_while_a_pair_pays():
    losses = torch.tensor([1.0, 100.0, 2.0, 50.0, 0.5, 3.0])
    widths = allocate_widths(losses, 3, full=6)
    assert sum(widths) == 3 * 6
    assert widths[1] == 4 and widths[4] == 2                         # the largest up, the smallest down
    up, down = 1 - 2 ** -THETA, 2 ** THETA - 1
    assert widths[3] == 4 and widths[0] == 2                         # 50 x 0.74 > 1 x 2.86: pays
    assert (widths[5], widths[2]) == (3, 3)                          # 3 x 0.74 < 2 x 2.86: does not
    assert 3.0 * up < 2.0 * down


def test_equal_losses_and_a_short_last_group_keep_their_width():
    assert allocate_widths(torch.ones(8), 4, full=8) == [4] * 8
    widths = allocate_widths(torch.tensor([100.0, 0.1, 1e6]), 4, full=2)      # the third group is the short one
    assert widths == [5, 3, 4]


def test_group_losses_sum_the_columns_of_each_group_with_the_row_weights():
    score = torch.arange(12, dtype=torch.float32).reshape(2, 6)
    assert group_losses(score, 4).tolist() == [(0 + 1 + 2 + 3 + 6 + 7 + 8 + 9) / 2, (4 + 5 + 10 + 11) / 2]
    weighted = group_losses(score, 4, torch.tensor([2.0, 0.0]))
    assert weighted.tolist() == [(0 + 1 + 2 + 3), (4 + 5)]


def problem(seed: int, out: int = 48, inp: int = 256):
    """W and H whose input channels differ in scale by 30x, so that act-ordered groups differ in importance."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(4 * inp, inp, generator=g) * torch.logspace(0, 1.5, inp)[torch.randperm(inp, generator=g)]
    return torch.randn(out, inp, generator=g) / 16, 2 * X.t() @ X / X.shape[0], X


def test_gptq_with_every_group_on_one_width_is_gptq():
    W, H, _ = problem(0)
    (plain,), plain_losses = gptq_configs(W, H, [GridConfig(3, 64)], act_order=True, mse=True)
    (same,), same_losses = gptq_configs(W, H, [GridConfig(3, 64, widths=(3, 3, 3, 3))], act_order=True, mse=True)
    assert torch.equal(same.Q, plain.Q) and torch.equal(same.codes, plain.codes)
    assert torch.equal(same_losses, plain_losses) and same.widths.tolist() == [3, 3, 3, 3]


@pytest.mark.parametrize("bits", [3, 4, 5])
def test_bits_per_group_lose_less_than_uniform_grids_at_the_same_code_bits(bits):
    W, H, X = problem(bits)
    qw = gptq_column_bits(W, H, bits, 64)
    uniform = gptq_quantize(W, H, bits, 64, act_order=True, mse=True)
    assert {bits - 1, bits + 1} <= set(qw.widths.tolist()) <= {bits - 1, bits, bits + 1}
    assert int(qw.widths.sum()) == bits * 4                           # the same bits of codes
    g = qw.group_index().long()
    assert (qw.codes.long() <= (2 ** qw.widths[g] - 1)).all()         # every code within its group's width
    assert torch.equal(qw.Q, qw.scales.float()[g].t() * (qw.codes.float() - qw.zeros.float()[g].t()))
    error = lambda Q: float(((W - Q) @ X.t()).square().mean())
    assert error(qw.Q) < 0.9 * error(uniform.Q)
    assert qw.loss < 0.9 * uniform.loss


def test_widths_of_a_sample_follow_its_weights_and_bits_without_neighbours_are_refused():
    W, H, _ = problem(7)
    _, losses = gptq_column_bits_configs(W, H, [(3, 64), (4, 128)], act_order=True, damp=0.01, mse=True,
                                         keep=False)
    assert losses.shape == (2, W.shape[0])
    with pytest.raises(ValueError, match="choose bits among"):
        gptq_column_bits_configs(W, H, [(2, 64)], act_order=True, damp=0.01, mse=True)

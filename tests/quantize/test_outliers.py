import pytest
import torch

from bitsmith.calibration.hessian import Hessian
from bitsmith.formats.csr import from_csr, to_csr
from bitsmith.kernels.reference import fake_quantize
from bitsmith.quantize.gptq import GridConfig, gptq_configs, gptq_quantize
from bitsmith.quantize.outliers import DenseSparseWeight, narrowest_range, outlier_count, top_per_row
from bitsmith.quantize.rtn import QuantizedWeight


def planted(seed=0, rows=64, cols=256, n=10):
    """Small Gaussian weights with n huge ones planted, and the Hessian of correlated inputs of uneven scale."""
    g = torch.Generator().manual_seed(seed)
    W = 0.02 * torch.randn(rows, cols, generator=g)
    r, c = torch.randperm(rows, generator=g)[:n], torch.randint(0, cols, (n,), generator=g)
    W[r, c] = torch.where(torch.rand(n, generator=g) < 0.5, -2.0, 2.0)
    mix = torch.eye(cols) + 0.2 * torch.randn(cols, cols, generator=g) / cols ** 0.5
    X = (torch.randn(2048, cols, generator=g) @ mix) * (0.2 + torch.rand(cols, generator=g))
    return W, 2 * X.t() @ X / X.shape[0], r, c


def output_error(W, Q, H):
    """tr((W - Q) H (W - Q)^T)."""
    D = (W - Q).double()
    return float(torch.einsum("ij,jk,ik->", D, H.double(), D))


def hessian_of(X):
    h = Hessian(X.shape[1])
    h.add(X)
    return h.H


def assert_same(a: QuantizedWeight, b: QuantizedWeight):
    for field in ("codes", "scales", "zeros", "Q"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert (a.g_idx is None) == (b.g_idx is None) and (a.g_idx is None or torch.equal(a.g_idx, b.g_idx))
    assert a.loss == b.loss
    if isinstance(a, DenseSparseWeight) or isinstance(b, DenseSparseWeight):
        assert type(a) is type(b)
        assert torch.equal(a.outliers.cols, b.outliers.cols) and torch.equal(a.outliers.values, b.outliers.values)


def test_outlier_count():
    assert outlier_count(0.0, 4096) == 0
    assert outlier_count(0.01, 576) == 6
    assert outlier_count(0.005, 100) == 1                   # halves round up
    assert outlier_count(0.02, 1536) == 31
    with pytest.raises(ValueError):
        outlier_count(1.0, 10)
    with pytest.raises(ValueError):
        GridConfig(4, 128, outliers=-0.01)


def test_narrowest_range_takes_the_ends_that_matter():
    x = torch.tensor([[-1.0, 0.0, 0.5, 10.0, 9.0, 0.2],     # two huge maxima: both go, though either alone gains nothing
                      [-5.0, 0.1, 0.2, 0.3, 1.0, -0.5],
                      [-5.0, 0.1, 0.2, 0.3, 4.0, -0.5]])
    asym = narrowest_range(x, torch.tensor([2, 1, 2]), torch.tensor([False, False, True]))
    assert asym.tolist() == [[False, False, False, True, True, False],
                             [True, False, False, False, False, False],
                             [True, False, False, False, True, False]]
    assert not narrowest_range(x, torch.tensor([0, 0, 0]), torch.tensor([False] * 3)).any()


def test_top_per_row_counts_and_ties():
    score = torch.tensor([[1.0, 3.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert top_per_row(score, torch.tensor([2, 3])).tolist() == [[False, True, True, False],
                                                                 [True, True, True, False]]


@pytest.mark.parametrize("act_order,static,mse", [(False, False, False), (True, False, False), (True, True, False),
                                                 (True, False, True)])
def test_no_outliers_is_plain_gptq(act_order, static, mse):
    """outliers=0 (or a budget that rounds to 0) is GPTQ bit for bit, alone or stacked next to configurations
    with outliers, whose path it then shares."""
    W, H, _, _ = planted()
    plain = [GridConfig(4, 32), GridConfig(3, -1, True)]
    alone, la = gptq_configs(W, H, plain, act_order, static, mse=mse)
    stacked, ls = gptq_configs(W, H, plain + [GridConfig(4, 32, outliers=0.02), GridConfig(3, -1, True, 0.01)],
                               act_order, static, mse=mse)
    rounded, lr = gptq_configs(W, H, [GridConfig(4, 32, outliers=0.001)], act_order, static, mse=mse)
    assert torch.equal(la, ls[:2]) and torch.equal(la[:1], lr)
    for a, b in zip(alone, stacked):
        assert type(b) is QuantizedWeight
        assert_same(a, b)
    assert_same(alone[0], QuantizedWeight(*[getattr(rounded[0], f) for f in QuantizedWeight.__dataclass_fields__]))
    assert rounded[0].outliers.cols.shape == (W.shape[0], 0)
    assert_same(gptq_quantize(W, H, 4, 32, act_order=act_order, static_groups=static, mse=mse, outliers=0.0),
                alone[0])


@pytest.mark.parametrize("bits,group,sym,act_order,static,fraction", [
    (4, -1, False, False, False, 0.01), (3, 64, False, True, False, 0.02), (4, 32, True, True, True, 0.005),
    (2, 32, False, False, False, 0.01), (3, -1, True, True, False, 0.004)])
def test_budget_layout_and_Q(bits, group, sym, act_order, static, fraction):
    W, H, _, _ = planted()
    qw = gptq_quantize(W, H, bits, group, sym, act_order=act_order, static_groups=static, outliers=fraction)
    rows, cols = W.shape
    k = outlier_count(fraction, cols)
    sparse = qw.outliers
    assert sparse.cols.shape == sparse.values.shape == (rows, k) and sparse.values.dtype == torch.float16
    assert (sparse.cols.diff(dim=1) > 0).all() and int(sparse.cols.max()) < cols
    mask = sparse.mask(cols)
    assert (mask.sum(dim=1) == k).all()
    g = qw.group_index().long()
    zeros = qw.zeros[g].t()
    assert torch.equal(qw.codes[mask].int(), zeros[mask])              # the code of 0 under each outlier
    dense = fake_quantize(qw.codes, qw.scales[g].t(), zeros)
    assert (dense[mask] == 0).all()
    assert torch.equal(qw.Q, sparse.overwrite(dense))                  # codes dequantized, then overwritten
    assert torch.equal(qw.Q, dense + from_csr(to_csr(mask, sparse.dense(cols))).float())   # or the two added
    assert torch.equal(qw.Q, torch.where(mask, qw.Q.half().float(), qw.Q))


@pytest.mark.parametrize("bits,group,act_order,static", [(4, -1, False, False), (3, 64, True, False),
                                                         (4, 32, True, True), (3, -1, True, False)])
def test_planted_outliers_are_kept_and_error_drops(bits, group, act_order, static):
    """Every planted weight is kept (as its error-updated value), reported at its original column under
    act-order, and the layer's output error tr((W-Q) H (W-Q)^T) falls."""
    W, H, r, c = planted()
    plain = gptq_quantize(W, H, bits, group, act_order=act_order, static_groups=static)
    qw = gptq_quantize(W, H, bits, group, act_order=act_order, static_groups=static, outliers=0.01)
    assert qw.outliers.mask(W.shape[1])[r, c].all()
    assert output_error(W, qw.Q, H) < 0.5 * output_error(W, plain.Q, H)


@pytest.mark.parametrize("bits,group", [(3, 128), (4, -1)])
def test_outliers_lower_error_on_real_smollm2_layer(smollm2_o_proj, bits, group):
    W, X = smollm2_o_proj
    H = hessian_of(X)
    plain, some, more = gptq_configs(W, H, [GridConfig(bits, group, outliers=f) for f in (0.0, 0.005, 0.02)],
                                     act_order=True)[0]
    errors = [output_error(W, qw.Q, H) for qw in (plain, some, more)]
    assert errors[2] < errors[1] < errors[0]
    half = X.shape[0] // 2                                   # held out: fit on the first half, measure on the second
    fitted = [gptq_quantize(W, hessian_of(X[:half]), bits, group, act_order=True, outliers=f) for f in (0.0, 0.02)]
    held = hessian_of(X[half:])
    assert output_error(W, fitted[1].Q, held) < output_error(W, fitted[0].Q, held)


@pytest.mark.parametrize("act_order,static", [(False, False), (True, False), (True, True)])
def test_stacked_equals_separate(act_order, static):
    """Bit for bit, given the same lazy-update block (a stack's block divides all its group sizes)."""
    W, H, _, _ = planted(seed=1)
    configs = [GridConfig(4, 64), GridConfig(4, 64, outliers=0.01), GridConfig(3, 64, True, 0.005),
               GridConfig(3, -1, outliers=0.02)]
    stacked, losses = gptq_configs(W, H, configs, act_order, static, blocksize=64)
    for c, config in enumerate(configs):
        (alone,), loss = gptq_configs(W, H, [config], act_order, static, blocksize=64)
        assert_same(stacked[c], alone)
        assert torch.equal(losses[c], loss[0])
    _, measured = gptq_configs(W, H, configs, act_order, static, blocksize=64, keep=False)
    assert torch.equal(measured, losses)


def test_outlier_overflowing_fp16_is_rejected():
    W, H, _, _ = planted()
    W[3, 7] = 1e6
    with pytest.raises(ValueError, match="fp16"):
        gptq_quantize(W, H, 4, outliers=0.01)
    with pytest.raises(ValueError, match="fp16"):
        gptq_configs(W, H, [GridConfig(4, outliers=0.01)], keep=False)

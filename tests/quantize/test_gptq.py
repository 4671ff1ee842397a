import pytest
import torch

from bitsmith.calibration.hessian import Hessian
from bitsmith.kernels.reference import fake_quantize
from bitsmith.quantize.gptq import gptq_quantize, inverse_cholesky, unquantized_target
from bitsmith.quantize.rtn import rtn_quantize


def output_error(W, Q, X):
    return ((W - Q) @ X.t()).norm().item()


def hessian_of(X):
    h = Hessian(X.shape[1])
    h.add(X)
    return h.H


@pytest.mark.parametrize("bits,group,act_order", [(4, 128, True), (3, 128, True), (4, -1, False), (2, 64, False)])
def test_gptq_beats_rtn_on_real_stories_layer(stories_down, bits, group, act_order):
    W, X = stories_down
    H = hessian_of(X)
    rtn = rtn_quantize(W, bits, group)
    gptq = gptq_quantize(W, H, bits, group, act_order=act_order)
    assert output_error(W, gptq.Q, X) < output_error(W, rtn.Q, X)


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_beats_rtn_on_real_smollm2_layer(smollm2_o_proj, bits):
    W, X = smollm2_o_proj
    H = hessian_of(X)
    rtn = rtn_quantize(W, bits, 128)
    gptq = gptq_quantize(W, H, bits, 128, act_order=True)
    # held-out check too: fit on the first half of the tokens, measure on the second half
    half = X.shape[0] // 2
    fitted = gptq_quantize(W, hessian_of(X[:half]), bits, 128, act_order=True)
    assert output_error(W, gptq.Q, X) < 0.9 * output_error(W, rtn.Q, X)
    assert output_error(W, fitted.Q, X[half:]) < output_error(W, rtn.Q, X[half:])


@pytest.mark.parametrize("act_order,static,mse", [(False, False, False), (True, False, False), (True, True, False),
                                                 (True, False, True)])
def test_codes_scales_and_Q_agree_exactly(stories_down, act_order, static, mse):
    W, X = stories_down
    qw = gptq_quantize(W, hessian_of(X), 4, 32, act_order=act_order, static_groups=static, mse=mse)
    g = qw.group_index().long()
    assert torch.equal(fake_quantize(qw.codes, qw.scales[g].t(), qw.zeros[g].t()), qw.Q)
    assert int(qw.codes.max()) <= 15
    assert (qw.g_idx is not None) == (act_order and not static)


def test_damping_retry_on_singular_hessian():
    torch.manual_seed(0)
    X = torch.randn(8, 64)                      # rank 8 < 64: X^T X is singular
    H = 2 * X.t() @ X / 8
    H[5, :] = H[:, 5] = 0                       # plus one exactly dead input
    H[5, 5] = 1e-30
    with pytest.raises(RuntimeError):
        torch.linalg.cholesky(H)
    U, damp = inverse_cholesky(H, 1e-9)        # tiny damping fails in float32, retried larger in float64
    assert torch.isfinite(U).all() and damp > 1e-9
    W = torch.randn(16, 64)
    qw = gptq_quantize(W, H, 4, -1, damp=1e-9)
    assert torch.isfinite(qw.Q).all()


def test_dead_inputs_are_zeroed():
    torch.manual_seed(0)
    X = torch.randn(256, 32)
    X[:, 3] = 0
    W = torch.randn(8, 32)
    qw = gptq_quantize(W, hessian_of(X), 4, -1)
    assert torch.isfinite(qw.Q).all()
    assert (qw.Q[:, 3] == 0).all()


def test_nan_weights_rejected():
    W = torch.randn(4, 32)
    W[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        gptq_quantize(W, torch.eye(32), 4)
    with pytest.raises(ValueError, match="NaN"):
        rtn_quantize(W, 4)


def skewed(X, scale=0.1, seed=0):
    """X as a quantized model upstream would hand it on: the same tokens, mixed a little across channels (an error
    a linear layer can undo) and with noise of their own (one it cannot)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(X.shape[1]) + scale * torch.randn(X.shape[1], X.shape[1], generator=g) / X.shape[1] ** 0.5
    return X @ mix + scale * X.std() * torch.randn(X.shape, generator=g)


def test_the_unquantized_target_is_w_where_the_inputs_agree(stories_down):
    W, X = stories_down
    H = hessian_of(X)
    assert torch.equal(unquantized_target(W, H, torch.zeros_like(H), alpha=1.0), W)


def test_at_alpha_one_the_target_is_the_damped_least_squares_fit_to_the_unquantized_outputs(stories_down):
    """W' minimises ||W X - W' X~||^2 * 2/n + lambda ||W' - W||^2: its gradient vanishes, and X~ W'^T is closer to
    the unquantized outputs than X~ W^T (GPTAQ's objective before rounding)."""
    W, X = stories_down
    Xq = skewed(X)
    H, C = hessian_of(Xq), 2 * X.t().double() @ Xq.double() / X.shape[0]
    target = unquantized_target(W, H, (C - H.double()).float(), damp=0.01, alpha=1.0).double()
    lam = 0.01 * torch.diag(H).double().mean()
    gradient = target @ H.double() - W.double() @ C + lam * (target - W.double())
    assert gradient.abs().max() < 1e-5 * (W.double() @ C).abs().max()
    assert (W @ X.t() - target.float() @ Xq.t()).norm() < 0.75 * (W @ X.t() - W @ Xq.t()).norm()   # 0.68: the noise stays


@pytest.mark.parametrize("bits", [2, 3])
def test_gptq_toward_the_unquantized_outputs_matches_them_better(stories_down, bits):
    W, X = stories_down
    Xq = skewed(X)
    H, R = hessian_of(Xq), (2 * (X - Xq).t().double() @ Xq.double() / X.shape[0]).float()
    plain = gptq_quantize(W, H, bits, 32, act_order=True)
    toward = gptq_quantize(unquantized_target(W, H, R), H, bits, 32, act_order=True)
    assert (W @ X.t() - toward.Q @ Xq.t()).norm() < (W @ X.t() - plain.Q @ Xq.t()).norm()

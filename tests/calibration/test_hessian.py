import torch

from bitsmith.calibration.hessian import Hessian


def test_running_mean_equals_2XXt_over_n():
    torch.manual_seed(0)
    X = torch.randn(3, 333, 48)                  # three batches of uneven token counts
    h = Hessian(48)
    for batch in (X[0, :100], X[0, 100:], X[1], X[2, :7]):
        h.add(batch)
    tokens = torch.cat([X[0], X[1], X[2, :7]]).double()
    expected = 2 * tokens.t() @ tokens / tokens.shape[0]
    assert h.n == tokens.shape[0]
    assert torch.allclose(h.H.double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(h.H, h.H.t())

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


def test_the_order_of_the_batches_does_not_change_a_bit():
    """Sums of batches in float64 with TwoSum error terms: every order of six batches, and two halves merged,
    give the same float32 H (a plain float32 running sum would not: checked below)."""
    import itertools
    gen = torch.Generator().manual_seed(1)
    scale = 10.0 ** torch.randn(40, generator=gen)
    batches = [torch.randn(50 + 13 * b, 40, generator=gen) * scale for b in range(6)]
    results = set()
    for order in itertools.permutations(range(6)):
        h = Hessian(40)
        for b in order:
            h.add(batches[b])
        results.add(h.H.numpy().tobytes())
    assert len(results) == 1
    first, second = Hessian(40), Hessian(40)
    for b in range(3):
        first.add(batches[b])
    for b in range(3, 6):
        second.add(batches[b])
    second.merge(first)
    assert second.n == sum(x.shape[0] for x in batches)
    assert second.H.numpy().tobytes() in results
    naive = {sum((x.t() @ x for x in (batches[b] for b in order)), torch.zeros(40, 40)).numpy().tobytes()
             for order in itertools.permutations(range(6))}
    assert len(naive) > 1                                   # what the error terms are for

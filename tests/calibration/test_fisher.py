"""The streamed output Fisher (and the loss it is of) equals what autograd gives on the whole model."""
import pytest
import torch
import torch.nn.functional as F

from bitsmith.calibration.adapter import BlockRunner
from bitsmith.calibration.fisher import _head_gradient, output_fisher
from bitsmith.formats.source import open_source
from bitsmith.loader import load_model


def whole_model_fisher(model, windows, linears):
    sums = {name: torch.zeros(model.get_submodule(name).out_features) for name in linears}

    def keep(name):
        def square(g):
            sums[name].add_(g.pow(2).reshape(-1, g.shape[-1]).sum(0))

        def hook(module, args, output):
            output.register_hook(square)
        return hook

    hooks = [model.get_submodule(n).register_forward_hook(keep(n)) for n in linears]
    nll = 0.0
    for ids in windows:
        logits = model(ids[None], use_cache=False).logits[0]
        loss = F.cross_entropy(logits[:-1], ids[1:], reduction="sum")
        loss.backward()
        nll += loss.item()
    for h in hooks:
        h.remove()
    return {n: s / windows.numel() for n, s in sums.items()}, nll / (windows.shape[0] * (windows.shape[1] - 1))


@pytest.mark.parametrize("at_once", [2, 4])     # an uneven split of the three windows, all three together
def test_streamed_fisher_equals_whole_model_autograd(stories_path, at_once):
    source = open_source(str(stories_path))
    runner = BlockRunner(source.config)
    linears = [n for n, m in load_model(source).named_modules()
               if isinstance(m, torch.nn.Linear) and ".layers." in n]
    windows = torch.randint(3, 512, (3, 48), generator=torch.Generator().manual_seed(0))
    got, nll = output_fisher(runner, source, windows, linears, at_once=at_once)
    want, want_nll = whole_model_fisher(load_model(source), windows, linears)
    assert abs(nll - want_nll) < 1e-4 * want_nll
    assert len(linears) == 35 and set(got) == set(linears)
    for name in linears:
        assert got[name].shape == want[name].shape and (got[name] > 0).all()
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-10)


def test_model_labels_give_the_fisher_information_of_the_softmax():
    """With labels drawn from the model, E[(dL/dh)^2] is the diagonal of J^T (diag p - p p^T) J, the Fisher
    information of the next-token distribution at h (J = d logits / dh); the text's labels give the gradient of
    their own NLL. Every position carries the same h, so the mean over positions estimates the expectation."""
    torch.manual_seed(0)
    vocab, dim, positions = 12, 5, 4097
    head = torch.randn(vocab, dim)
    h = torch.randn(dim).expand(1, positions, dim).contiguous()
    ids = torch.randint(0, vocab, (positions,))
    g, nll = _head_gradient(lambda x: x, head, h, ids, torch.Generator().manual_seed(1))
    p = torch.softmax(head @ h[0, 0], dim=0)
    want = torch.diag(head.t() @ (torch.diag(p) - torch.outer(p, p)) @ head)
    samples = g[0, :-1].pow(2)                       # the last position predicts nothing
    stderr = samples.std(dim=0) / (positions - 1) ** 0.5
    assert ((samples.mean(dim=0) - want).abs() < 6 * stderr).all()
    assert (g[0, -1] == 0).all()
    assert nll == pytest.approx(F.cross_entropy(h[0, :-1] @ head.t(), ids[1:], reduction="sum").item(), rel=1e-5)

    data, data_nll = _head_gradient(lambda x: x, head, h, ids)
    logits = (h[0, :-1] @ head.t())
    expected = (torch.softmax(logits, dim=-1) - F.one_hot(ids[1:], vocab)) @ head
    torch.testing.assert_close(data[0, :-1], expected, rtol=1e-4, atol=1e-6)
    assert data_nll == nll


def test_model_labels_do_not_depend_on_how_windows_are_grouped(stories_path):
    source = open_source(str(stories_path))
    runner = BlockRunner(source.config)
    linears = ["model.layers.0.mlp.down_proj", "model.layers.4.self_attn.q_proj"]
    windows = torch.randint(3, 512, (3, 48), generator=torch.Generator().manual_seed(0))
    pairs, _ = output_fisher(runner, source, windows, linears, at_once=2, labels="model", seed=3)
    alone, _ = output_fisher(runner, source, windows, linears, at_once=1, labels="model", seed=3)
    other, _ = output_fisher(runner, source, windows, linears, at_once=1, labels="model", seed=4)
    data, _ = output_fisher(runner, source, windows, linears, at_once=1)
    for name in linears:
        torch.testing.assert_close(pairs[name], alone[name], rtol=1e-5, atol=1e-12)
        assert not torch.equal(alone[name], other[name]) and not torch.equal(alone[name], data[name])

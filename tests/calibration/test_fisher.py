"""The streamed output Fisher (and the loss it is of) equals what autograd gives on the whole model."""
import pytest
import torch
import torch.nn.functional as F

from bitsmith.calibration.adapter import BlockRunner
from bitsmith.calibration.fisher import output_fisher
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

"""End-to-end tuning of the levels (bitsmith/quantize/tune.py): each layout's levels give back exactly the weight
its tensors hold, and a gradient reaches the levels only; the chunked KL is the whole-vocabulary KL with the same
gradient; tuning a small quantized model lowers its KL to the unquantized one and moves the levels only; the
resampled windows of later passes draw their tokens from the teacher's next-token distributions."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from bitsmith.layouts import layout_of
from bitsmith.plan import LayerPlan
from bitsmith.quantize import tune as tune_module
from bitsmith.quantize.column_bits import gptq_column_bits
from bitsmith.quantize.gptq import gptq_quantize
from bitsmith.quantize.lut import gptq_lut
from bitsmith.quantize.tune import TunedLinear, kl_backward, logsumexp, resampled, tune
from bitsmith.quantize.vq import gptq_vq

LAYERS = {
    "uniform": LayerPlan(3, 16, False),
    "uniform-sym": LayerPlan(4, -1, True),
    "outliers": LayerPlan(3, 16, False, outliers=0.05),
    "lut": LayerPlan(3, -1, False, lut=True),
    "per-ic": LayerPlan(3, 8, False, per_ic=True),
    "vq": LayerPlan(2, 16, False, vq=True),
    "column-bits": LayerPlan(3, 32, False, column_bits=True),
}


def quantized(layer: LayerPlan, out: int, inp: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    W, X = torch.randn(out, inp, generator=g) / 8, torch.randn(4 * inp, inp, generator=g)
    H = 2 * X.t() @ X / X.shape[0]
    if layer.lut:
        return W, gptq_lut(W, H, layer.bits, act_order=True)
    if layer.vq:
        return W, gptq_vq(W, H, layer.bits, layer.group_size, act_order=True)[0]
    if layer.column_bits:
        return W, gptq_column_bits(W, H, layer.bits, layer.group_size)
    return W, gptq_quantize(W, H, layer.bits, layer.group_size, layer.sym, act_order=True, outliers=layer.outliers,
                            per_ic=layer.per_ic)


@settings(max_examples=20, deadline=None)
@given(kind=st.sampled_from(sorted(LAYERS)), out=st.integers(1, 24), inp=st.integers(8, 70), seed=st.integers(0, 99))
def test_levels_give_back_the_stored_weight_exactly(kind, out, inp, seed):
    layer = LAYERS[kind]
    inp += inp % 2 if layer.vq else 0                              # codebooks code pairs of inputs
    _, qw = quantized(layer, out, inp, seed)
    layout = layout_of(layer)
    stored = layout.tensors(qw)
    levels = layout.levels(stored.__getitem__, layer, inp)
    assert all(part.name in stored and torch.equal(part.start, stored[part.name]) for part in levels.parts)
    assert torch.equal(levels.weight(*(part.start.float() for part in levels.parts)),
                       layout.weight(stored.__getitem__, layer, inp))
    module = TunedLinear(levels, None, torch.float32)
    assert module.stored().keys() == {part.name for part in levels.parts}
    assert all(torch.equal(value, stored[name]) for name, value in module.stored().items())
    x = torch.randn(3, inp)
    assert torch.allclose(module(x), x @ layout.weight(stored.__getitem__, layer, inp).t(), atol=1e-5)


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_gradient_reaches_the_levels_which_move_in_their_unit_and_the_outliers_stay(kind):
    layer = LAYERS[kind]
    _, qw = quantized(layer, 12, 48, 0)
    layout = layout_of(layer)
    stored = layout.tensors(qw)
    levels = layout.levels(stored.__getitem__, layer, 48)
    module = TunedLinear(levels, None, torch.float32)
    module(torch.randn(5, 48)).square().sum().backward()
    assert all(delta.grad is not None and delta.grad.abs().sum() > 0 for delta in module.deltas)
    with torch.no_grad():
        for delta in module.deltas:
            delta.fill_(0.25)
    for part in levels.parts:
        assert torch.equal(module.stored()[part.name], (part.start.float() + 0.25 * part.unit).half())
    if layer.vq:          # a quarter of each codebook coordinate's mean spacing; row scales move relative to themselves
        books, scales = levels.parts
        spacing = (books.start.float().amax(1, keepdim=True) - books.start.float().amin(1, keepdim=True)) \
            / (2 ** layer.bits - 1)
        assert (books.name, scales.name) == ("codebooks", "row_scales")
        assert torch.allclose(books.unit, spacing) and torch.equal(scales.unit, scales.start.float())
        before = layout.weight(stored.__getitem__, layer, 48)
        assert torch.allclose(levels.weight(books.start.float(), 1.1 * scales.start.float()), 1.1 * before, atol=1e-6)
        return
    (part,) = levels.parts
    if layer.lut:                                   # a quarter of each row's mean spacing
        spacing = (part.start[:, -1:].float() - part.start[:, :1].float()) / (2 ** layer.bits - 1)
        assert torch.allclose(part.unit, spacing)
        return
    assert torch.equal(part.unit, part.start.float())          # scales move relative to themselves
    after, before = levels.weight(1.1 * part.start.float()), layout.weight(stored.__getitem__, layer, 48)
    if layer.outliers:                       # the fp16 outliers are written over the grid, whatever its scale
        kept = qw.outliers.mask(48)
        assert torch.equal(after[kept], before[kept])
        assert torch.allclose(after[~kept], 1.1 * before[~kept], atol=1e-6)
    else:
        assert torch.allclose(after, 1.1 * before, atol=1e-6)


def test_chunked_kl_is_the_whole_kl_with_its_gradient(monkeypatch):
    monkeypatch.setattr(tune_module, "HEAD_CHUNK", 7)
    g = torch.Generator().manual_seed(0)
    head, teacher_head = nn.Linear(16, 50, bias=False), nn.Linear(16, 50, bias=False)
    hidden, teacher = torch.randn(30, 16, generator=g), torch.randn(30, 16, generator=g)
    leaf = hidden.clone().requires_grad_()
    loss = kl_backward(leaf, teacher, head, teacher_head, lambda: torch.autocast("cpu", enabled=False))
    whole = hidden.clone().requires_grad_()
    target = F.log_softmax(teacher_head(teacher), -1)
    expected = F.kl_div(F.log_softmax(head(whole), -1), target, log_target=True, reduction="batchmean")
    expected.backward()
    assert loss == pytest.approx(expected.item(), rel=1e-5)
    assert torch.allclose(leaf.grad, whole.grad, atol=1e-7)


class Toy(nn.Module):
    """Embedding, two tuned linears with a norm between them: a model small enough to tune here."""

    def __init__(self, linears, table):
        super().__init__()
        self.table, self.first, self.second = table, *linears
        self.norm = nn.RMSNorm(table.shape[1])

    def forward(self, ids):
        h = F.embedding(ids, self.table)
        return h + self.second(F.silu(self.first(self.norm(h))))


def test_tuning_lowers_the_kl_and_moves_only_the_levels_and_norms():
    g = torch.Generator().manual_seed(1)
    d, hidden, vocab = 32, 64, 40
    table, head = torch.randn(vocab, d, generator=g), torch.randn(vocab, d, generator=g) / 4
    weights = [torch.randn(hidden, d, generator=g) / 4, torch.randn(d, hidden, generator=g) / 6]
    layer = LayerPlan(2, 16, False)
    linears = []
    for W in weights:
        qw = gptq_quantize(W, torch.eye(W.shape[1]), 2, 16)
        stored = layout_of(layer).tensors(qw)
        linears.append(TunedLinear(layout_of(layer).levels(stored.__getitem__, layer, W.shape[1]), None, torch.float32))
    model = Toy(linears, table)
    windows = torch.randint(0, vocab, (16, 12), generator=g)
    with torch.no_grad():
        h = F.embedding(windows, table)
        teacher = h + F.linear(F.silu(F.linear(F.rms_norm(h, (d,)), weights[0])), weights[1])
    to_logits = lambda h: F.linear(h, head)
    start = [p.detach().clone() for p in model.parameters()]
    params = [delta for lin in linears for delta in lin.deltas] + [model.norm.weight]
    trace = tune(model, to_logits, to_logits, windows, teacher, params, epochs=6, lr=3e-2, batch=4)
    assert len(trace.losses) == 6 * 4
    assert sum(trace.losses[-4:]) < 0.7 * sum(trace.losses[:4])
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), start))
    assert torch.equal(model.table, table)
    assert tune(model, to_logits, to_logits, windows, teacher, params, epochs=0, lr=1e-3).losses == []
    with pytest.raises(ValueError, match="learning rate"):
        tune(model, to_logits, to_logits, windows, teacher, params, epochs=1, lr=0)


def test_saved_bytes_counts_what_the_backward_pass_keeps_once():
    """y = relu(x W^T) with W learning: the graph keeps x (for W's gradient) and relu's output (for its own); x
    saved by two products counts once; a graph with nothing to learn keeps nothing."""
    x = torch.randn(64, 32)
    W = torch.randn(16, 32, requires_grad=True)
    kept = tune_module.saved_bytes(lambda: torch.relu(F.linear(x, W)))
    assert kept == x.nbytes + 64 * 16 * 4
    assert tune_module.saved_bytes(lambda: F.linear(x, W) + F.linear(x, W * 2)) == x.nbytes
    assert tune_module.saved_bytes(lambda: torch.relu(x @ x.t())) == 0


@pytest.mark.parametrize("per_block, blocks, free, share, kept", [
    (100, 30, 10_000, 0.5, 30),        # all fit
    (100, 30, 1_000, 0.5, 5),          # half of the free memory holds five
    (100, 30, 150, 0.5, 0),            # none
    (0, 30, 0, 0.5, 30),               # nothing to keep
])
def test_kept_blocks_fit_in_the_share_of_free_memory(per_block, blocks, free, share, kept):
    assert tune_module.kept_blocks(per_block, blocks, free, share) == kept


def test_logsumexp_from_the_softmax_is_torchs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1000, generator=g) * torch.tensor([0.1, 5.0, 40.0]).repeat(22)[:64, None]
    assert torch.allclose(logsumexp(x, torch.softmax(x, -1)), torch.logsumexp(x, -1), rtol=0, atol=1e-5)


def test_resampled_tokens_are_the_teachers_draws_after_the_tokens_before():
    """Teacher states that put (almost) all mass on one next token: each replaced token is the one its predecessor's
    state proposes; about `share` of the tokens after the first are replaced, never the first; share 0 keeps all;
    the same seed, the same draw."""
    g = torch.Generator().manual_seed(0)
    vocab, n, seq = 50, 64, 160
    windows = torch.randint(0, vocab, (n, seq), generator=g)
    proposed = (windows + 1 + torch.randint(0, vocab - 1, (n, seq), generator=g)) % vocab    # never the token there
    teacher = 40.0 * F.one_hot(proposed, vocab).float()                                    # state i proposes i + 1
    head = lambda h: h
    ids = resampled(windows, teacher, head, 0.3, torch.Generator().manual_seed(5))
    changed = ids != windows
    assert not changed[:, 0].any()
    assert torch.equal(ids[:, 1:][changed[:, 1:]], proposed[:, :-1][changed[:, 1:]])
    assert float(changed[:, 1:].float().mean()) == pytest.approx(0.3, abs=0.02)
    assert torch.equal(ids, resampled(windows, teacher, head, 0.3, torch.Generator().manual_seed(5)))
    assert torch.equal(resampled(windows, teacher, head, 0.0, torch.Generator().manual_seed(5)), windows)


def test_later_passes_read_their_own_windows_and_targets():
    """Pass 1 reads the calibration windows, pass 2 the windows given for it with their targets, pass 3 (none
    given) the calibration windows again."""
    seen = []
    d, vocab = 8, 20
    g = torch.Generator().manual_seed(2)
    table = torch.randn(vocab, d, generator=g)
    scale = nn.Parameter(torch.ones(d))

    def body(ids):
        seen.append(ids.clone())
        return F.embedding(ids, table) * scale

    windows, other = torch.randint(0, vocab, (4, 6), generator=g), torch.randint(0, vocab, (4, 6), generator=g)
    head = lambda h: F.linear(h, table)
    targets = F.embedding(windows, table)
    tune(body, head, head, windows, targets, [scale], epochs=3, lr=1e-2, batch=2,
         later=[(other, F.embedding(other, table))])
    passes = [torch.cat(seen[i:i + 2]) for i in range(0, 6, 2)]
    for seen_rows, source in zip(passes, (windows, other, windows)):
        assert sorted(map(tuple, seen_rows.tolist())) == sorted(map(tuple, source.tolist()))

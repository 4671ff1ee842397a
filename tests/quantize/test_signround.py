"""Learned rounding and clipping per block (quantize/signround.py) on a real stories260K block."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from bitsmith.calibration import data
from bitsmith.calibration.adapter import BlockRunner
from bitsmith.calibration.hessian import Hessian
from bitsmith.formats.source import open_source
from bitsmith.layouts import layout_of
from bitsmith.plan import LayerPlan
from bitsmith.quantize import signround as signround_module
from bitsmith.quantize.gptq import gptq_quantize
from bitsmith.quantize.grid import fake_quantize
from bitsmith.quantize.lut import LutWeight, gptq_lut, nearest
from bitsmith.quantize.outliers import DenseSparseWeight
from bitsmith.quantize.per_ic import PerICWeight
from bitsmith.quantize.rtn import rtn_quantize
from bitsmith.quantize.signround import (
    LearnedCodebook,
    LearnedGrid,
    LearnedTable,
    block_mse,
    layer_output_error,
    signround,
)
from bitsmith.quantize.vq import VQWeight, gptq_vq, nearest_entries


@dataclasses.dataclass
class Block:
    module: torch.nn.Module
    inputs: torch.Tensor          # [n, seq, d] entering the block
    targets: torch.Tensor         # the unquantized block's outputs on them
    weights: dict                 # name -> unquantized [out, in]
    hessians: dict                # name -> H of its input
    kwargs: dict


@pytest.fixture(scope="module")
def stories_block(stories_path, text_dir):
    """Block 2 of stories260K with 12 windows of 64 tokens of TinyStories through blocks 0 and 1."""
    source = open_source(str(stories_path))
    runner = BlockRunner(source.config)
    ids = data.tokenize(source.tokenizer(), data.read_text([str(text_dir / "tinystories_calib.txt")]))
    hidden = F.embedding(data.random_windows(ids, 12, 64, seed=0), source.get(runner.family.embed).float())
    pos = runner.position_embeddings(hidden[:1])
    for i in range(3):
        block = runner.build_block(i, {n: source.get(n) for n in runner.block_names(i)})
        if i < 2:
            hidden = runner.forward_block(block, hidden, pos)
    hessians = {name: Hessian(block.get_submodule(name).in_features) for name in runner.family.linears}
    hooks = [block.get_submodule(name).register_forward_pre_hook(lambda m, a, h=h: h.add(a[0]))
             for name, h in hessians.items()]
    targets = runner.forward_block(block, hidden, pos)
    for hook in hooks:
        hook.remove()
    weights = {name: block.get_submodule(name).weight.data.clone() for name in runner.family.linears}
    return Block(block, hidden, targets, weights, {n: h.H for n, h in hessians.items()}, runner.block_kwargs(pos))


def gptq_starts(b: Block, bits: int, group: int, sym: bool = False, act_order: bool = True, outliers: float = 0.0):
    return {name: gptq_quantize(W, b.hessians[name], bits, group, sym, act_order, mse=True, outliers=outliers)
            for name, W in b.weights.items()}


def error(b: Block, weights: dict) -> float:
    return block_mse(b.module, {name: qw.Q for name, qw in weights.items()}, b.inputs, b.targets, **b.kwargs)


@pytest.mark.parametrize("relative_to", ["gptq", "rtn"])
def test_learned_rounding_lowers_the_block_error_below_gptq(stories_block, relative_to):
    """Full-batch iterations: the kept iteration is the one of least error on the calibration windows, and the
    start (V = 0) is among them for a start relative to GPTQ; learning must improve on GPTQ clearly."""
    b = stories_block
    starts = gptq_starts(b, 3, 32)
    refined, trace = signround(b.module, b.inputs, b.targets, b.weights, starts, 40, batch=len(b.inputs),
                               relative_to=relative_to, **b.kwargs)
    before, after = error(b, starts), error(b, refined)
    assert after <= before
    assert after < 0.9 * before
    assert trace.losses[trace.best] == min(trace.losses)
    if relative_to == "gptq":
        assert trace.losses[0] == pytest.approx(before, rel=1e-5)      # iteration 0 evaluates the start itself
    assert abs(trace.losses[trace.best] - after) <= 1e-5 * after         # the kept weights are those evaluated
    for name, qw in refined.items():                                   # the layer errors move, the block's falls
        assert layer_output_error(b.weights[name], qw.Q, b.hessians[name]) > 0


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("group", [32, 64, 128, -1])
@pytest.mark.parametrize("sym", [False, True])
def test_every_configuration_keeps_its_layout(stories_block, bits, group, sym):
    """Codes in range, finite fp16 scales, zero points on the grid, the start's group index, and the stored
    tensors load as exactly Q (down_proj has 172 inputs: groups of 64 and 128 end in a partial group)."""
    b = stories_block
    starts = gptq_starts(b, bits, group, sym)
    refined, _ = signround(b.module, b.inputs, b.targets, b.weights, starts, 4, batch=4, seed=1, **b.kwargs)
    maxq = 2 ** bits - 1
    for name, qw in refined.items():
        start = starts[name]
        assert type(qw) is type(start) and (qw.bits, qw.group_size, qw.sym) == (bits, group, sym)
        assert qw.codes.dtype == torch.uint8 and int(qw.codes.max()) <= maxq
        assert qw.scales.dtype == torch.float16 and qw.scales.shape == start.scales.shape
        assert torch.isfinite(qw.scales).all() and (qw.scales > 0).all()
        assert qw.zeros.dtype == torch.int32 and 1 <= int(qw.zeros.min()) and int(qw.zeros.max()) <= maxq
        if sym:
            assert torch.equal(qw.zeros, start.zeros)
        assert (qw.g_idx is None) == (start.g_idx is None)
        assert qw.g_idx is None or torch.equal(qw.g_idx, start.g_idx)
        g = qw.group_index().long()
        assert torch.equal(fake_quantize(qw.codes, qw.scales[g].t(), qw.zeros[g].t()), qw.Q)
        layer = LayerPlan(bits, group, sym)
        stored = layout_of(layer).tensors(qw)
        assert torch.equal(layout_of(layer).weight(stored.__getitem__, layer, b.weights[name].shape[1]), qw.Q)


@pytest.mark.parametrize("bits,group,sym,act_order", [(3, 32, False, True), (4, -1, True, False), (2, 64, False, False),
                                                      (8, 128, True, True)])
def test_the_untrained_grid_is_the_start_exactly(stories_block, bits, group, sym, act_order):
    """V = 0, a = b = 1 reproduces GPTQ's codes and grid bit for bit (relative to GPTQ), and RTN's on GPTQ's grid
    (relative to RTN); zero iterations return the starts themselves."""
    b = stories_block
    starts = gptq_starts(b, bits, group, sym, act_order)
    for name, start in starts.items():
        same = LearnedGrid(b.weights[name], start, "gptq").result()
        for field in ("codes", "scales", "zeros", "Q"):
            assert torch.equal(getattr(same, field), getattr(start, field)), field
        rtn = LearnedGrid(b.weights[name], start, "rtn").result()
        g = start.group_index().long()
        nearest = torch.round(b.weights[name] / start.scales[g].t().float()).add(start.zeros[g].t()).clamp(0, 2 ** bits - 1)
        assert torch.equal(rtn.codes, nearest.to(torch.uint8))
    unchanged, trace = signround(b.module, b.inputs, b.targets, b.weights, starts, 0, **b.kwargs)
    assert trace.losses == [] and all(unchanged[name] is starts[name] for name in starts)


def test_a_run_too_short_to_beat_the_start_returns_it(stories_block):
    """One iteration from round-to-nearest (a full step of 1) cannot beat GPTQ: the check minibatch says so."""
    b = stories_block
    starts = gptq_starts(b, 3, 32)
    kept, trace = signround(b.module, b.inputs, b.targets, b.weights, starts, 1, batch=len(b.inputs), **b.kwargs)
    assert trace.kept_start and trace.check[0] < trace.check[1]
    assert all(kept[name] is starts[name] for name in starts)


def test_an_rtn_start_is_refined_too(stories_block):
    b = stories_block
    starts = {name: rtn_quantize(W, 3, 32) for name, W in b.weights.items()}
    refined, _ = signround(b.module, b.inputs, b.targets, b.weights, starts, 30, batch=len(b.inputs), **b.kwargs)
    assert error(b, refined) < 0.8 * error(b, starts)


@pytest.mark.parametrize("group", [16, -1])
def test_per_input_channel_grids_are_learned_in_their_layout(stories_block, group):
    """Starts with grids per input channel (groups of 16 rows: partial at 172 outputs; or all rows) keep that
    layout, load as exactly Q, start from GPTQ's result untrained, and the block error falls."""
    b = stories_block
    starts = {name: gptq_quantize(W, b.hessians[name], 3, group, act_order=True, mse=True, per_ic=True)
              for name, W in b.weights.items()}
    for name, start in starts.items():
        same = LearnedGrid(b.weights[name], start, "gptq").result()
        assert all(torch.equal(getattr(same, f), getattr(start, f)) for f in ("codes", "scales", "zeros", "Q"))
    refined, trace = signround(b.module, b.inputs, b.targets, b.weights, starts, 30, batch=len(b.inputs), **b.kwargs)
    assert not trace.kept_start and error(b, refined) < error(b, starts)
    layer = LayerPlan(3, group, False, per_ic=True)
    assert any(not torch.equal(qw.scales, starts[name].scales) for name, qw in refined.items())   # clipping learned
    for name, qw in refined.items():
        assert isinstance(qw, PerICWeight) and qw.scales.shape == starts[name].scales.shape
        stored = layout_of(layer).tensors(qw)
        assert torch.equal(layout_of(layer).weight(stored.__getitem__, layer, qw.codes.shape[1]), qw.Q)


def test_outliers_stay_in_fp16_where_they_are(stories_block):
    b = stories_block
    starts = gptq_starts(b, 3, 32, outliers=0.03)
    refined, trace = signround(b.module, b.inputs, b.targets, b.weights, starts, 40, batch=len(b.inputs), **b.kwargs)
    assert not trace.kept_start and error(b, refined) < error(b, starts)
    for name, qw in refined.items():
        start = starts[name]
        assert isinstance(qw, DenseSparseWeight) and qw.outliers is start.outliers
        mask = start.outliers.mask(qw.codes.shape[1])
        assert mask.sum() > 0 and torch.equal(qw.Q[mask], start.Q[mask])
        g = qw.group_index().long()
        assert torch.equal(qw.codes[mask].int(), qw.zeros[g].t()[mask])     # zero points: the dense part is 0 there
        layer = LayerPlan(3, 32, False, outliers=0.03)
        stored = layout_of(layer).tensors(qw)
        assert torch.equal(layout_of(layer).weight(stored.__getitem__, layer, qw.codes.shape[1]), qw.Q)


def lut_starts(b: Block, bits: int) -> dict:
    return {name: gptq_lut(W, b.hessians[name], bits, act_order=True) for name, W in b.weights.items()}


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_the_untrained_table_is_the_start_exactly(stories_block, bits):
    """V = 0 and the start's centroids give GPTQ's codes bit for bit (relative to GPTQ), and every weight's
    nearest centroid (relative to RTN)."""
    b = stories_block
    for name, start in lut_starts(b, bits).items():
        same = LearnedTable(b.weights[name], start, "gptq").result()
        for field in ("codes", "lut", "Q"):
            assert torch.equal(getattr(same, field), getattr(start, field)), field
        rtn = LearnedTable(b.weights[name], start, "rtn").result()
        assert torch.equal(rtn.codes, nearest(b.weights[name], start.lut.float()).to(torch.uint8))
        assert torch.equal(rtn.lut, start.lut)


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("relative_to", ["gptq", "rtn"])
def test_learned_tables_lower_the_block_error_in_their_layout(stories_block, bits, relative_to):
    """Lookup-table starts learn their offsets and centroids: the block error falls below GPTQ's tables, the
    centroids move (ascending fp16, at most about half a mean spacing: 41/80 of it), and the stored tensors load as exactly Q."""
    b = stories_block
    starts = lut_starts(b, bits)
    refined, trace = signround(b.module, b.inputs, b.targets, b.weights, starts, 40, batch=len(b.inputs),
                               relative_to=relative_to, **b.kwargs)
    assert not trace.kept_start and error(b, refined) < 0.95 * error(b, starts)
    layer = LayerPlan(bits, -1, False, lut=True)
    assert any(not torch.equal(qw.lut, starts[name].lut) for name, qw in refined.items())
    for name, qw in refined.items():
        start = starts[name]
        assert isinstance(qw, LutWeight) and qw.bits == bits and qw.lut.dtype == torch.float16
        assert qw.lut.shape == start.lut.shape and bool((qw.lut[:, 1:] >= qw.lut[:, :-1]).all())
        spacing = (start.lut[:, -1:].float() - start.lut[:, :1].float()) / (2 ** bits - 1)
        travel = 41 / 80 * spacing                        # 40 signed steps of spacing / 40, decayed linearly
        assert bool(((qw.lut.float() - start.lut.float()).abs() <= travel + 1e-3).all())
        assert torch.equal(qw.Q, qw.lut.float().gather(1, qw.codes.long()))
        stored = layout_of(layer).tensors(qw)
        assert torch.equal(layout_of(layer).weight(stored.__getitem__, layer, qw.codes.shape[1]), qw.Q)


def test_tables_and_grids_learn_together(stories_block):
    """A block whose MLP has lookup tables and whose attention has uniform grids (a mixed plan) is refined as
    one: each linear keeps its own form."""
    b = stories_block
    tables, grids = lut_starts(b, 3), gptq_starts(b, 3, 32)
    starts = {name: (tables if name.startswith("mlp.") else grids)[name] for name in b.weights}
    refined, trace = signround(b.module, b.inputs, b.targets, b.weights, starts, 30, batch=len(b.inputs), **b.kwargs)
    assert not trace.kept_start and error(b, refined) < error(b, starts)
    assert all(type(refined[name]) is type(start) for name, start in starts.items())


def vq_starts(b: Block, bits: int, group: int) -> dict:
    return {name: gptq_vq(W, b.hessians[name], bits, group, act_order=True)[0] for name, W in b.weights.items()}


def test_codebooks_learn_their_levels_and_keep_their_codes(stories_block):
    """By default codebook starts keep GPTQ's codes and learn their codebooks and row scales: untrained, the start
    exactly; trained, a lower block error in the same layout, the stored tensors loading as exactly Q."""
    b = stories_block
    starts = vq_starts(b, 2, 32)
    refined = learn_codebooks(b, starts)
    assert any(not torch.equal(qw.codebooks, starts[name].codebooks) for name, qw in refined.items())
    check_codebooks_load(refined)
    assert all(torch.equal(qw.codes, starts[name].codes) for name, qw in refined.items())


def learn_codebooks(b: Block, starts: dict) -> dict:
    """SignRound on codebook starts: untrained, each the start exactly; trained, a lower block error."""
    for name, start in starts.items():
        same = LearnedCodebook(b.weights[name], start).result()
        assert all(torch.equal(getattr(same, f), getattr(start, f)) for f in ("codes", "codebooks", "scales", "Q"))
    refined, trace = signround(b.module, b.inputs, b.targets, b.weights, starts, 30, batch=len(b.inputs), **b.kwargs)
    assert not trace.kept_start and error(b, refined) < 0.95 * error(b, starts)
    return refined


def check_codebooks_load(refined: dict) -> None:
    layer = LayerPlan(2, 32, False, vq=True)
    for qw in refined.values():
        assert isinstance(qw, VQWeight)
        assert qw.codebooks.dtype == qw.scales.dtype == torch.float16
        stored = layout_of(layer).tensors(qw)
        assert torch.equal(layout_of(layer).weight(stored.__getitem__, layer, 2 * qw.codes.shape[1]), qw.Q)


def test_codebook_codes_learn_when_asked(stories_block, monkeypatch):
    """With CODE_CANDIDATES > 0 the codes learn too, from GPTQ's: untrained, the start exactly; trained, some codes
    moved, a lower block error than the start's, the same layout."""
    monkeypatch.setattr(signround_module, "CODE_CANDIDATES", 4)
    b = stories_block
    starts = vq_starts(b, 2, 32)
    refined = learn_codebooks(b, starts)
    assert any(not torch.equal(qw.codes, starts[name].codes) for name, qw in refined.items())
    check_codebooks_load(refined)


def test_codebook_codes_move_only_among_the_nearest_entries(stories_block, monkeypatch):
    """With the offsets at their bounds the chosen entry is still one of the pair's 4 nearest in the start's book,
    and the choice is the nearest of those to the moved point (checked against a search of all)."""
    monkeypatch.setattr(signround_module, "CODE_CANDIDATES", 4)
    b = stories_block
    name, W = "mlp.down_proj", b.weights["mlp.down_proj"]
    start = vq_starts(b, 2, 32)[name]
    learned_ = LearnedCodebook(W, start)
    with torch.no_grad():
        learned_.V.copy_(torch.rand(learned_.V.shape, generator=torch.Generator().manual_seed(0)) - 0.5)
    books, scales = start.codebooks.float(), start.scales.float()
    chosen = learned_.weight_index(books, scales)[:, 0::2] // 2                        # flat entries g K + k
    assert (learned_.candidates == chosen[..., None]).any(dim=2).all()
    assert learned_.candidates.shape[2] == 4
    target = learned_.R / scales[:, None, None] + learned_.V * learned_.unit
    flat = books.reshape(-1, 2)
    best = (target[:, :, None, :] - flat[learned_.candidates]).square().sum(3).amin(dim=2)
    assert torch.equal((target - flat[chosen]).square().sum(2), best)
    moved = (chosen != learned_.candidates[..., 0]).float().mean()
    assert 0.05 < moved < 0.95                       # half-spacing offsets move some pairs, not all


def test_nearest_entries_are_the_nearest():
    g = torch.Generator().manual_seed(1)
    books, X = torch.randn(3, 16, 2, generator=g), torch.randn(5, 12, 2, generator=g)     # 8 inputs per book
    found = nearest_entries(X, books, 8, 3)
    for o in range(5):
        for p in range(12):
            block = p * 2 // 8
            dist = (X[o, p] - books[block]).square().sum(1)
            assert found[o, p].tolist() == (torch.argsort(dist)[:3] + block * 16).tolist()


def test_same_inputs_same_result(stories_block):
    b = stories_block
    starts = gptq_starts(b, 3, 64)
    runs = [signround(b.module, b.inputs, b.targets, b.weights, starts, 6, batch=4, seed=3, **b.kwargs)[0]
            for _ in range(2)]
    assert all(torch.equal(runs[0][n].codes, runs[1][n].codes) and torch.equal(runs[0][n].scales, runs[1][n].scales)
               for n in starts)
    assert all(p.requires_grad for p in b.module.parameters())          # the block is left as it was


def test_layer_output_error_is_the_mean_squared_output_error():
    g = torch.Generator().manual_seed(0)
    W, Q, X = torch.randn(6, 16, generator=g), torch.randn(6, 16, generator=g), torch.randn(100, 16, generator=g)
    h = Hessian(16)
    h.add(X)
    assert layer_output_error(W, Q, h.H) == pytest.approx(((W - Q) @ X.t()).square().sum().item() / 100, rel=1e-4)

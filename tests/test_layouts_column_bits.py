"""The layout of bits per group of columns (bitsmith/layouts.py `ColumnBitsLayout`): its stored size is the bytes it
writes whatever the widths, its module reproduces Q, its configuration entries are checked and a checkpoint whose
groups do not fit its words is refused; end to end on stories260K, a plan with it in the MLP is quantized, loaded
(the quantize-time perplexity again), verified and inspected (there, with 2 to 5 groups of 32 columns a linear,
no group's loss is 3.9 times another's, so every width stays 3: the mixed widths are tested on matrices above)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from plan_support import (
    STORIES_WEIGHTS,
    check_loaded_and_inspected,
    check_module_reproduces,
    linear_names,
    nbits,
    quantize_planned,
    written_bits,
)
from safetensors import safe_open

from bitsmith.formats.errors import InputError
from bitsmith.formats.packing import pack
from bitsmith.kernels.column_bits_linear import ColumnBitsLinear
from bitsmith.layouts import ColumnBitsLayout, layer_plan, layout_of
from bitsmith.plan import LayerPlan, check_layer
from bitsmith.quantize.column_bits import gptq_column_bits
from bitsmith.quantize.rtn import ColumnBitsWeight
from bitsmith.quantize.signround import learned


def random_column_bits(out: int, inp: int, bits: int, group: int, pairs: int, seed: int) -> ColumnBitsWeight:
    """Random codes and grids, `pairs` whole groups raised and as many lowered, columns in a random order."""
    g = torch.Generator().manual_seed(seed)
    groups, full = -(-inp // group), inp // group
    widths = torch.full((groups,), bits)
    order = torch.randperm(full, generator=g)
    widths[order[:pairs]], widths[order[pairs:2 * pairs]] = bits + 1, bits - 1
    g_idx = (torch.arange(inp) // group)[torch.randperm(inp, generator=g)].to(torch.int32)
    top = (2 ** widths[g_idx.long()]).expand(out, inp)
    codes = (torch.rand(out, inp, generator=g) * top).long().to(torch.uint8)
    zeros = torch.stack([torch.randint(1, 2 ** int(w), (out,), generator=g) for w in widths]).to(torch.int32)
    scales = (torch.rand(groups, out, generator=g) + 0.01).half()
    Q = scales.float()[g_idx.long()].t() * (codes.float() - zeros.float()[g_idx.long()].t())
    return ColumnBitsWeight(codes, scales, zeros, g_idx, bits, group, False, Q, widths=widths)


@settings(max_examples=30, deadline=None)
@given(out=st.integers(1, 40), inp=st.integers(1, 300), bits=st.sampled_from([3, 4, 5]),
       group=st.sampled_from([32, 64, 128]), pairs=st.integers(0, 4), seed=st.integers(0, 99))
def test_stored_bits_is_the_size_of_what_is_written_and_the_weight_is_Q(out, inp, bits, group, pairs, seed):
    pairs = min(pairs, inp // group // 2)
    qw = random_column_bits(out, inp, bits, group, pairs, seed)
    layer = LayerPlan(bits, group, False, column_bits=True)
    assert layout_of(layer) is ColumnBitsLayout
    tensors = ColumnBitsLayout.tensors(qw)
    assert sorted(tensors) == sorted(ColumnBitsLayout.parts)
    assert ColumnBitsLayout.stored_bits(out, inp, layer) == nbits(tensors)       # whatever the widths
    assert torch.equal(ColumnBitsLayout.weight(tensors.__getitem__, layer, inp), qw.Q)


@pytest.mark.parametrize("bits, group", [(3, 32), (4, 64), (5, 32)])
def test_module_reproduces_Q(bits, group):
    g = torch.Generator().manual_seed(bits)
    X = torch.randn(512, 192, generator=g) * torch.logspace(0, 1.5, 192)
    W = 0.05 * torch.randn(40, 192, generator=g)
    qw = gptq_column_bits(W, 2 * X.t() @ X / 512, bits, group)
    assert len(set(qw.widths.tolist())) > 1
    check_module_reproduces(qw, LayerPlan(bits, group, False, column_bits=True), ColumnBitsLinear, bits)


def test_signround_starts_from_gptq_exactly_and_keeps_every_code_within_its_width():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(256, 128, generator=g) * torch.logspace(0, 1.5, 128)
    W = 0.05 * torch.randn(16, 128, generator=g)
    qw = gptq_column_bits(W, 2 * X.t() @ X / 256, 3, 32)
    grid = learned(W, qw, "gptq")
    assert torch.equal(grid(), qw.Q) and torch.equal(grid.result().Q, qw.Q)
    with torch.no_grad():
        grid.V.fill_(0.5)                                            # every code one step up where it can go
        grid.a.fill_(0.7)
    moved = grid.result()
    top = 2 ** moved.widths[moved.group_index().long()] - 1
    assert (moved.codes.long() <= top).all() and (moved.codes.long() == top).any()
    assert torch.equal(moved.widths, qw.widths)


@pytest.mark.parametrize("entry, message", [
    ({"bits": 3, "group_size": 128, "sym": False, "column_bits": 1}, "column_bits 1"),
    ({"bits": 2, "group_size": 128, "sym": False, "column_bits": True}, "column_bits around 2 bits"),
    ({"bits": 3, "group_size": 128, "sym": True, "column_bits": True}, "symmetry"),
    ({"bits": 3, "group_size": 48, "sym": False, "column_bits": True}, "multiple of 32"),
    ({"bits": 3, "group_size": -1, "sym": False, "column_bits": True}, "multiple of 32"),
])
def test_column_bits_entries_of_a_checkpoint_are_checked(entry, message):
    with pytest.raises(InputError, match=message):
        layer_plan(entry, "ckpt: model.layers.0.mlp.up_proj")


def test_plan_entries_with_column_bits_need_gptq():
    with pytest.raises(InputError, match="column_bits needs --method gptq"):
        check_layer(LayerPlan(3, 128, False, column_bits=True), "model.layers.0.mlp.up_proj", 256, "rtn")


def test_stored_groups_that_do_not_fit_their_words_are_refused_at_load():
    qw = random_column_bits(8, 256, 3, 64, 1, 0)
    layer = LayerPlan(3, 64, False, column_bits=True)
    module = ColumnBitsLayout.module(256, 8, layer, bias=False)
    good = ColumnBitsLayout.tensors(qw)
    narrow = int((qw.widths == 2).nonzero()[0])                     # a 2-bit group: zero points up to 3
    zeros = qw.zeros.clone()
    zeros[narrow, 0] = 7
    for change, message in (({"widths": torch.full((4,), 4, dtype=torch.uint8)}, "its groups' widths take"),
                            ({"widths": torch.tensor([5, 3, 2, 2], dtype=torch.uint8)}, "at most 4"),
                            ({"widths": qw.widths.float()}, "must be integers"),
                            ({"g_idx": torch.full((256,), 7, dtype=torch.int32)}, "outside 0..3"),
                            ({"qzeros": pack(zeros, 4, dim=1)}, "past its group's grid")):
        with pytest.raises(InputError, match=message):
            module.load_state_dict({**good, **change}, assign=True)              # as the loader loads
    with pytest.raises(RuntimeError, match="size mismatch for g_idx"):        # the loader's one line names it
        module.load_state_dict({**good, "g_idx": good["g_idx"][:-1]}, assign=True)
    module.load_state_dict(good, assign=True)
    assert torch.equal(module.dequantize(), qw.Q)
    with pytest.raises(ValueError, match="past its group's grid"):
        ColumnBitsLayout.tensors(ColumnBitsWeight(**{**qw.__dict__, "zeros": zeros}))


# ---------------------------------------------------------------------------------------------------
# End to end on stories260K.


@pytest.mark.slow
def test_a_plan_with_column_bits_end_to_end(tmp_path, stories_path, stories_split):
    special = {name for name in linear_names(stories_path) if ".mlp." in name}
    out, summary = quantize_planned(tmp_path, stories_path, stories_split, lambda name: {
        "bits": 3, "group_size": 32, "sym": False, **({"column_bits": True} if name in special else {})})
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert {k[:-len(".widths")] for k in f.keys() if k.endswith(".widths")} == special
        widths = {name: f.get_tensor(f"{name}.widths").tolist() for name in special}
    assert all(sum(w) == 3 * len(w) and set(w) <= {2, 3, 4} for w in widths.values())   # as many up as down
    written = written_bits(out, ("qweight", "scales", "qzeros", "g_idx", "widths"))
    assert summary["bits_per_weight"] == pytest.approx(written / STORIES_WEIGHTS, abs=1e-12)
    check_loaded_and_inspected(tmp_path, out, summary, stories_split[1], special, ColumnBitsLinear, "column_bits",
                               "cb32")

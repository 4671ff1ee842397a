"""The codebook layout (bitsmith/layouts.py `VQLayout`): its stored size is the bytes it writes, its module
reproduces Q, its configuration entries are checked; end to end on stories260K, a plan with codebooks of pairs in
the MLP is quantized, loaded (the quantize-time perplexity again), verified and inspected."""
import json

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
from bitsmith.kernels.vq_linear import VQLinear, vq_table
from bitsmith.layouts import VQLayout, layer_plan, layout_of
from bitsmith.plan import LayerPlan, check_layer
from bitsmith.quantize.vq import VQWeight, dequantize, entries, gptq_vq


def random_vq(out: int, inp: int, bits: int, group: int, seed: int) -> VQWeight:
    g = torch.Generator().manual_seed(seed)
    blocks = -(-inp // (inp if group == -1 else group))
    codes = torch.randint(0, entries(bits), (out, inp // 2), generator=g).to(torch.uint8)
    books = torch.randn(blocks, entries(bits), 2, generator=g).half()
    scales = (torch.rand(out, generator=g) + 0.01).half()
    return VQWeight(codes, books, scales, bits, group, dequantize(codes, books, scales, group))


@settings(max_examples=30, deadline=None)
@given(out=st.integers(1, 40), pairs=st.integers(1, 70), bits=st.sampled_from([2, 2.5, 3, 3.5, 4]),
       group=st.sampled_from([-1, 2, 16, 32, 128]), seed=st.integers(0, 99))
def test_stored_bits_is_the_size_of_what_is_written_and_the_weight_is_Q(out, pairs, bits, group, seed):
    inp = 2 * pairs
    qw = random_vq(out, inp, bits, group, seed)
    layer = LayerPlan(bits, group, False, vq=True)
    assert layout_of(layer) is VQLayout
    tensors = VQLayout.tensors(qw)
    assert sorted(tensors) == sorted(VQLayout.parts)
    assert VQLayout.stored_bits(out, inp, layer) == nbits(tensors)
    assert torch.equal(VQLayout.weight(tensors.__getitem__, layer, inp), qw.Q)
    codes, table = vq_table(*(tensors[p] for p in VQLayout.parts), bits, inp, group)
    assert torch.equal(table.gather(1, codes), qw.Q)                     # the CPU decode form's table holds W


@pytest.mark.parametrize("bits, group", [(2, 16), (2.5, 64), (3, 32), (3.5, 16), (4, -1)])
def test_module_reproduces_Q(bits, group):
    g = torch.Generator().manual_seed(int(2 * bits))
    W, X = 0.05 * torch.randn(40, 80, generator=g), torch.randn(256, 80, generator=g)
    qw, _ = gptq_vq(W, 2 * X.t() @ X / 256, bits, group, act_order=True)
    check_module_reproduces(qw, LayerPlan(bits, group, False, vq=True), VQLinear, int(2 * bits))


@pytest.mark.parametrize("entry, message", [
    ({"bits": 3, "group_size": 128, "sym": False, "vq": "yes"}, "vq 'yes'"),
    ({"bits": 3, "group_size": 128, "sym": False, "vq": True, "outliers": 0.01}, "vq keeps no outliers"),
    ({"bits": 8, "group_size": 128, "sym": False, "vq": True}, "vq with 8 bits: choose one of 2, 2.5, 3, 3.5, 4"),
    ({"bits": 3.25, "group_size": 128, "sym": False, "vq": True}, "unsupported bits 3.25"),
    ({"bits": 3.5, "group_size": 128, "sym": False}, "unsupported bits 3.5"),
    ({"bits": "3.5", "group_size": 128, "sym": False, "vq": True}, "unsupported bits '3.5'"),
    ({"bits": 3, "group_size": 65, "sym": False, "vq": True}, "group size 65 must be even"),
])
def test_codebook_entries_of_a_checkpoint_are_checked(entry, message):
    with pytest.raises(InputError, match=message):
        layer_plan(entry, "ckpt: model.layers.0.mlp.up_proj")


@pytest.mark.parametrize("layer, inp, method, message", [
    (LayerPlan(3, 128, False, vq=True), 63, "gptq", "must be even"),
    (LayerPlan(3, 127, False, vq=True), 256, "gptq", "must be even"),
    (LayerPlan(5, 128, False, vq=True), 256, "gptq", "vq with 5 bits"),
    (LayerPlan(3.5, 128, False), 256, "gptq", "3.5 bits: half bits are codebooks' only"),
    (LayerPlan(3, 128, True, vq=True), 256, "gptq", "symmetry"),
    (LayerPlan(3, 128, False, vq=True), 256, "rtn", "needs --method gptq"),
])
def test_plan_entries_with_codebooks_are_checked(layer, inp, method, message):
    with pytest.raises(InputError, match=message):
        check_layer(layer, "model.layers.0.mlp.up_proj", inp, method)


# ---------------------------------------------------------------------------------------------------
# End to end on stories260K.


@pytest.mark.slow
def test_a_plan_with_codebooks_end_to_end(tmp_path, stories_path, stories_split):
    """The MLP's codebooks at whole and half bits: gate/up at 3.5 (indices of 7 bits), down at 2.5 (5 bits)."""
    vq = {name for name in linear_names(stories_path) if ".mlp." in name}
    vq_bits = {name: 2.5 if "down" in name else 3.5 for name in vq}
    out, summary = quantize_planned(tmp_path, stories_path, stories_split, lambda name: {
        "bits": 3, "group_size": 32, "sym": False,
        **({"vq": True, "group_size": 64, "bits": vq_bits[name]} if name in vq else {})})
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert {k[:-len(".codebooks")] for k in f.keys() if k.endswith(".codebooks")} == vq
        assert all(f.get_slice(f"{name}.codebooks").get_shape()[1:] == [entries(vq_bits[name]), 2] for name in vq)
    written = written_bits(out, ("qweight", "scales", "qzeros", "g_idx", "codebooks", "row_scales"))
    assert summary["bits_per_weight"] == pytest.approx(written / STORIES_WEIGHTS, abs=1e-12)
    check_loaded_and_inspected(tmp_path, out, summary, stories_split[1], vq, VQLinear, "vq", "vq64")
    rows = {row["name"]: row for row in json.loads((tmp_path / "inspect.json").read_text())["layers"]}
    assert {name: rows[name]["bits"] for name in vq} == vq_bits                  # the half bits as planned

"""The lookup-table layout (bitsmith/layouts.py `LUTLayout`): its stored size is the bytes it writes, its module
reproduces Q, its configuration entries round-trip; end to end on stories260K, a plan with tables in the MLPs is
quantized, loaded (the quantize-time perplexity again), verified and inspected."""
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from plan_support import (
    CALIB,
    EVAL_TOKENS,
    STORIES_WEIGHTS,
    check_loaded_and_inspected,
    check_module_reproduces,
    cli,
    linear_names,
    nbits,
    quantize_planned,
    written_bits,
)
from safetensors import safe_open

from bitsmith.calibration.adapter import BlockRunner
from bitsmith.formats.errors import InputError
from bitsmith.formats.source import open_source
from bitsmith.kernels.lut_linear import LUTLinear
from bitsmith.layouts import LUTLayout, layer_plan, layout_of
from bitsmith.pipeline import linear_shapes
from bitsmith.plan import LayerPlan
from bitsmith.quantize.lut import LutWeight, gptq_lut


@settings(max_examples=30, deadline=None)
@given(out=st.integers(1, 40), inp=st.integers(1, 200), bits=st.sampled_from([2, 3, 4]), seed=st.integers(0, 99))
def test_stored_bits_is_the_size_of_what_is_written_and_the_weight_is_Q(out, inp, bits, seed):
    g = torch.Generator().manual_seed(seed)
    lut = torch.sort(torch.randn(out, 2 ** bits, generator=g), dim=1).values.half()
    codes = torch.randint(0, 2 ** bits, (out, inp), generator=g, dtype=torch.uint8)
    qw = LutWeight(codes, lut, bits, lut.float().gather(1, codes.long()))
    layer = LayerPlan(bits, -1, False, lut=True)
    assert layout_of(layer) is LUTLayout
    tensors = LUTLayout.tensors(qw)
    assert sorted(tensors) == sorted(LUTLayout.parts)
    assert LUTLayout.stored_bits(out, inp, layer) == nbits(tensors)
    assert torch.equal(LUTLayout.weight(tensors.__getitem__, layer, inp), qw.Q)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_module_reproduces_Q(bits):
    g = torch.Generator().manual_seed(bits)
    W, X = 0.05 * torch.randn(24, 80, generator=g), torch.randn(256, 80, generator=g)
    qw = gptq_lut(W, 2 * X.t() @ X / 256, bits, act_order=True)
    check_module_reproduces(qw, LayerPlan(bits, -1, False, lut=True), LUTLinear, bits)

@pytest.mark.parametrize("entry, message", [
    ({"bits": 8, "group_size": -1, "sym": False, "lut": True}, "lut with 8 bits: choose one of 2, 3, 4"),
    ({"bits": 3, "group_size": 64, "sym": False, "lut": True}, "group_size -1"),
    ({"bits": 3, "group_size": -1, "sym": False, "lut": 1}, "lut 1"),
])
def test_table_entries_of_a_checkpoint_are_checked(entry, message):
    with pytest.raises(InputError, match=message):
        layer_plan(entry, "ckpt: model.layers.0.mlp.up_proj")


# ---------------------------------------------------------------------------------------------------
# End to end on stories260K.



def test_a_plan_with_lookup_tables_end_to_end(tmp_path, stories_path, stories_split):
    tables = {name for name in linear_names(stories_path) if ".mlp." in name}
    out, summary = quantize_planned(tmp_path, stories_path, stories_split, lambda name: (
        {"bits": 3, "group_size": -1, "sym": False, "lut": True} if name in tables else
        {"bits": 3, "group_size": 32, "sym": False}))
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert {k[:-len(".lut")] for k in f.keys() if k.endswith(".lut")} == tables
    written = written_bits(out, ("qweight", "scales", "qzeros", "g_idx", "lut"))
    assert summary["bits_per_weight"] == pytest.approx(written / STORIES_WEIGHTS, abs=1e-12)
    check_loaded_and_inspected(tmp_path, out, summary, stories_split[1], tables, LUTLinear, "lut", "lut")


def test_learned_rounding_learns_the_tables(tmp_path, stories_path, stories_split):
    """With `--rounding signround` the tables are refined with the block (their centroids and codes move), stay
    ascending, and the checkpoint loads to the perplexity measured while quantizing, below GPTQ's tables."""
    calib, held = stories_split
    names = linear_shapes(BlockRunner(open_source(str(stories_path)).config))
    tables = {name for name in names if "up_proj" in name or "layers.4." in name}     # block 4: tables alone
    plan = {"layers": {name: {"bits": 3, "group_size": -1, "sym": False, "lut": True} if name in tables else
                       {"bits": 3, "group_size": 32, "sym": False} for name in names}}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    runs, summaries = {}, {}
    for rounding in ("gptq", "signround"):
        out = tmp_path / rounding
        r = cli("quantize", stories_path, "-o", out, "--plan", tmp_path / "plan.json", "--calib", calib, *CALIB,
                "--rounding", rounding, "--rounding-iters", "20", "--eval-data", held, "--eval-seqlen", "128",
                "--eval-max-tokens", EVAL_TOKENS, "--json", tmp_path / f"{rounding}.json")
        assert r.exit_code == 0, r.output
        summaries[rounding] = json.loads((tmp_path / f"{rounding}.json").read_text())
        with safe_open(str(out / "model.safetensors"), framework="pt") as f:
            runs[rounding] = {k: f.get_tensor(k) for k in f.keys()}
    assert runs["gptq"].keys() == runs["signround"].keys()
    moved = [n for n in tables if not torch.equal(runs["gptq"][f"{n}.lut"], runs["signround"][f"{n}.lut"])]
    assert len(moved) >= len(tables) // 2
    assert all(bool((runs["signround"][f"{n}.lut"].diff(dim=1) >= 0).all()) for n in tables)
    assert summaries["signround"]["bits_per_weight"] == summaries["gptq"]["bits_per_weight"]
    assert summaries["signround"]["eval"]["perplexity"] < summaries["gptq"]["eval"]["perplexity"]
    check_loaded_and_inspected(tmp_path, tmp_path / "signround", summaries["signround"], held, tables, LUTLinear,
                               "lut", "lut")

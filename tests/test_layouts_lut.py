"""The lookup-table layout (bitsmith/layouts.py `LUTLayout`): its stored size is the bytes it writes, its module
reproduces Q, its configuration entries round-trip; end to end on stories260K, a plan with tables in the MLPs is
quantized, loaded (the quantize-time perplexity again), verified and inspected."""
import json

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

import bitsmith
from bitsmith.calibration import data
from bitsmith.calibration.adapter import BlockRunner
from bitsmith.calibration.perplexity import evaluate
from bitsmith.cli.main import main
from bitsmith.formats.errors import InputError
from bitsmith.formats.source import open_source
from bitsmith.kernels.linear import QuantizedLinear
from bitsmith.kernels.lut_linear import LUTLinear
from bitsmith.layouts import LUTLayout, gptq_config, gptq_expressible, layer_config, layer_plan, layout_of, plan_bits
from bitsmith.pipeline import linear_shapes
from bitsmith.plan import LayerPlan, QuantizeOptions, QuantPlan
from bitsmith.quantize.lut import LutWeight, gptq_lut


def nbits(tensors) -> int:
    return sum(8 * t.numel() * t.element_size() for t in tensors.values())


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
    layer = LayerPlan(bits, -1, False, lut=True)
    module = layout_of(layer).module(80, 24, layer, bias=False)
    module.load_state_dict(LUTLayout.tensors(qw), strict=True)
    assert isinstance(module, LUTLinear) and torch.equal(module.dequantize(), qw.Q)
    x = torch.randn(3, 80, generator=g)
    assert torch.equal(module(x), x @ qw.Q.t())
    module.cache_dequantized()
    assert torch.equal(module(x), x @ qw.Q.t())


SHAPES = {"model.layers.0.self_attn.q_proj": (64, 64), "model.layers.0.mlp.down_proj": (64, 172)}


def test_tables_take_the_checkpoint_out_of_the_gptq_convention_and_round_trip():
    plan = QuantPlan(QuantizeOptions(), {"model.layers.0.self_attn.q_proj": LayerPlan(3, 32, False),
                                         "model.layers.0.mlp.down_proj": LayerPlan(3, -1, False, lut=True)})
    assert not gptq_expressible(plan)
    qc = gptq_config(plan, SHAPES)
    for name, layer in plan.layers.items():
        assert layer_plan(layer_config(qc, name), name) == layer
    assert plan_bits(plan, SHAPES)[0] == sum(layout_of(lp).stored_bits(*SHAPES[n], lp) for n, lp in plan.layers.items())


@pytest.mark.parametrize("entry, message", [
    ({"bits": 8, "group_size": -1, "sym": False, "lut": True}, "a table per row of 2, 3 or 4 bits"),
    ({"bits": 3, "group_size": 64, "sym": False, "lut": True}, "group_size -1"),
    ({"bits": 3, "group_size": -1, "sym": False, "lut": 1}, "lut 1"),
])
def test_table_entries_of_a_checkpoint_are_checked(entry, message):
    with pytest.raises(InputError, match=message):
        layer_plan(entry, "ckpt: model.layers.0.mlp.up_proj")


# ---------------------------------------------------------------------------------------------------
# End to end on stories260K.

CALIB = ["--nsamples", "16", "--seqlen", "128", "--seed", "0"]
EVAL_TOKENS = 4096


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_a_plan_with_lookup_tables_end_to_end(tmp_path, stories_path, stories_split):
    calib, held = stories_split
    common = ["--calib", calib, *CALIB]
    names = linear_shapes(BlockRunner(open_source(str(stories_path)).config))
    tables = {name for name in names if ".mlp." in name}
    plan = {"layers": {name: {"bits": 3, "group_size": -1, "sym": False, "lut": True} if name in tables else
                       {"bits": 3, "group_size": 32, "sym": False} for name in names}}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    out = tmp_path / "lut"
    r = cli("quantize", stories_path, "-o", out, "--plan", tmp_path / "plan.json", *common, "--eval-data", held,
            "--eval-seqlen", "128", "--eval-max-tokens", EVAL_TOKENS, "--json", tmp_path / "summary.json")
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bitsmith"
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        written = sum(8 * f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys()
                      if k.rsplit(".", 1)[-1] in ("qweight", "scales", "qzeros", "g_idx", "lut"))
        assert {k[:-len(".lut")] for k in f.keys() if k.endswith(".lut")} == tables
    weights = 5 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 172 * 64)
    assert summary["bits_per_weight"] == pytest.approx(written / weights, abs=1e-12)

    model = bitsmith.load(str(out))
    assert {n for n in plan["layers"] if isinstance(model.get_submodule(n), LUTLinear)} == tables
    assert all(isinstance(model.get_submodule(n), QuantizedLinear) for n in plan["layers"] if n not in tables)
    ids = data.tokenize(open_source(str(out)).tokenizer(), held.read_text())
    loaded = evaluate(model, data.eval_windows(ids, 128, EVAL_TOKENS), progress=False)
    assert loaded["perplexity"] == summary["eval"]["perplexity"]

    assert cli("verify", out).exit_code == 0
    r = cli("inspect", out, "--json", tmp_path / "inspect.json")
    assert r.exit_code == 0, r.output
    rows = {row["name"]: row for row in json.loads((tmp_path / "inspect.json").read_text())["layers"]}
    assert {n for n, row in rows.items() if row["lut"]} == tables
    line = next(li for li in r.output.splitlines() if li.startswith(min(tables)))
    assert line.split()[3] == "lut"


def test_learned_rounding_leaves_the_tables_as_gptq_chose_them(tmp_path, stories_path, stories_split):
    calib, _ = stories_split
    names = linear_shapes(BlockRunner(open_source(str(stories_path)).config))
    tables = {name for name in names if "up_proj" in name or "layers.4." in name}     # block 4: tables alone
    plan = {"layers": {name: {"bits": 3, "group_size": -1, "sym": False, "lut": True} if name in tables else
                       {"bits": 3, "group_size": 32, "sym": False} for name in names}}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    runs = {}
    for rounding in ("gptq", "signround"):
        out = tmp_path / rounding
        r = cli("quantize", stories_path, "-o", out, "--plan", tmp_path / "plan.json", "--calib", calib, *CALIB,
                "--rounding", rounding, "--rounding-iters", "2")
        assert r.exit_code == 0, r.output
        with safe_open(str(out / "model.safetensors"), framework="pt") as f:
            runs[rounding] = {k: f.get_tensor(k) for k in f.keys()}
    first = min(tables)                           # before any refined block: the same input, the same table
    assert torch.equal(runs["gptq"][f"{first}.lut"], runs["signround"][f"{first}.lut"])
    assert all(f"{n}.lut" in runs["signround"] for n in tables)
    assert len(json.loads((tmp_path / "signround" / "plan.json").read_text())["layers"]) == len(names)

"""Layouts: the stored size of a configuration equals the bytes of the tensors it writes; the GPTQ config with
`dynamic` overrides gives every linear back its own configuration, and the runtime module reproduces Q. The
dense-and-sparse layout alike, and end to end on stories260K: a plan with outliers quantized, loaded (the
quantize-time perplexity again), verified and inspected; zero outliers write what a plan without them writes."""
import json
import os
import re
import signal
import subprocess
import sys

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
from bitsmith.formats import faults
from bitsmith.formats.csr import csr_bits
from bitsmith.formats.errors import InputError
from bitsmith.formats.packing import earlier_length, unpack
from bitsmith.formats.source import open_source
from bitsmith.kernels import reference
from bitsmith.kernels.linear import DenseSparseLinear, QuantizedLinear
from bitsmith.layouts import (
    DenseSparseLayout,
    GPTQLayout,
    gptq_config,
    gptq_expressible,
    layer_config,
    layer_plan,
    layout_of,
    plan_bits,
)
from bitsmith.pipeline import linear_shapes
from bitsmith.plan import FLAGS, LayerPlan, QuantizeOptions, QuantPlan
from bitsmith.quantize.gptq import gptq_quantize
from bitsmith.quantize.grid import fake_quantize
from bitsmith.quantize.outliers import DenseSparseWeight, Outliers, outlier_count
from bitsmith.quantize.rtn import rtn_quantize


def nbits(tensors) -> int:
    return sum(8 * t.numel() * t.element_size() for t in tensors.values())


@settings(max_examples=40, deadline=None)
@given(out=st.integers(1, 70), inp=st.integers(1, 200), bits=st.sampled_from([2, 3, 4, 5, 6, 8]),
       group=st.sampled_from([-1, 32, 64, 128]), sym=st.booleans())
def test_stored_bits_is_the_size_of_what_is_written(out, inp, bits, group, sym):
    W = torch.randn(out, inp)
    qw = rtn_quantize(W, bits, group, sym)
    tensors = GPTQLayout.tensors(qw)
    assert GPTQLayout.stored_bits(out, inp, LayerPlan(bits, group, sym)) == nbits(tensors)
    module = GPTQLayout.module(inp, out, LayerPlan(bits, group, sym), bias=False)
    module.load_state_dict(tensors, strict=False)
    assert torch.equal(module.dequantize(), qw.Q)


# ---------------------------------------------------------------------------------------------------
# The GPTQ tensors as other readers take them: zero points, packed shapes, g_idx.

def stored_zero_fields(qzeros, bits, out):
    """The stored (zero - 1) fields of qzeros, unpacked without any wrap."""
    return unpack(qzeros, bits, out, dim=1).long()


def gptqmodel_v1_to_v2(qzeros, bits, out):
    """GPTQModel's v1 -> v2 conversion (utils/model.py, convert_gptq_v1_to_v2_format_module): at 2, 4 and 8 bits
    one integer add of 0b..0101 / 0x11111111 / 0x01010101 per int32 word, so a field at maxq carries into the
    next one; at 3 bits each field + 1, wrapped. Returns the zeros it then reads."""
    if bits == 3:
        return (stored_zero_fields(qzeros, bits, out) + 1) & 7
    one_each = sum(1 << (bits * j) for j in range(32 // bits))
    words = ((qzeros.long() & 0xFFFFFFFF) + one_each) & 0xFFFFFFFF
    return unpack(torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32), bits, out, dim=1).long()


@settings(max_examples=40, deadline=None)
@given(out=st.integers(1, 70), inp=st.integers(1, 200), bits=st.sampled_from([2, 3, 4, 8]),
       group=st.sampled_from([-1, 16, 32, 128]), sym=st.booleans(), mse=st.booleans(),
       shape=st.sampled_from(["gauss", "positive", "negative", "nearly positive", "flat"]),
       seed=st.integers(0, 2**16))
def test_every_reader_takes_the_stored_zero_points_alike(out, inp, bits, group, sym, mse, shape, seed):
    """No stored field is maxq (a true zero of 0), so bitsmith ((stored + 1) mod 2^bits), vLLM's gptq_gemm
    (stored + 1, no wrap) and GPTQModel's v1 -> v2 word add read the quantizer's zero points; the packed shapes
    are GPTQModel's (ceil(n * bits / 32) words) and g_idx is written, i // group_size without act-order."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inp, generator=g)
    W = {"gauss": W, "positive": W.abs(), "negative": -W.abs(), "nearly positive": W.abs() - 0.01 * W.abs().max(),
         "flat": torch.zeros_like(W)}[shape]
    qw = rtn_quantize(W, bits, group, sym, mse)
    maxq = 2**bits - 1
    tensors = GPTQLayout.tensors(qw)
    stored = stored_zero_fields(tensors["qzeros"], bits, out)
    assert int(stored.max()) < maxq
    assert torch.equal(stored + 1, qw.zeros.long())                                      # vLLM
    assert torch.equal(reference.unpack_zeros(tensors["qzeros"], bits, out).long(), qw.zeros.long())   # bitsmith
    assert torch.equal(gptqmodel_v1_to_v2(tensors["qzeros"], bits, out), qw.zeros.long())              # GPTQModel
    groups = 1 if group == -1 else -(-inp // group)
    assert tensors["qweight"].shape == (-(-inp * bits // 32), out)
    assert tensors["qzeros"].shape == (groups, -(-out * bits // 32))
    assert tensors["scales"].shape == (groups, out)
    assert torch.equal(tensors["g_idx"], torch.arange(inp, dtype=torch.int32) // (inp if group == -1 else group))


@pytest.mark.parametrize("act_order,static", [(True, False), (False, False), (True, True)])
def test_gptq_writes_g_idx_and_zeros_of_one_or_more(act_order, static):
    g = torch.Generator().manual_seed(7)
    W = torch.randn(40, 96, generator=g) * 0.02
    W[:20] = W[:20].abs()                                    # rows without negative weights: zero raised to 1
    X = torch.randn(256, 96, generator=g) * torch.linspace(0.1, 2, 96)
    qw = gptq_quantize(W, 2 * X.t() @ X / 256, 2, 32, act_order=act_order, static_groups=static, mse=True)
    tensors = GPTQLayout.tensors(qw)
    assert int(qw.zeros.min()) >= 1
    assert torch.equal(tensors["g_idx"], qw.group_index().to(torch.int32))
    natural = torch.arange(96, dtype=torch.int32) // 32
    assert torch.equal(tensors["g_idx"], natural) == (qw.g_idx is None)
    module = GPTQLayout.module(96, 40, LayerPlan(2, 32, False), bias=False)
    module.load_state_dict(tensors, strict=True)
    assert torch.equal(module.dequantize(), qw.Q)


def test_a_zero_point_of_zero_is_refused():
    qw = rtn_quantize(torch.randn(4, 32), 4, 32)
    qw.zeros[0, 0] = 0
    with pytest.raises(ValueError, match=r"zero points must be in \[1, 15\]"):
        GPTQLayout.tensors(qw)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_tensors_padded_as_earlier_versions_wrote_them_still_load(bits):
    """Earlier versions packed whole runs of 32 codes (bits words) per packed column; the extra words are zero
    padding, which loading drops."""
    W = torch.randn(172, 172)
    qw = rtn_quantize(W, bits, 32)
    tensors = GPTQLayout.tensors(qw)
    earlier = dict(tensors)
    for part, dim in (("qweight", 0), ("qzeros", 1)):
        t = tensors[part]
        pad = list(t.shape)
        pad[dim] = earlier_length(172, bits) - t.shape[dim]
        earlier[part] = torch.cat([t, t.new_zeros(pad)], dim=dim)
    assert earlier["qweight"].shape[0] > tensors["qweight"].shape[0]
    module = GPTQLayout.module(172, 172, LayerPlan(bits, 32, False), bias=False)
    module.load_state_dict(earlier, strict=True)
    assert torch.equal(module.qweight, tensors["qweight"]) and torch.equal(module.dequantize(), qw.Q)
    earlier["qzeros"][0, -1] = 1                                          # not padding: left to the shape check
    with pytest.raises(RuntimeError, match="size mismatch"):
        GPTQLayout.module(172, 172, LayerPlan(bits, 32, False), bias=False).load_state_dict(earlier)


SHAPES = {f"model.layers.{i}.{n}": s for i in range(3)
          for n, s in (("self_attn.q_proj", (64, 64)), ("mlp.down_proj", (64, 172)), ("mlp.up_proj", (172, 64)))}


def plan_of(choice) -> QuantPlan:
    opts = QuantizeOptions()
    return QuantPlan(opts, {name: choice(name) for name in SHAPES})


def test_uniform_plan_has_no_dynamic_block():
    qc = gptq_config(plan_of(lambda n: LayerPlan(4, 128, False)), SHAPES)
    assert "dynamic" not in qc and (qc["bits"], qc["group_size"], qc["sym"], qc["desc_act"]) == (4, 128, False, True)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([2, 3, 4, 8]), st.sampled_from([-1, 32, 64, 128]), st.booleans()),
                min_size=len(SHAPES), max_size=len(SHAPES)))
def test_dynamic_overrides_give_every_linear_its_own_configuration(choices):
    layers = dict(zip(SHAPES, choices))
    qc = gptq_config(plan_of(lambda n: LayerPlan(*layers[n])), SHAPES)
    for name, (bits, group, sym) in layers.items():
        assert layer_config(qc, name) == {"bits": bits, "group_size": group, "sym": sym}
    for key in qc.get("dynamic", {}):            # anchored at both ends: layers.1 never matches layers.10
        assert key.startswith("+:") and key.endswith("$")
        assert sum(bool(re.match(key[2:], n)) for n in SHAPES) == 1


def test_base_configuration_holds_the_most_weights():
    qc = gptq_config(plan_of(lambda n: LayerPlan(3, 64, True) if "mlp" in n else LayerPlan(8, -1, False)), SHAPES)
    assert (qc["bits"], qc["group_size"], qc["sym"]) == (3, 64, True)
    assert sorted(k for k in qc["dynamic"]) == sorted(f"+:{re.escape(n)}$" for n in SHAPES if "q_proj" in n)


def test_plan_bits_adds_the_layers():
    plan = plan_of(lambda n: LayerPlan(2, 32, False))
    bits, weights = plan_bits(plan, SHAPES)
    assert weights == sum(o * i for o, i in SHAPES.values())
    assert bits == sum(GPTQLayout.stored_bits(*SHAPES[n], LayerPlan(2, 32, False)) for n in SHAPES)


def test_gptqmodel_dynamic_semantics():
    qc = {"bits": 4, "group_size": 128, "sym": True,
          "dynamic": {r"+:.*\.mlp\..*": {"bits": 8, "group_size": 64}, r"-:.*down_proj": {}}}
    assert layer_config(qc, "model.layers.0.self_attn.q_proj") == {"bits": 4, "group_size": 128, "sym": True}
    assert layer_config(qc, "model.layers.0.mlp.up_proj") == {"bits": 8, "group_size": 64, "sym": True}
    assert layer_config(qc, "model.layers.0.mlp.down_proj") is None       # negative rules are checked first


@pytest.mark.parametrize("fields", [{"checkpoint_format": "gptq_v2"}, {"format": "gptq_v2"}, {"checkpoint_format": 2}])
def test_checkpoints_with_true_zero_points_are_refused(fields):
    """GPTQModel's gptq_v2 stores zero points as they are; read as v1 they would be one step off."""
    with pytest.raises(InputError, match="checkpoint_format .* is not read"):
        layer_config({"bits": 4, **fields}, "model.layers.0.mlp.up_proj")
    assert layer_config({"bits": 4, "checkpoint_format": "GPTQ", "format": "gptq_v2"}, "x")["bits"] == 4


@pytest.mark.parametrize("dynamic, message", [
    ([1, 2], "dynamic must be an object"),
    ({"+:(": {"bits": 2}}, "is not a valid regex"),
    ({"+:.*": 3}, "must map to an object"),
])
def test_malformed_dynamic_blocks_are_input_errors(dynamic, message):
    with pytest.raises(InputError, match=message):
        layer_config({"bits": 4, "dynamic": dynamic}, "model.layers.0.mlp.up_proj")


# ---------------------------------------------------------------------------------------------------
# Dense-and-sparse: GPTQ tensors plus the outliers in CSR.

def dense_sparse_by_hand(out, inp, bits, group, sym, fraction, seed=0) -> DenseSparseWeight:
    """A DenseSparseWeight on RTN codes: outlier_count(fraction, inp) random columns per row, their codes set to
    the zero point and their weights kept."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inp, generator=g)
    qw = rtn_quantize(W, bits, group, sym)
    k = outlier_count(fraction, inp)
    cols = torch.sort(torch.rand(out, inp, generator=g).argsort(dim=1)[:, :k], dim=1).values
    sparse = Outliers(cols, W.gather(1, cols).to(torch.float16))
    codes = qw.codes.clone()
    zeros = qw.zeros[qw.group_index().long()].t().to(codes.dtype)      # [out, in]
    codes.scatter_(1, cols, zeros.gather(1, cols))
    dense = fake_quantize(codes, qw.scales[qw.group_index().long()].t(), zeros)
    return DenseSparseWeight(codes, qw.scales, qw.zeros, qw.g_idx, bits, group, sym, sparse.overwrite(dense), 0.0,
                             sparse)


@settings(max_examples=40, deadline=None)
@given(out=st.integers(1, 40), inp=st.one_of(st.integers(2, 200), st.integers(32760, 32775)),
       bits=st.sampled_from([2, 3, 4, 5, 6, 8]), group=st.sampled_from([-1, 32, 128]), sym=st.booleans(),
       fraction=st.sampled_from([0.001, 0.005, 0.01, 0.05, 0.25]))
def test_dense_sparse_stored_bits_is_the_size_of_what_is_written(out, inp, bits, group, sym, fraction):
    if inp > 1000:                                   # int32 column indices; few rows and one group keep it quick
        out, group = min(out, 3), -1
    qw = dense_sparse_by_hand(out, inp, bits, group, sym, fraction)
    layer = LayerPlan(bits, group, sym, outliers=fraction)
    assert layout_of(layer) is DenseSparseLayout
    tensors = DenseSparseLayout.tensors(qw)
    assert sorted(tensors) == sorted(DenseSparseLayout.parts)
    assert tensors["outlier_cols"].dtype == (torch.int16 if inp <= 32767 else torch.int32)
    assert DenseSparseLayout.stored_bits(out, inp, layer) == nbits(tensors)
    assert DenseSparseLayout.stored_bits(out, inp, layer) == GPTQLayout.stored_bits(out, inp, layer) + csr_bits(
        out, inp, out * outlier_count(fraction, inp))
    assert torch.equal(DenseSparseLayout.weight(tensors.__getitem__, layer, inp), qw.Q)


@pytest.mark.parametrize("bits,group,act_order", [(3, 32, True), (2, -1, False), (4, 64, True)])
def test_dense_sparse_module_reproduces_Q(bits, group, act_order):
    g = torch.Generator().manual_seed(bits)
    W = 0.02 * torch.randn(48, 96, generator=g)
    W[torch.arange(48), torch.randint(0, 96, (48,), generator=g)] = 1.0       # an outlier in every row
    X = torch.randn(512, 96, generator=g)
    qw = gptq_quantize(W, 2 * X.t() @ X / 512, bits, group, act_order=act_order, outliers=0.03)
    layer = LayerPlan(bits, group, False, outliers=0.03)
    tensors = layout_of(layer).tensors(qw)
    module = layout_of(layer).module(96, 48, layer, bias=False)
    module.load_state_dict(tensors, strict=True)
    assert isinstance(module, DenseSparseLinear) and module.outlier_values.numel() == 48 * 3
    assert torch.equal(module.dequantize(), qw.Q)
    x = torch.randn(5, 96, generator=g)
    runtime = module.runtime()
    assert torch.equal(runtime(x, "reference"), x @ qw.Q.t())                 # CPU reference: one product
    split = runtime(x, "cpu_int4")                                             # bf16 activations (kernels/cpu.py)
    assert torch.allclose(split, x @ qw.Q.t(), rtol=1e-2, atol=1e-2)
    dense_only = reference.weight_only_linear(x, *runtime.dense.layout)           # zero codes leave outliers out
    added = reference.csr_add(dense_only, x, *module.csr())
    assert torch.allclose(added, x @ qw.Q.t(), atol=1e-5)


def test_outliers_take_the_checkpoint_out_of_the_gptq_convention():
    plain = plan_of(lambda n: LayerPlan(3, 128, False))
    assert gptq_expressible(plain)
    assert "outliers" not in json.dumps(gptq_config(plain, SHAPES))                # GPTQ-only plans unchanged
    mixed = plan_of(lambda n: LayerPlan(3, 128, False, outliers=0.01 if "down" in n else 0.0))
    assert not gptq_expressible(mixed)
    qc = gptq_config(mixed, SHAPES)
    assert qc["outliers"] == 0.0 and all(rule["outliers"] == 0.01 for rule in qc["dynamic"].values())
    for name, layer in mixed.layers.items():
        entry = layer_config(qc, name)
        assert entry["outliers"] == layer.outliers and layer_plan(entry, name) == layer
    bits, _ = plan_bits(mixed, SHAPES)
    assert bits == sum(layout_of(layer).stored_bits(*SHAPES[n], layer) for n, layer in mixed.layers.items())
    assert bits > plan_bits(plain, SHAPES)[0]


@pytest.mark.parametrize("entry, message", [
    ({"bits": 5, "group_size": 64, "sym": False, "per_ic": True}, "per_ic with 5 bits: choose one of 2, 3, 4, 8"),
    ({"bits": 3, "group_size": 64, "sym": False, "per_ic": True, "outliers": 0.01}, "per_ic groups keep no outliers")])
def test_a_config_entry_outside_what_per_input_channel_grids_hold_is_refused(entry, message):
    """Their kernels (CPU int4/int8 forms, the Triton dequantization) read GPTQ's widths only."""
    with pytest.raises(InputError, match=f"x: {message}.* \\(quantization_config\\)"):
        layer_plan(entry, "x")


@pytest.mark.parametrize("special", [LayerPlan(3, -1, False, lut=True), LayerPlan(3, 32, False, per_ic=True),
                                     LayerPlan(5, 128, False), LayerPlan(6, -1, False)],
                         ids=["lut", "per_ic", "5-bit", "6-bit"])
def test_tables_and_per_input_channel_grids_take_the_checkpoint_out_of_the_gptq_convention(special):
    plan = plan_of(lambda n: special if "down" in n else LayerPlan(3, 64, False))
    assert not gptq_expressible(plan)
    qc = gptq_config(plan, SHAPES)
    for name, layer in plan.layers.items():
        assert layer_plan(layer_config(qc, name), name) == layer
    assert plan_bits(plan, SHAPES)[0] == sum(layout_of(lp).stored_bits(*SHAPES[n], lp) for n, lp in plan.layers.items())


@pytest.mark.parametrize("entry, message", [
    ({"bits": 3, "group_size": 128, "sym": False, "outliers": 0.5}, "outliers 0.5"),
    ({"bits": 3, "group_size": 128, "sym": False, "outliers": "1%"}, "outliers '1%'"),
    ({"bits": 7, "group_size": 128, "sym": False}, "unsupported bits 7"),
    ({"bits": 3, "group_size": 0, "sym": False}, "group_size 0"),
])
def test_layer_entries_of_a_checkpoint_are_checked(entry, message):
    with pytest.raises(InputError, match=message):
        layer_plan(entry, "ckpt: model.layers.0.mlp.up_proj")


# ---------------------------------------------------------------------------------------------------
# End to end on stories260K: a plan with outliers in some layers.

CALIB = ["--nsamples", "16", "--seqlen", "128", "--seed", "0"]
EVAL_TOKENS = 4096
LINEAR_PARTS = set(DenseSparseLayout.parts)


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def linear_bits(out) -> int:
    """Bits of every tensor of the quantized linears, read from the files."""
    bits = 0
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        for key in f.keys():
            if key.rsplit(".", 1)[-1] in LINEAR_PARTS:
                t = f.get_tensor(key)
                bits += 8 * t.numel() * t.element_size()
    return bits


@pytest.fixture(scope="module")
def with_outliers(tmp_path_factory, stories_path, stories_split):
    """A uniform W3 g32 run, the same plan with 2 % outliers in every third linear, and with explicit zeros."""
    calib, held = stories_split
    root = tmp_path_factory.mktemp("outliers")
    common = ["--bits", "3", "--group-size", "32", "--calib", calib, *CALIB]
    r = cli("quantize", stories_path, "-o", root / "uniform", *common)
    assert r.exit_code == 0, r.output
    plan = json.loads((root / "uniform" / "plan.json").read_text())
    zeros = json.loads(json.dumps(plan))
    for i, entry in enumerate(plan["layers"].values()):
        entry["outliers"] = 0.02 if i % 3 == 0 else 0.0
    for entry in zeros["layers"].values():
        entry["outliers"] = 0
    (root / "plan.json").write_text(json.dumps(plan))
    (root / "zeros.json").write_text(json.dumps(zeros))
    r = cli("quantize", stories_path, "-o", root / "sparse", "--plan", root / "plan.json", *common,
            "--eval-data", held, "--eval-seqlen", "128", "--eval-max-tokens", EVAL_TOKENS, "--json",
            root / "summary.json")
    assert r.exit_code == 0, r.output
    return root, plan, json.loads((root / "summary.json").read_text())


@pytest.mark.slow
def test_a_plan_with_outliers_end_to_end(with_outliers, stories_path, stories_split):
    root, plan, summary = with_outliers
    out = root / "sparse"
    written = json.loads((out / "plan.json").read_text())["layers"]
    sparse = {name for name, entry in plan["layers"].items() if entry["outliers"]}
    assert {name for name, entry in written.items() if "outliers" in entry} == sparse and len(sparse) == 12
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bitsmith" and qc["checkpoint_format"] == "gptq"
    for name, entry in plan["layers"].items():
        assert layer_config(qc, name)["outliers"] == entry["outliers"]
    weights = 5 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 172 * 64)
    assert summary["bits_per_weight"] == pytest.approx(linear_bits(out) / weights, abs=1e-12)
    shapes = linear_shapes(BlockRunner(open_source(str(stories_path)).config))
    qplan = QuantPlan.from_dict(plan, shapes, QuantizeOptions(), "plan.json")
    assert plan_bits(qplan, shapes) == (linear_bits(out), weights)             # planned = written, exactly
    assert linear_bits(out) > linear_bits(root / "uniform")

    model = bitsmith.load(str(out))
    kinds = {name: type(model.get_submodule(name)) for name in plan["layers"]}
    assert {n for n, k in kinds.items() if k is DenseSparseLinear} == sparse
    assert all(kinds[n] is QuantizedLinear for n in plan["layers"] if n not in sparse)
    ids = data.tokenize(open_source(str(out)).tokenizer(), stories_split[1].read_text())
    windows = data.eval_windows(ids, 128, EVAL_TOKENS)
    loaded = evaluate(model, windows, progress=False)
    assert loaded["tokens"] == summary["eval"]["tokens"] and loaded["perplexity"] == summary["eval"]["perplexity"]

    assert cli("verify", out).exit_code == 0
    r = cli("inspect", out, "--json", root / "inspect.json")
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[0].split()[:6] == ["layer", "shape", "bits", "group", "sym", "outliers"]
    table = json.loads((root / "inspect.json").read_text())
    rows = {row["name"]: row for row in table["layers"]}
    for name in plan["layers"]:
        k = outlier_count(plan["layers"][name]["outliers"], rows[name]["shape"][1])
        assert rows[name]["outliers"] == plan["layers"][name]["outliers"]
        assert rows[name]["outlier_weights"] == rows[name]["shape"][0] * k
        assert (name in sparse) == (k > 0)
    assert table["totals"]["outlier_weights"] == sum(r["outlier_weights"] for r in rows.values()) > 0
    assert table["totals"]["bpw"] == pytest.approx(summary["bits_per_weight"], abs=1e-12)
    line = next(li for li in r.output.splitlines() if li.startswith(min(sparse)))
    assert "2%" in line.split()


@pytest.mark.slow
def test_zero_outliers_write_what_a_plan_without_them_writes(with_outliers, stories_path, stories_split):
    root, _, _ = with_outliers
    r = cli("quantize", stories_path, "-o", root / "zeros", "--plan", root / "zeros.json", "--bits", "3",
            "--group-size", "32", "--calib", stories_split[0], *CALIB)
    assert r.exit_code == 0, r.output
    for name in ("model.safetensors", "config.json", "plan.json"):
        assert (root / "zeros" / name).read_bytes() == (root / "uniform" / name).read_bytes(), name
    assert json.loads((root / "zeros" / "config.json").read_text())["quantization_config"]["quant_method"] == "gptq"


@pytest.mark.slow
def test_a_run_with_outliers_killed_after_a_block_resumes_to_the_same_bytes(with_outliers, stories_path,
                                                                             stories_split, tmp_path):
    """The resumed run replays the finished blocks on their stored weights (dense codes and CSR outliers): the
    blocks after them get the inputs an uninterrupted run gives them, and the files are the same."""
    root, _, _ = with_outliers
    args = ["quantize", str(stories_path), "-o", str(tmp_path / "r"), "--plan", str(root / "plan.json"), "--bits",
            "3", "--group-size", "32", "--calib", str(stories_split[0]), *CALIB]
    killed = subprocess.run([sys.executable, "-c", "from bitsmith.cli.main import main; main()", *args],
                            env={**os.environ, faults.VARIABLE: "block:1"}, capture_output=True, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()
    r = cli(*args, "--resume")
    assert r.exit_code == 0, r.output
    assert "resuming the interrupted run, 2 of 5 blocks done" in r.output
    for name in ("model.safetensors", "config.json", "plan.json"):
        assert (tmp_path / "r" / name).read_bytes() == (root / "sparse" / name).read_bytes(), name


@pytest.mark.parametrize("layer", [LayerPlan(3, -1, False, lut=True), LayerPlan(3, 128, False, per_ic=True),
                                   LayerPlan(3, 128, False, vq=True), LayerPlan(3, 128, False, column_bits=True)],
                         ids=lambda layer: layer.technique)
def test_a_plan_with_a_technique_beyond_gptq_names_it_in_every_entry_of_its_config(layer):
    flag = next(key for key in FLAGS if getattr(layer, key))
    layers = {"a": layer, "b": LayerPlan(4, 128, False)}
    config = gptq_config(QuantPlan(QuantizeOptions(), layers), {"a": (64, 256), "b": (16, 256)})
    assert config[flag] is True and config["dynamic"]["+:b$"][flag] is False
    assert layer_plan(layer_config(config, "a"), "a") == layers["a"]
    assert layer_plan(layer_config(config, "b"), "b") == layers["b"]

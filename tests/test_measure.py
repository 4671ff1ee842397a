"""Measure -> decide -> quantize the plan, end to end on stories260K: the budget holds against the bytes
written, the saved measurement re-plans without calibrating and is refused for another model, and the
loaded mixed-precision checkpoint reproduces the perplexity measured while quantizing."""
import json
import math
import shutil
from dataclasses import replace

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

import bitsmith
from bitsmith.calibration import data
from bitsmith.calibration.perplexity import evaluate
from bitsmith.cli.main import main
from bitsmith.formats.csr import csr_bits
from bitsmith.formats.errors import InputError
from bitsmith.formats.packing import packed_length
from bitsmith.formats.source import open_source
from bitsmith.layouts import (
    ColumnBitsLayout,
    DenseSparseLayout,
    DQLayout,
    GPTQLayout,
    LUTLayout,
    PerICLayout,
    VQLayout,
    layer_config,
    plan_bits,
)
from bitsmith.loader import load_model
from bitsmith.measure import (
    BESIDE_CODEBOOKS,
    CANDIDATES,
    LUT_CANDIDATES,
    OUTLIER_CANDIDATES,
    PER_IC_CANDIDATES,
    PER_IC_WINDOW,
    PLAIN_CANDIDATES,
    VQ_CANDIDATES,
    Measurement,
    decide,
    measured_candidates,
    sampled_losses,
    window_sample,
)
from bitsmith.pipeline import calibration
from bitsmith.plan import TECHNIQUES, LayerPlan, QuantizeOptions
from bitsmith.quantize.gptq import GridConfig
from bitsmith.quantize.outliers import outlier_count
from bitsmith.quantize.vq import gptq_vq

pytestmark = pytest.mark.slow
CALIB = {"nsamples": 16, "seqlen": 128, "seed": 0, "fisher_samples": 4}
PARTS = (set(DenseSparseLayout.parts) | set(LUTLayout.parts) | set(PerICLayout.parts)    # GPTQ tensors, outliers'
         | set(VQLayout.parts) | set(ColumnBitsLayout.parts)     # CSR, lookup tables, per-IC grids, codebooks, widths,
         | set(DQLayout.parts))                                  # double-quantized scales
SHAPES = {f"model.layers.{i}.{name}": shape for i in range(5) for name, shape in (
    ("self_attn.q_proj", (64, 64)), ("self_attn.k_proj", (32, 64)), ("self_attn.v_proj", (32, 64)),
    ("self_attn.o_proj", (64, 64)), ("mlp.gate_proj", (172, 64)), ("mlp.up_proj", (172, 64)),
    ("mlp.down_proj", (64, 172)))}               # stories260K's decoder linears, [out, in]


@pytest.fixture(scope="module")
def planned(tmp_path_factory, stories_path, stories_split):
    calib, held = stories_split
    out = tmp_path_factory.mktemp("plan") / "t35"
    summary = bitsmith.quantize(str(stories_path), str(out), target_bpw=3.5, calib=[str(calib)], **CALIB,
                                eval_data=str(held), eval_seqlen=128, progress=False)
    return out, summary


def linear_bits(out) -> tuple[int, int]:
    """(stored bits of every tensor of a quantized linear, weights of those linears), read from the files."""
    bits = weights = 0
    for f in out.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                if key.rsplit(".", 1)[-1] in PARTS:
                    t = st.get_tensor(key)
                    bits += 8 * t.numel() * t.element_size()
                if key.endswith(".qweight"):              # every layout of a linear packs its codes there
                    out_features, in_features = SHAPES[key[:-len(".qweight")]]
                    weights += in_features * out_features
    return bits, weights


def test_achieved_bpw_is_the_bytes_written_and_within_the_budget(planned):
    out, summary = planned
    bits, weights = linear_bits(out)
    assert weights == 5 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 172 * 64)     # q, o; k, v (4 kv heads); gate, up, down
    assert summary["bits_per_weight"] == pytest.approx(bits / weights, abs=1e-12)
    assert 3.48 <= summary["bits_per_weight"] <= 3.5


def test_the_plan_is_mixed_and_written_where_loaders_read_it(planned, stories_path):
    out, summary = planned
    plan = json.loads((out / "plan.json").read_text())
    manifest = json.loads((out / "bitsmith_manifest.json").read_text())
    assert manifest["plan"] == plan and plan["target_bpw"] == 3.5
    configs = {(e["bits"], e["group_size"], e["sym"]) for e in plan["layers"].values()}
    assert len(configs) > 1
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    for name, entry in plan["layers"].items():
        got = layer_config(qc, name)
        assert {k: got[k] for k in ("bits", "group_size", "sym")} == {k: entry[k] for k in ("bits", "group_size", "sym")}
        assert got.get("outliers", 0) == entry.get("outliers", 0)
        assert got.get("lut", False) == entry.get("lut", False)
        with safe_open(str(out / "model.safetensors"), framework="pt") as st:
            assert st.get_slice(name + ".qweight").get_shape() == [packed_length(SHAPES[name][1], entry["bits"]),
                                                                    SHAPES[name][0]]
    assert summary["predicted_error"] == pytest.approx(sum(e["predicted_error"] for e in plan["layers"].values()))
    assert bitsmith.formats.checkpoint.verify(out) == []


def test_load_reproduces_the_quantize_time_perplexity(planned, stories_split):
    out, summary = planned
    windows = data.eval_windows(data.tokenize(open_source(str(out)).tokenizer(), stories_split[1].read_text()), 128)
    loaded = evaluate(bitsmith.load(str(out)), windows, progress=False)
    assert loaded["tokens"] == summary["eval"]["tokens"]
    assert loaded["perplexity"] == summary["eval"]["perplexity"]


@pytest.fixture(scope="module")
def measurement(planned, stories_path):
    opts = QuantizeOptions(**CALIB)
    opts.validate()
    return Measurement.load(planned[0] / "measurement.json", open_source(str(stories_path)), opts), opts


def test_the_summary_measures_the_loss_increase_it_predicted(planned, measurement, stories_path, stories_split):
    """The measured side of the summary is the NLL the base and the quantized model give on the Fisher windows."""
    out, summary = planned
    m, opts = measurement
    got = summary["measured_error"]
    assert got["windows"] == m.fisher_windows == 4 and got["base_nll"] == m.base_nll
    source = open_source(str(stories_path))
    opts = QuantizeOptions(**CALIB, calib=[str(stories_split[0])])
    windows = calibration(source, opts, progress=False).windows[:got["windows"]]
    base = evaluate(load_model(source), windows, progress=False)
    quantized = evaluate(bitsmith.load(str(out)), windows, progress=False)
    # both streams (the Fisher's and the quantized calibration stream) run their matmuls in bf16, the evaluation in
    # float32: gaps of 3.7e-4 and 1.2e-3 (relative) measured on two plans, 7.8e-4 on the base
    assert math.log(base["perplexity"]) == pytest.approx(m.base_nll, rel=2.5e-3)
    assert math.log(quantized["perplexity"]) == pytest.approx(got["nll"], rel=2.5e-3)
    assert got["nats_per_token"] == pytest.approx(got["nll"] - got["base_nll"]) and got["nats_per_token"] > 0


def test_measurement_covers_every_candidate_of_every_linear(measurement):
    m, _ = measurement
    assert len(m.shapes) == 35 and m.candidates == [c for c in CANDIDATES if c not in BESIDE_CODEBOOKS]
    for proxy in ("fisher", "hessian"):
        for errors in m.errors[proxy].values():
            assert len(errors) == len(m.candidates) and all(e >= 0 for e in errors)
    # more bits on the same grid never measure worse (8-bit g32 is the finest candidate of each linear)
    for errors in m.errors["fisher"].values():
        e = dict(zip(((c.bits, c.group_size, c.sym, c.outliers) for c in m.candidates), errors))
        assert e[(8, 32, False, 0)] <= e[(4, 32, False, 0)] <= e[(3, 32, False, 0)] <= e[(2, 32, False, 0)]


def measured(m: Measurement, candidates) -> list:
    """Those of `candidates` that the measurement `m` has (at least one)."""
    mine = [c for c in candidates if c in m.candidates]
    assert mine
    return mine


def test_candidates_unused_beside_codebooks_are_measured_only_without_them():
    """2-bit outliers and per-input-channel grids and 4-bit tables are left out when codebooks of pairs are on the
    menu, and measured (in the candidates' order) when they are not."""
    assert {(c.technique, c.bits) for c in BESIDE_CODEBOOKS} == {("outliers", 2), ("per-ic", 2), ("lut", 4)}
    full = measured_candidates(TECHNIQUES)
    assert not BESIDE_CODEBOOKS & set(full) and len(full) == len(CANDIDATES) - len(BESIDE_CODEBOOKS)
    without = measured_candidates(tuple(t for t in TECHNIQUES if t != "vq"))
    assert BESIDE_CODEBOOKS <= set(without) and without == [c for c in CANDIDATES if not c.vq]
    assert measured_candidates(("per-ic",)) == list(PER_IC_CANDIDATES)


def test_outlier_candidates_are_priced_by_their_layout_and_lower_the_error(measurement):
    m, _ = measurement
    assert OUTLIER_CANDIDATES and all(c.outliers for c in OUTLIER_CANDIDATES)
    table = m.errors["fisher"]
    for c in measured(m, OUTLIER_CANDIDATES):
        j, plain = m.candidates.index(c), m.candidates.index(replace(c, outliers=0.0))
        for name, (out, inp) in m.shapes.items():
            k = outlier_count(c.outliers, inp)
            assert m.cost(name, j) == GPTQLayout.stored_bits(out, inp, c) + csr_bits(out, inp, out * k)
            if k == 0:                       # a budget that rounds to none is plain GPTQ, bit for bit
                assert table[name][j] == table[name][plain]
        assert sum(table[n][j] for n in m.shapes) < sum(table[n][plain] for n in m.shapes)


def test_lookup_table_candidates_are_priced_by_their_layout(measurement):
    m, _ = measurement
    assert LUT_CANDIDATES and all(c.lut and c.group_size == -1 for c in LUT_CANDIDATES)
    for c in measured(m, LUT_CANDIDATES):
        j = m.candidates.index(c)
        for name, (out, inp) in m.shapes.items():
            assert m.cost(name, j) == 32 * packed_length(inp, c.bits) * out + 16 * out * 2 ** c.bits
            assert m.errors["fisher"][name][j] > 0


def test_per_input_channel_candidates_are_priced_by_their_layout(measurement):
    m, _ = measurement
    assert PER_IC_CANDIDATES and all(c.per_ic and PER_IC_WINDOW % c.group_size == 0 for c in PER_IC_CANDIDATES)
    for c in measured(m, PER_IC_CANDIDATES):
        j = m.candidates.index(c)
        for name, (out, inp) in m.shapes.items():
            groups = -(-out // c.group_size)
            assert m.cost(name, j) == 32 * packed_length(inp, c.bits) * (out + groups) + 16 * groups * inp
            assert m.errors["fisher"][name][j] > 0
    # more bits on the same grouping never measure worse over the model
    total = {(c.bits, c.group_size): sum(m.errors["fisher"][n][m.candidates.index(c)] for n in m.shapes)
             for c in measured(m, PER_IC_CANDIDATES)}
    assert total[(4, 64)] < total[(3, 64)] and total[(4, 128)] < total[(3, 128)]


def test_codebook_candidates_are_priced_by_their_layout_and_measured_under_whole_matrix_codebooks(measurement):
    m, _ = measurement
    assert VQ_CANDIDATES and all(c.vq and c.group_size % 2 == 0 for c in VQ_CANDIDATES)
    total = {}
    for c in VQ_CANDIDATES:
        j = m.candidates.index(c)
        for name, (out, inp) in m.shapes.items():
            blocks = -(-inp // c.group_size)
            assert m.cost(name, j) == (32 * packed_length(inp // 2, 2 * c.bits) * out
                                       + 16 * blocks * 2 ** (2 * c.bits) * 2 + 16 * out)
            assert m.errors["fisher"][name][j] > 0
        total[c.bits] = sum(m.errors["fisher"][n][j] for n in m.shapes)
    assert total[4] < total[3] < total[2]


def test_column_bits_take_their_widths_from_the_stack_of_grids_or_a_pass_of_their_own_alike():
    """With the uniform grid of R bits in the stack, the column-bits candidate around R reads its widths from that
    pass; without it, from a pass of its own: the same widths, so the same loss up to the loops' float sums."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(1024, 512, generator=g) * torch.logspace(0, 1.5, 512)
    H, W = 2 * X.t() @ X / 1024, torch.randn(300, 512, generator=g) / 16
    opts = QuantizeOptions()
    opts.validate()
    grids = [GridConfig(3, 128), GridConfig(4, 32)]
    column_bits = [LayerPlan(3, 128, False, column_bits=True)]
    stacked, _ = sampled_losses(W, H, torch.ones(300), grids, opts, column_bits=column_bits)
    alone, _ = sampled_losses(W, H, torch.ones(300), [], opts, column_bits=column_bits)
    assert stacked[-1] == pytest.approx(alone[0], rel=1e-4) and stacked[-1] < stacked[0]


def test_the_sampled_codebook_loss_estimates_the_whole_linears():
    """Codebooks are shared by all rows: the measurement fits them on the whole matrix and runs GPTQ on its
    sample of rows, so the Horvitz-Thompson sum of the sampled rows' losses lands near the whole linear's loss."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(1024, 128, generator=g)
    H, W = 2 * X.t() @ X / 1024, torch.randn(600, 128, generator=g) * (0.5 + torch.rand(600, 1, generator=g))
    opts = QuantizeOptions()
    opts.validate()
    fisher = torch.ones(600)
    _, plain = sampled_losses(W, H, fisher, [], opts, vq=[LayerPlan(3, 64, False, vq=True)])
    _, whole = gptq_vq(W, H, 3, 64, opts.act_order, opts.damp, keep=False)
    assert plain[0] == pytest.approx(float(whole.sum()), rel=0.05)


def test_window_sample_takes_whole_windows_in_order_with_their_weights():
    size = torch.tensor([1.0] * 128 + [100.0] * 128 + [1.0] * 128 + [50.0] * 64)      # 4 windows, the last short
    rows, weight = window_sample(size, 128, 2)
    assert rows.tolist() == list(range(128, 256)) + list(range(384, 448))             # the two largest, in order
    assert torch.equal(weight[:128], torch.ones(128))                                  # taken for certain
    assert weight[128:].tolist() == pytest.approx([(128 + 128 + 3200) / 3200] * 64, rel=0.01)   # 1 / its chance
    rows, weight = window_sample(torch.ones(448), 128, 2)
    assert len(rows) in (128 + 128, 128 + 64) and all(r % 128 == 0 for r in rows[::128].tolist())
    assert (weight > 1).all()                                                          # each stands for others
    rows, weight = window_sample(torch.ones(200), 128, 2)                              # few rows: all of them
    assert rows.tolist() == list(range(200)) and torch.equal(weight, torch.ones(200))


def test_a_measurement_of_format_1_plans_without_outliers(planned, measurement, stories_path, tmp_path, capsys):
    m, opts = measurement
    old = json.loads((planned[0] / "measurement.json").read_text())
    keep = [j for j, c in enumerate(m.candidates) if not (c.outliers or c.lut or c.per_ic or c.vq or c.column_bits
                                                             or c.dq)]
    old["format_version"] = 1
    old["candidates"] = [{k: v for k, v in old["candidates"][j].items()
                          if k not in ("outliers", "lut", "per_ic", "vq", "column_bits", "dq")}
                         for j in keep]
    for entry in old["layers"].values():
        for key in ("bits", "fisher", "hessian"):
            entry[key] = [entry[key][j] for j in keep]
    (tmp_path / "v1.json").write_text(json.dumps(old))
    capsys.readouterr()
    v1 = Measurement.load(tmp_path / "v1.json", open_source(str(stories_path)), opts)
    assert ("format 1 has no outlier, lookup-table, per-input-channel, codebook, column-bits and dq candidates"
            in capsys.readouterr().err)
    assert v1.candidates == list(PLAIN_CANDIDATES)
    plan = decide(v1, 3.0, opts)
    assert not any(layer.outliers or layer.lut or layer.per_ic or layer.vq or layer.column_bits
                   for layer in plan.layers.values())
    old["format_version"] = 9
    (tmp_path / "v9.json").write_text(json.dumps(old))
    with pytest.raises(InputError, match="measurement format 9, expected 8 \\(or 1-7\\); measure again"):
        Measurement.load(tmp_path / "v9.json", open_source(str(stories_path)), opts)


def test_a_measurement_records_whose_labels_its_fisher_is_of(planned, measurement, stories_path, tmp_path):
    """The Fisher of the text's labels by default, recorded; a measurement from before the choice was of them."""
    m, opts = measurement
    assert m.fisher_labels == "data"
    body = json.loads((planned[0] / "measurement.json").read_text())
    assert body["fisher"]["labels"] == "data"
    body["fisher"]["labels"] = "model"
    (tmp_path / "model.json").write_text(json.dumps(body))
    assert Measurement.load(tmp_path / "model.json", open_source(str(stories_path)), opts).fisher_labels == "model"
    del body["fisher"]["labels"]
    (tmp_path / "before.json").write_text(json.dumps(body))
    assert Measurement.load(tmp_path / "before.json", open_source(str(stories_path)), opts).fisher_labels == "data"
    body["fisher"]["labels"] = "oracle"
    (tmp_path / "bad.json").write_text(json.dumps(body))
    with pytest.raises(InputError, match="Fisher labels 'oracle', expected one of model, data"):
        Measurement.load(tmp_path / "bad.json", open_source(str(stories_path)), opts)


def test_a_measurement_with_the_models_labels_weights_by_their_fisher(planned, stories_path, stories_split, tmp_path):
    """--fisher-labels model reaches the measurement: the same calibration and stored bits, other Fisher-weighted
    errors, and the labels recorded."""
    bitsmith.quantize(str(stories_path), str(tmp_path / "model"), target_bpw=3.5, calib=[str(stories_split[0])],
                      **CALIB, fisher_labels="model", progress=False)
    data = json.loads((planned[0] / "measurement.json").read_text())
    model = json.loads((tmp_path / "model" / "measurement.json").read_text())
    assert model["fisher"]["labels"] == "model" and model["fisher"]["nll"] == data["fisher"]["nll"]
    assert model["calibration_fingerprint"] == data["calibration_fingerprint"]
    for name, layer in model["layers"].items():
        assert layer["bits"] == data["layers"][name]["bits"]
        assert layer["fisher"] != data["layers"][name]["fisher"]


def test_decide_keeps_outliers_where_they_pay():
    """A synthetic table where 1 % outliers at 2 bits is nearly as good as 4 bits: the plan keeps them, priced
    by the dense-and-sparse layout, and the entries carry the fraction."""
    shapes = {f"l{i}": (64, 576) for i in range(4)}
    candidates = [LayerPlan(2, 128, False), LayerPlan(2, 128, False, outliers=0.01), LayerPlan(4, 128, False)]
    errors = {proxy: {n: [1.0, 0.011, 0.01] for n in shapes} for proxy in ("fisher", "hessian")}
    m = Measurement("s", "c", "d", {}, candidates, shapes, [[n] for n in shapes], errors)
    weights = sum(o * i for o, i in shapes.values())
    target = (sum(m.cost(n, 1) for n in shapes) + 5) / weights
    plan = decide(m, target, QuantizeOptions())
    assert all(layer == LayerPlan(2, 128, False, 0.011, 0.01) for layer in plan.layers.values())
    assert plan_bits(plan, shapes)[0] <= target * weights


def test_decisions_are_deterministic_monotone_and_within_budget(measurement):
    m, opts = measurement
    weights = sum(o * i for o, i in m.shapes.values())
    last = None
    for target in (2.75, 3.0, 3.25, 3.5, 4.25, 6.0):
        plan = decide(m, target, opts)
        assert plan.layers == decide(m, target, opts).layers
        bits = sum(m.cost(n, m.candidates.index(replace(layer, predicted_error=None)))
                   for n, layer in plan.layers.items())
        assert target - 0.02 <= bits / weights <= target
        if last is not None:
            assert plan.predicted_error() <= last
        last = plan.predicted_error()
    with pytest.raises(InputError, match="below the least this model can be stored in"):
        decide(m, 1.0, opts)


@pytest.mark.parametrize("menu", [("uniform",), ("uniform", "wide"), ("uniform", "lut"), ("uniform", "outliers"),
                                  ("uniform", "per-ic"), ("lut", "per-ic"), ("uniform", "column-bits")])
def test_a_menu_restricts_the_plan_to_its_techniques(measurement, menu):
    """Every linear of a plan from a restricted menu gets one of its techniques; its predicted error is the least
    among those (no better than the full menu's, no worse than uniform grids alone when they are offered)."""
    m, opts = measurement
    full = decide(m, 3.25, opts)
    narrow = decide(m, 3.25, replace(opts, menu=menu))
    assert {layer.technique for layer in narrow.layers.values()} <= set(menu)
    assert narrow.predicted_error() >= full.predicted_error()
    if "uniform" in menu:
        assert narrow.predicted_error() <= decide(m, 3.25, replace(opts, menu=("uniform",))).predicted_error()
    assert len({layer.technique for layer in full.layers.values()}) > 1      # the full menu mixes


def test_a_menu_the_measurement_cannot_serve_is_refused(measurement):
    m, opts = measurement
    uniform_only = replace(m, candidates=[c for c in m.candidates if c.technique == "uniform"],
                           errors={proxy: {n: [e for c, e in zip(m.candidates, errs) if c.technique == "uniform"]
                                           for n, errs in table.items()} for proxy, table in m.errors.items()})
    with pytest.raises(InputError, match="no candidate of these techniques"):
        decide(uniform_only, 3.25, replace(opts, menu=("lut",)))


@pytest.mark.parametrize("menu, text", [("grids", "--menu grids: a comma-separated choice among uniform, "),
                                        (",", "--menu : a comma-separated choice")])
def test_an_unknown_menu_is_one_line_and_exit_2(stories_path, stories_split, tmp_path, menu, text):
    r = run("quantize", stories_path, "-o", tmp_path / "q", "--calib", stories_split[0], "--target-bpw", "3",
            "--menu", menu)
    one_line_error(r, text)
    assert not (tmp_path / "q").exists()


def test_a_uniform_menu_measures_only_grids_and_writes_a_gptq_checkpoint(planned, stories_path, stories_split,
                                                                          tmp_path):
    """`--menu uniform` measures the grids of GPTQ's widths alone, with the errors the full measurement has for
    them, and the plan it makes is a GPTQ-convention checkpoint."""
    out = tmp_path / "u"
    bitsmith.quantize(str(stories_path), str(out), target_bpw=3.5, calib=[str(stories_split[0])], **CALIB,
                      menu="uniform", progress=False)
    mine, full = (json.loads(p.read_text()) for p in (out / "measurement.json", planned[0] / "measurement.json"))
    grids = sum(c.technique == "uniform" for c in PLAIN_CANDIDATES)          # GPTQ's widths come first
    assert mine["candidates"] == full["candidates"][:grids] and grids == 16
    for name, layer in mine["layers"].items():
        assert layer["fisher"] == pytest.approx(full["layers"][name]["fisher"][:grids], rel=1e-5)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "gptq"


def test_replan_from_the_measurement_and_apply_a_plan(planned, stories_path, stories_split, tmp_path):
    out, _ = planned
    calib = [str(stories_split[0])]
    again = bitsmith.quantize(str(stories_path), str(tmp_path / "t30"), target_bpw=3.0, calib=calib, **CALIB,
                              measurement=str(out / "measurement.json"), progress=False)
    assert 2.98 <= again["bits_per_weight"] <= 3.0 and again["predicted_error_unit"] == "nats/token"
    hessian = bitsmith.quantize(str(stories_path), str(tmp_path / "h30"), target_bpw=3.0, calib=calib, **CALIB,
                                proxy="hessian", measurement=str(out / "measurement.json"), progress=False)
    assert hessian["predicted_error_unit"] == "GPTQ loss (hessian proxy; not nats)"     # a sum of GPTQ losses
    r = run("inspect", tmp_path / "h30")
    assert "predicted loss increase" in r.output and "GPTQ loss (hessian proxy; not nats)" in r.output
    assert json.loads((tmp_path / "t30" / "measurement.json").read_text()) == json.loads(
        (out / "measurement.json").read_text())                          # carried forward, unchanged
    bitsmith.quantize(str(stories_path), str(tmp_path / "p"), plan=str(out / "plan.json"), calib=calib,
                             **CALIB, progress=False)
    assert json.loads((tmp_path / "p" / "plan.json").read_text())["layers"] == json.loads(
        (out / "plan.json").read_text())["layers"]
    with safe_open(str(out / "model.safetensors"), framework="pt") as a, \
            safe_open(str(tmp_path / "p" / "model.safetensors"), framework="pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for key in a.keys():
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(r, text):
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and text in lines[0], r.output


def test_a_measurement_of_another_model_or_other_options_is_refused(planned, stories_path, stories_split,
                                                                    tmp_path):
    out, _ = planned
    edited = json.loads((out / "measurement.json").read_text())
    edited["source_fingerprint"] = "0" * 64
    (tmp_path / "other.json").write_text(json.dumps(edited))
    args = ["quantize", stories_path, "--target-bpw", "3", "--calib", stories_split[0], "--nsamples", "16",
            "--seqlen", "128"]
    r = run(*args, "-o", tmp_path / "a", "--measurement", tmp_path / "other.json")
    one_line_error(r, "measured on a different model")
    r = run(*args, "-o", tmp_path / "b", "--measurement", out / "measurement.json", "--damp", "0.1")
    one_line_error(r, "measured with damp=0.01, this run has 0.1")
    (tmp_path / "bad.json").write_text("{\"format_version\": 1}")
    r = run(*args, "-o", tmp_path / "c", "--measurement", tmp_path / "bad.json")
    one_line_error(r, "not a bitsmith measurement")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json", "other.json"]


@pytest.mark.parametrize("edit, text", [
    (lambda p: p["layers"].pop("model.layers.4.mlp.up_proj"), "no entry for model.layers.4.mlp.up_proj"),
    (lambda p: p["layers"].update({"model.layers.5.mlp.up_proj": {"bits": 4, "group_size": 32}}),
     "model.layers.5.mlp.up_proj is not a linear of this model"),
    (lambda p: p["layers"]["model.layers.0.mlp.up_proj"].update(bits=7), "bits 7: choose one of 2, 3, 4, 5, 6, 8"),
    (lambda p: p["layers"]["model.layers.0.mlp.up_proj"].update(group_size=48, per_ic=False, lut=False, vq=False,
                                                                 outliers=0),
     "group size 48 does not divide"),
])
def test_an_invalid_plan_file_is_one_line_and_exit_2(planned, stories_path, stories_split, tmp_path, edit, text):
    plan = json.loads((planned[0] / "plan.json").read_text())
    edit(plan)
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    r = run("quantize", stories_path, "-o", tmp_path / "q", "--plan", tmp_path / "plan.json", "--nsamples", "4",
            "--seqlen", "64", "--calib", stories_split[0])
    one_line_error(r, text)
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("args, text", [
    (["--plan", "P", "--target-bpw", "3"], "does not combine with --target-bpw"),
    (["--measurement", "P"], "give --target-bpw too"),
    (["--target-bpw", "0"], "expected all-in bits per weight"),
    (["--target-bpw", "3", "--measurement", "missing.json"], "no such file"),
    (["--plan", "missing.json"], "cannot be read"),
])
def test_plan_options_are_checked_before_any_work(stories_path, stories_split, tmp_path, args, text):
    (tmp_path / "P").write_text("{}")
    args = [str(tmp_path / a) if a in ("P", "missing.json") else a for a in args]
    r = run("quantize", stories_path, "-o", tmp_path / "q", "--calib", stories_split[0], *args)
    one_line_error(r, text)
    assert not (tmp_path / "q").exists()


def test_a_copied_checkpoint_with_an_edited_plan_fails_verify(planned, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(planned[0], copy)
    plan = json.loads((copy / "plan.json").read_text())
    plan["layers"]["model.layers.0.mlp.up_proj"]["bits"] = 8
    (copy / "plan.json").write_text(json.dumps(plan))
    assert bitsmith.formats.checkpoint.verify(copy) != []


def test_a_planned_run_draws_its_windows_once_and_measures_on_them(stories_path, stories_split, tmp_path,
                                                                    monkeypatch):
    """With `--calib self` next to a file, the model is sampled once: the measurement runs on the windows the
    quantization calibrates on (its calibration fingerprint is theirs)."""
    from bitsmith.calibration import data
    calls = []
    sample = data.self_windows
    monkeypatch.setattr(data, "self_windows", lambda *a, **k: calls.append(a[1:3]) or sample(*a, **k))
    out = tmp_path / "mixed"
    summary = bitsmith.quantize(str(stories_path), str(out), target_bpw=3.5, calib=[str(stories_split[0]), "self"],
                                **CALIB, menu="uniform", progress=False)
    assert calls == [(CALIB["nsamples"] // 2, CALIB["seqlen"])]
    measured = json.loads((out / "measurement.json").read_text())
    assert "interleaved with 8 x 128 tokens sampled from the model" in summary["calibration"]
    manifest = json.loads((out / "bitsmith_manifest.json").read_text())["calibration"]
    assert (measured["calibration_fingerprint"], measured["calibration"]) == (manifest["fingerprint"],
                                                                              manifest["description"])

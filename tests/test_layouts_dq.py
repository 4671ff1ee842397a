"""The layout of double-quantized scales (bitsmith/layouts.py `DQLayout`): its stored size is the bytes it writes,
the weight it holds is Q, its module reproduces Q and refuses codes, units and group indices that do not fit, its
configuration entries are checked, SignRound and tuning keep its scales on their lattice; end to end on stories260K,
a plan with it in the MLP is quantized, loaded (the quantize-time perplexity again), verified and inspected."""
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

import bitsmith
from bitsmith.calibration import data
from bitsmith.calibration.perplexity import evaluate
from bitsmith.formats.errors import InputError
from bitsmith.formats.source import open_source
from bitsmith.kernels.dq_linear import DQLinear
from bitsmith.layouts import DQLayout, GPTQLayout, layer_plan, layout_of
from bitsmith.plan import LayerPlan, check_layer
from bitsmith.quantize.gptq import gptq_quantize
from bitsmith.quantize.grid import SCALE_CODES, coded_scales
from bitsmith.quantize.rtn import DQWeight
from bitsmith.quantize.signround import learned
from bitsmith.quantize.tune import TunedLinear


def problem(out: int, inp: int, seed: int, spread: float = 1.5):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(max(2 * inp, 64), inp, generator=g) * torch.logspace(0, spread, inp)
    W = 0.05 * torch.randn(out, inp, generator=g)
    return W, 2 * X.t() @ X / X.shape[0]


@settings(max_examples=25, deadline=None)
@given(out=st.integers(1, 24), inp=st.sampled_from([32, 64, 96, 200, 320]), bits=st.sampled_from([3, 4, 5, 6]),
       group=st.sampled_from([32, 64]), seed=st.integers(0, 99))
def test_stored_bits_is_the_size_of_what_is_written_and_the_weight_is_Q(out, inp, bits, group, seed):
    W, H = problem(out, inp, seed)
    qw = gptq_quantize(W, H, bits, group, act_order=True, mse=True, dq=True)
    assert isinstance(qw, DQWeight)
    layer = LayerPlan(bits, group, False, dq=True)
    assert layout_of(layer) is DQLayout and layer.technique == "dq" and layer.key() == f"w{bits}g{group}dq"
    tensors = DQLayout.tensors(qw)
    assert sorted(tensors) == sorted(DQLayout.parts)
    assert tensors["scale_codes"].dtype == torch.uint8 and tensors["g_idx"].dtype == torch.uint8
    assert DQLayout.stored_bits(out, inp, layer) == nbits(tensors)
    assert torch.equal(DQLayout.weight(tensors.__getitem__, layer, inp), qw.Q)
    # every scale is fp16(c u) with a whole code c in 1..255 of its row's unit
    assert torch.equal(coded_scales(tensors["scale_codes"], tensors["scale_unit"]), qw.scales)


def test_it_costs_what_its_codes_and_scale_codes_cost():
    """8 bits a group and row, 16 a row, 8 an input (g_idx, at most 256 groups), against GPTQ's 16 a group and
    row and 32 an input: w4g64 on [576, 576] is 4.229 bits a weight against 4.368."""
    n = 576 * 576
    dq = DQLayout.stored_bits(576, 576, LayerPlan(4, 64, False, dq=True)) / n
    assert dq == pytest.approx(4 + 4 * 9 / 576 + 8 * 9 / 576 + 16 / 576 + 8 / 576)
    assert GPTQLayout.stored_bits(576, 576, LayerPlan(4, 64, False)) / n == pytest.approx(
        4 + 4 * 9 / 576 + 16 * 9 / 576 + 32 / 576)


@pytest.mark.parametrize("bits, group", [(3, 32), (4, 64), (6, 32)])
def test_its_error_is_that_of_fp16_scales_within_a_percent(bits, group):
    """The lattice of 255 codes per row costs GPTQ almost nothing: its codes are fitted to the scales stored."""
    W, H = problem(48, 256, bits)
    err = lambda qw: float(torch.einsum("oi,ij,oj->", qw.Q - W, H, qw.Q - W))
    fp16 = err(gptq_quantize(W, H, bits, group, act_order=True, mse=True))
    assert err(gptq_quantize(W, H, bits, group, act_order=True, mse=True, dq=True)) == pytest.approx(fp16, rel=0.01)


@pytest.mark.parametrize("bits, group", [(3, 32), (4, 64), (5, 32)])
def test_module_reproduces_Q(bits, group):
    W, H = problem(40, 192, bits)
    qw = gptq_quantize(W, H, bits, group, act_order=True, mse=True, dq=True)
    check_module_reproduces(qw, LayerPlan(bits, group, False, dq=True), DQLinear, bits)


def test_stored_tensors_that_do_not_fit_are_refused_at_load():
    W, H = problem(8, 256, 0)
    qw = gptq_quantize(W, H, 4, 64, act_order=True, dq=True)
    layer = LayerPlan(4, 64, False, dq=True)
    good = DQLayout.tensors(qw)
    for change, message in (({"scale_codes": torch.zeros_like(good["scale_codes"])}, "outside 1..255"),
                            ({"scale_codes": good["scale_codes"].float()}, "must be integers"),
                            ({"scale_unit": -good["scale_unit"]}, "positive finite"),
                            ({"scale_unit": torch.full_like(good["scale_unit"], float("nan"))}, "positive finite"),
                            ({"g_idx": torch.full((256,), 4, dtype=torch.uint8)}, "outside 0..3")):
        module = DQLayout.module(256, 8, layer, bias=False)
        with pytest.raises(InputError, match=message):
            module.load_state_dict({**good, **change}, assign=True)              # as the loader loads
    module = DQLayout.module(256, 8, layer, bias=False)
    with pytest.raises(RuntimeError, match="size mismatch for g_idx"):
        module.load_state_dict({**good, "g_idx": good["g_idx"][:-1]}, assign=True)
    module = DQLayout.module(256, 8, layer, bias=False)
    module.load_state_dict({**good, "g_idx": good["g_idx"].to(torch.int32)}, assign=True)   # any integer type
    assert torch.equal(module.dequantize(), qw.Q)


def test_a_scale_off_its_lattice_is_not_written():
    W, H = problem(8, 128, 1)
    qw = gptq_quantize(W, H, 4, 64, act_order=True, dq=True)
    with pytest.raises(ValueError, match="lattice"):
        DQLayout.tensors(DQWeight(**{**qw.__dict__, "unit": qw.unit / 2 ** 9}))       # codes past 255
    with pytest.raises(ValueError, match="lattice"):
        DQLayout.tensors(DQWeight(**{**qw.__dict__, "scales": qw.scales * 1.001}))   # between two codes


@pytest.mark.parametrize("entry, message", [
    ({"bits": 4, "group_size": 64, "sym": False, "dq": 1}, "dq 1"),
    ({"bits": 4, "group_size": -1, "sym": False, "dq": True}, "group_size -1"),
    ({"bits": 4, "group_size": 64, "sym": False, "dq": True, "outliers": 0.01}, "no outliers"),
    ({"bits": 4, "group_size": 64, "sym": False, "dq": True, "per_ic": True}, "per-input-channel"),
])
def test_dq_entries_of_a_checkpoint_are_checked(entry, message):
    with pytest.raises(InputError, match=message):
        layer_plan(entry, "ckpt: model.layers.0.mlp.up_proj")


def test_plan_entries_with_dq_need_gptq():
    with pytest.raises(InputError, match="dq needs --method gptq"):
        check_layer(LayerPlan(4, 64, False, dq=True), "model.layers.0.mlp.up_proj", 256, "rtn")


def test_signround_keeps_its_scales_on_the_lattice():
    W, H = problem(16, 128, 2)
    qw = gptq_quantize(W, H, 3, 32, act_order=True, mse=True, dq=True)
    grid = learned(W, qw, "gptq")
    assert torch.equal(grid(), qw.Q) and torch.equal(grid.result().Q, qw.Q)
    with torch.no_grad():
        grid.a.fill_(0.83)
        grid.b.fill_(0.91)
    moved = grid.result()
    codes = moved.scales.float() / moved.unit.float()
    assert not torch.equal(moved.scales, qw.scales)
    assert torch.equal(codes.round(), codes) or torch.allclose(codes, codes.round(), atol=0.2)
    assert torch.equal(DQLayout.weight(DQLayout.tensors(moved).__getitem__, LayerPlan(3, 32, False, dq=True), 128),
                       moved.Q)


def test_tuning_moves_whole_scale_codes_and_writes_what_it_ran():
    W, H = problem(16, 128, 3)
    qw = gptq_quantize(W, H, 4, 32, act_order=True, mse=True, dq=True)
    layer = LayerPlan(4, 32, False, dq=True)
    tensors = DQLayout.tensors(qw)
    module = TunedLinear(DQLayout.levels(tensors.__getitem__, layer, 128), None, torch.float32)
    x = torch.randn(4, 128)
    assert torch.allclose(module(x), x @ qw.Q.t(), atol=1e-6)
    with torch.no_grad():
        module.deltas[0].copy_(torch.linspace(-0.2, 0.2, module.deltas[0].numel()).view_as(module.deltas[0]))
    stored = module.stored()["scale_codes"]
    assert stored.dtype == torch.uint8 and not torch.equal(stored, tensors["scale_codes"])
    written = DQLayout.weight({**tensors, "scale_codes": stored}.__getitem__, layer, 128)
    assert torch.allclose(module(x), x @ written.t(), atol=1e-6)
    with torch.no_grad():                   # past both ends: clamped to codes 1 and 255, not wrapped by uint8
        module.deltas[0].view(-1)[0::2] = -2.0
        module.deltas[0].view(-1)[1::2] = 300.0
    stored = module.stored()["scale_codes"].view(-1)
    assert (stored[0::2] == 1).all() and (stored[1::2] == SCALE_CODES).all()


# ---------------------------------------------------------------------------------------------------
# End to end on stories260K.


@pytest.mark.slow
def test_a_plan_with_dq_end_to_end(tmp_path, stories_path, stories_split):
    special = {name for name in linear_names(stories_path) if ".mlp." in name}
    out, summary = quantize_planned(tmp_path, stories_path, stories_split, lambda name: {
        "bits": 4, "group_size": 32, "sym": False, **({"dq": True} if name in special else {})})
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert {k[:-len(".scale_codes")] for k in f.keys() if k.endswith(".scale_codes")} == special
    written = written_bits(out, ("qweight", "scales", "scale_codes", "scale_unit", "qzeros", "g_idx"))
    assert summary["bits_per_weight"] == pytest.approx(written / STORIES_WEIGHTS, abs=1e-12)
    check_loaded_and_inspected(tmp_path, out, summary, stories_split[1], special, DQLinear, "dq", "32dq")


@pytest.mark.slow
def test_tuning_a_plan_with_dq_writes_the_codes_it_tuned(tmp_path, stories_path, stories_split):
    """With --tune-epochs the scale codes move, stay whole codes in 1..255, and the checkpoint loads to the
    perplexity measured at the end of quantizing."""
    calib, held = stories_split
    names = linear_names(stories_path)
    plan = {"layers": {name: {"bits": 4, "group_size": 32, "sym": False, "dq": True} for name in names}}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    outs = {}
    for epochs in (0, 1):
        out = outs[epochs] = tmp_path / f"e{epochs}"
        r = cli("quantize", stories_path, "-o", out, "--plan", tmp_path / "plan.json", "--calib", calib, *CALIB,
                "--tune-epochs", epochs, "--tune-lr", "0.01", "--eval-data", held, "--eval-seqlen", "128",
                "--eval-max-tokens", EVAL_TOKENS, "--json", tmp_path / f"s{epochs}.json")
        assert r.exit_code == 0, r.output
    with safe_open(str(outs[0] / "model.safetensors"), framework="pt") as a, \
            safe_open(str(outs[1] / "model.safetensors"), framework="pt") as b:
        keys = [k for k in a.keys() if k.endswith(".scale_codes")]
        assert len(keys) == len(names)
        moved = [k for k in keys if not torch.equal(a.get_tensor(k), b.get_tensor(k))]
        assert moved and all(b.get_tensor(k).dtype == torch.uint8 and int(b.get_tensor(k).min()) >= 1 for k in keys)
    summary = json.loads((tmp_path / "s1.json").read_text())
    ids = data.tokenize(open_source(str(outs[1])).tokenizer(), held.read_text())
    loaded = evaluate(bitsmith.load(str(outs[1])), data.eval_windows(ids, 128, EVAL_TOKENS), progress=False)
    assert loaded["perplexity"] == summary["eval"]["perplexity"]

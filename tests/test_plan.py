"""The plan as data: validation of a plan file against the model's linears, and the round trip through JSON."""
import json

import pytest

from bitsmith.formats.errors import InputError
from bitsmith.plan import LayerPlan, QuantizeOptions, QuantPlan

LINEARS = {"model.layers.0.self_attn.q_proj": (64, 64), "model.layers.0.mlp.down_proj": (64, 172)}


def body(**overrides):
    layers = {"model.layers.0.self_attn.q_proj": {"bits": 3, "group_size": 32, "sym": True},
              "model.layers.0.mlp.down_proj": {"bits": 4, "group_size": 128, "sym": False}}
    layers.update(overrides)
    return {"format_version": 1, "layers": {k: v for k, v in layers.items() if v is not None}}


def test_round_trip_through_json():
    opts = QuantizeOptions()
    plan = QuantPlan.from_dict(body(), LINEARS, opts, "p.json")
    again = QuantPlan.from_dict(json.loads(json.dumps(plan.as_dict())), LINEARS, opts, "p.json")
    assert again.layers == plan.layers
    assert plan.layers["model.layers.0.self_attn.q_proj"] == LayerPlan(3, 32, True)
    assert plan.predicted_error() is None


def test_uniform_plan_is_the_options():
    opts = QuantizeOptions(bits=3, group_size=64, sym=True)
    plan = QuantPlan.uniform(opts, LINEARS)
    assert set(plan.layers.values()) == {LayerPlan(3, 64, True)} and list(plan.layers) == list(LINEARS)


def test_predicted_error_sums_the_entries():
    opts = QuantizeOptions()
    plan = QuantPlan(opts, {"a": LayerPlan(4, 128, False, 0.25), "b": LayerPlan(2, 32, False, 0.5)})
    assert plan.predicted_error() == 0.75


@pytest.mark.parametrize("plan, message", [
    ([], "not a plan"),
    ({"layers": []}, "not a plan"),
    (body(**{"model.layers.9.mlp.up_proj": {"bits": 4, "group_size": 128}}),
     "model.layers.9.mlp.up_proj is not a linear of this model"),
    (body(**{"model.layers.0.mlp.down_proj": None}), "no entry for model.layers.0.mlp.down_proj"),
    (body(**{"model.layers.0.mlp.down_proj": {"bits": 7, "group_size": 128}}), "bits 7: choose one of 2, 3, 4, 5, 6, 8"),
    (body(**{"model.layers.0.mlp.down_proj": {"bits": "4", "group_size": 128}}), "bits '4'"),
    (body(**{"model.layers.0.mlp.down_proj": {"bits": True, "group_size": 128}}), "bits True"),
    (body(**{"model.layers.0.mlp.down_proj": {"bits": 4, "group_size": 0}}), "group_size 0"),
    (body(**{"model.layers.0.mlp.down_proj": {"bits": 4, "group_size": 40}}),
     "group size 40 does not divide in_features 172"),
    (body(**{"model.layers.0.mlp.down_proj": {"bits": 4, "group_size": 128, "sym": "yes"}}), "sym 'yes'"),
    (body(**{"model.layers.0.mlp.down_proj": 4}), "expected an object"),
])
def test_invalid_plans_are_refused_with_the_reason(plan, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(")) as e:
        QuantPlan.from_dict(plan, LINEARS, QuantizeOptions(), "p.json")
    assert str(e.value).startswith("p.json") and "\n" not in str(e.value)


def test_outliers_round_trip_and_are_left_out_when_zero():
    opts = QuantizeOptions()
    plan = QuantPlan.from_dict(body(**{"model.layers.0.mlp.down_proj": {"bits": 2, "group_size": 128,
                                                                        "outliers": 0.01}}), LINEARS, opts, "p.json")
    assert plan.layers["model.layers.0.mlp.down_proj"] == LayerPlan(2, 128, False, outliers=0.01)
    assert plan.layers["model.layers.0.self_attn.q_proj"].outliers == 0.0      # a plan without them still reads
    written = plan.as_dict()["layers"]
    assert written["model.layers.0.mlp.down_proj"]["outliers"] == 0.01
    assert "outliers" not in written["model.layers.0.self_attn.q_proj"]        # plain entries read as before
    again = QuantPlan.from_dict(json.loads(json.dumps(plan.as_dict())), LINEARS, opts, "p.json")
    assert again.layers == plan.layers
    assert LayerPlan(3, 128, False, outliers=0.005).key() == "w3g128o0.005" and LayerPlan(3, 128, False).key() == \
        "w3g128"


@pytest.mark.parametrize("outliers, message", [
    (-0.01, "outliers -0.01"), (0.3, "outliers 0.3: a fraction of the weights from 0 to 0.25"),
    ("0.01", "outliers '0.01'"), (True, "outliers True"), (float("nan"), "outliers nan"),
])
def test_invalid_outliers_are_refused(outliers, message):
    plan = body(**{"model.layers.0.mlp.down_proj": {"bits": 3, "group_size": 128, "outliers": outliers}})
    with pytest.raises(InputError, match=message):
        QuantPlan.from_dict(plan, LINEARS, QuantizeOptions(), "p.json")


@pytest.mark.parametrize("method", ["rtn", "qoq"])
def test_outliers_need_gptq(method):
    plan = body(**{"model.layers.0.mlp.down_proj": {"bits": 4, "group_size": 4, "outliers": 0.01}})
    with pytest.raises(InputError, match=f"outliers 0.01 need --method gptq \\(this run has {method}\\)"):
        QuantPlan.from_dict(plan, LINEARS, QuantizeOptions(method=method), "p.json")


def test_lookup_tables_round_trip_and_are_left_out_when_unset():
    opts = QuantizeOptions()
    entry = {"bits": 3, "group_size": -1, "lut": True}
    plan = QuantPlan.from_dict(body(**{"model.layers.0.mlp.down_proj": entry}), LINEARS, opts, "p.json")
    assert plan.layers["model.layers.0.mlp.down_proj"] == LayerPlan(3, -1, False, lut=True)
    written = plan.as_dict()["layers"]
    assert written["model.layers.0.mlp.down_proj"]["lut"] is True
    assert "lut" not in written["model.layers.0.self_attn.q_proj"]
    assert QuantPlan.from_dict(json.loads(json.dumps(plan.as_dict())), LINEARS, opts, "p.json").layers == plan.layers
    assert LayerPlan(3, -1, False, lut=True).key() == "w3lut"


@pytest.mark.parametrize("entry, method, message", [
    ({"bits": 8, "group_size": -1, "lut": True}, "gptq", "lut with 8 bits: choose one of 2, 3, 4"),
    ({"bits": 3, "group_size": 128, "lut": True}, "gptq", "lut is one table per output row: group_size -1"),
    ({"bits": 3, "group_size": -1, "sym": True, "lut": True}, "gptq", "sym false"),
    ({"bits": 3, "group_size": -1, "outliers": 0.01, "lut": True}, "gptq", "no outliers"),
    ({"bits": 3, "group_size": -1, "lut": "yes"}, "gptq", "lut 'yes': expected true or false"),
    ({"bits": 3, "group_size": -1, "lut": True}, "rtn", r"lut needs --method gptq \(this run has rtn\)"),
])
def test_invalid_lookup_tables_are_refused(entry, method, message):
    with pytest.raises(InputError, match=message) as e:
        QuantPlan.from_dict(body(**{"model.layers.0.mlp.down_proj": entry}), LINEARS,
                            QuantizeOptions(method=method), "p.json")
    assert str(e.value).startswith("p.json")


@pytest.mark.parametrize("layer, technique", [(LayerPlan(4, 128, False), "uniform"), (LayerPlan(8, -1, True), "uniform"),
                                              (LayerPlan(5, 128, False), "wide"), (LayerPlan(6, 32, False), "wide"),
                                              (LayerPlan(5, 128, False, outliers=0.01), "outliers")])
def test_grids_of_5_and_6_bits_are_a_menu_entry_of_their_own(layer, technique):
    """`--menu uniform` keeps a plan in the GPTQ convention, whose loaders read 2, 3, 4 and 8 bits."""
    assert layer.technique == technique


def test_per_input_channel_grids_take_gptq_widths():
    with pytest.raises(InputError, match="per_ic with 5 bits: choose one of 2, 3, 4, 8"):
        QuantPlan.from_dict(body(**{"model.layers.0.mlp.down_proj": {"bits": 5, "group_size": 64, "per_ic": True}}),
                            LINEARS, QuantizeOptions(), "p.json")


@pytest.mark.parametrize("given, menu", [("lut,uniform", ("uniform", "lut")), ("per-ic, lut,per-ic", ("lut", "per-ic")),
                                         (["outliers", "uniform"], ("uniform", "outliers"))])
def test_a_menu_has_one_spelling_whatever_its_order(given, menu):
    """Menus naming the same techniques are the same option value (a resumed run compares the options)."""
    opts = QuantizeOptions(menu=given)
    opts.validate()
    assert opts.menu == menu


@pytest.mark.parametrize("given", ["", "uniform,grids", ["lut", "LUT"]])
def test_an_unknown_or_empty_menu_is_refused(given):
    with pytest.raises(InputError, match="a comma-separated choice among uniform, wide, outliers, lut, per-ic"):
        QuantizeOptions(menu=given).validate()

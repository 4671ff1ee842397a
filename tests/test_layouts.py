"""Layouts: the stored size of a configuration equals the bytes of the tensors it writes; the GPTQ config with
`dynamic` overrides gives every linear back its own configuration, and the runtime module reproduces Q."""
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitsmith.formats.errors import InputError
from bitsmith.layouts import GPTQLayout, gptq_config, layer_config, plan_bits
from bitsmith.plan import LayerPlan, QuantizeOptions, QuantPlan
from bitsmith.quantize.rtn import rtn_quantize


def nbits(tensors) -> int:
    return sum(8 * t.numel() * t.element_size() for t in tensors.values())


@settings(max_examples=40, deadline=None)
@given(out=st.integers(1, 70), inp=st.integers(1, 200), bits=st.sampled_from([2, 3, 4, 8]),
       group=st.sampled_from([-1, 32, 64, 128]), sym=st.booleans())
def test_stored_bits_is_the_size_of_what_is_written(out, inp, bits, group, sym):
    W = torch.randn(out, inp)
    qw = rtn_quantize(W, bits, group, sym)
    tensors = GPTQLayout.tensors(qw)
    assert GPTQLayout.stored_bits(out, inp, LayerPlan(bits, group, sym)) == nbits(tensors)
    module = GPTQLayout.module(inp, out, bits, group, bias=False)
    module.load_state_dict(tensors, strict=False)
    assert torch.equal(module.dequantize(), qw.Q)


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


@pytest.mark.parametrize("dynamic, message", [
    ([1, 2], "dynamic must be an object"),
    ({"+:(": {"bits": 2}}, "is not a valid regex"),
    ({"+:.*": 3}, "must map to an object"),
])
def test_malformed_dynamic_blocks_are_input_errors(dynamic, message):
    with pytest.raises(InputError, match=message):
        layer_config({"bits": 4, "dynamic": dynamic}, "model.layers.0.mlp.up_proj")

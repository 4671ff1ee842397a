"""The per-input-channel layout (bitsmith/layouts.py `PerICLayout`): its stored size is the bytes it writes, its
module reproduces Q, its configuration entries round-trip; end to end on stories260K, a plan with per-input-channel
grids in the attention is quantized, loaded (the quantize-time perplexity again), verified and inspected."""
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
from bitsmith.kernels.per_ic_linear import PerICLinear
from bitsmith.layouts import PerICLayout, layer_plan, layout_of
from bitsmith.plan import LayerPlan
from bitsmith.quantize.gptq import gptq_quantize
from bitsmith.quantize.per_ic import PerICWeight


@settings(max_examples=30, deadline=None)
@given(out=st.integers(1, 70), inp=st.integers(1, 100), bits=st.sampled_from([2, 3, 4, 8]),
       group=st.sampled_from([-1, 1, 16, 32]), seed=st.integers(0, 99))
def test_stored_bits_is_the_size_of_what_is_written_and_the_weight_is_Q(out, inp, bits, group, seed):
    g = torch.Generator().manual_seed(seed)
    groups = -(-out // (out if group == -1 else group))
    codes = torch.randint(0, 2 ** bits, (out, inp), generator=g, dtype=torch.uint8)
    scales = (torch.rand(groups, inp, generator=g) + 0.01).half()
    zeros = torch.randint(0, 2 ** bits, (groups, inp), generator=g, dtype=torch.int32)
    qw = PerICWeight(codes, scales, zeros, None, bits, group, False,
                     PerICWeight.dequantize(codes, scales, zeros, group))
    layer = LayerPlan(bits, group, False, per_ic=True)
    assert layout_of(layer) is PerICLayout
    tensors = PerICLayout.tensors(qw)
    assert sorted(tensors) == sorted(PerICLayout.parts)
    assert PerICLayout.stored_bits(out, inp, layer) == nbits(tensors)
    assert torch.equal(PerICLayout.weight(tensors.__getitem__, layer, inp), qw.Q)


@pytest.mark.parametrize("bits, group", [(2, 16), (3, 32), (4, -1), (8, 7)])
def test_module_reproduces_Q(bits, group):
    g = torch.Generator().manual_seed(bits)
    W, X = 0.05 * torch.randn(40, 80, generator=g), torch.randn(256, 80, generator=g)
    qw = gptq_quantize(W, 2 * X.t() @ X / 256, bits, group, act_order=True, per_ic=True)
    check_module_reproduces(qw, LayerPlan(bits, group, False, per_ic=True), PerICLinear, bits)

@pytest.mark.parametrize("entry, message", [
    ({"bits": 3, "group_size": 64, "sym": False, "per_ic": "yes"}, "per_ic 'yes'"),
    ({"bits": 3, "group_size": 64, "sym": False, "per_ic": True, "outliers": 0.01}, "no outliers"),
    ({"bits": 3, "group_size": -1, "sym": False, "per_ic": True, "lut": True}, "no lookup table"),
])
def test_per_input_channel_entries_of_a_checkpoint_are_checked(entry, message):
    with pytest.raises(InputError, match=message):
        layer_plan(entry, "ckpt: model.layers.0.mlp.up_proj")


# ---------------------------------------------------------------------------------------------------
# End to end on stories260K.


@pytest.mark.slow
def test_a_plan_with_per_input_channel_grids_end_to_end(tmp_path, stories_path, stories_split):
    per_ic = {name for name in linear_names(stories_path) if ".self_attn." in name}
    out, summary = quantize_planned(tmp_path, stories_path, stories_split, lambda name: {
        "bits": 3, "group_size": 32, "sym": False, **({"per_ic": True} if name in per_ic else {})})
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        per_input = {k[:-len(".scales")] for k in f.keys() if k.endswith(".scales") and ".self_attn." in k
                     and f.get_slice(k).get_shape()[1] == 64}                       # [G, in]: one per input
        assert per_input == per_ic and not any(k.endswith(".g_idx") for k in f.keys() if ".self_attn." in k)
    written = written_bits(out, ("qweight", "scales", "qzeros", "g_idx"))
    assert summary["bits_per_weight"] == pytest.approx(written / STORIES_WEIGHTS, abs=1e-12)
    check_loaded_and_inspected(tmp_path, out, summary, stories_split[1], per_ic, PerICLinear, "per_ic", "ic32")


def test_the_decode_copy_follows_new_weights():
    """The CPU decode path's bf16 copy of W is made again after load_state_dict and when a buffer is replaced."""
    g = torch.Generator().manual_seed(5)
    W1, W2 = (0.05 * torch.randn(48, 64, generator=g) for _ in range(2))
    X = torch.randn(256, 64, generator=g)
    H = 2 * X.t() @ X / 256
    layer = LayerPlan(4, 16, False, per_ic=True)
    first, second = (gptq_quantize(W, H, 4, 16, per_ic=True) for W in (W1, W2))
    module = layout_of(layer).module(64, 48, layer, bias=False)
    module.load_state_dict(PerICLayout.tensors(first))
    x = torch.randn(1, 64, generator=g)

    def close(qw):
        want = x @ qw.Q.t()
        return ((module(x) - want).norm() / want.norm()).item() < 2 ** -7

    assert close(first)
    module.load_state_dict(PerICLayout.tensors(second))
    assert close(second)
    module.scales = PerICLayout.tensors(first)["scales"].clone()            # a new tensor object
    module.qweight = PerICLayout.tensors(first)["qweight"].clone()
    module.qzeros = PerICLayout.tensors(first)["qzeros"].clone()
    assert close(first)

"""Loading any MODEL into a transformers nn.Module: quantized linears become the runtime module of their layout
(bitsmith/layouts.py; torch reference on CPU), every other tensor is read from the checkpoint as stored and cast to
the compute dtype, but a bf16 vocabulary matrix in a float32 model, held as stored (kernels/vocab.py)."""
from __future__ import annotations

import torch

from . import gptq_formats, pack_quantized  # noqa: F401  (register the readers of GPTQ v2 and compressed-tensors folders)
from .calibration.adapter import skeleton
from .formats.errors import InputError
from .formats.source import ModelSource, open_source
from .kernels.linear import QuantizedLinear
from .kernels.vocab import hold_vocabulary
from .kernels.w4a8_linear import W4A8Linear
from .layouts import layer_config, layer_plan, layout_of


def load_model(model: str | ModelSource, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """A ready-to-run model: `dtype` is the compute dtype of everything that is not packed."""
    source = open_source(str(model)) if not isinstance(model, ModelSource) else model
    config = source.config
    qconfig = config.get("quantization_config")
    net = skeleton(config)
    names = set(source.keys())
    with torch.device("meta"):          # shapes only: to_empty allocates, the checkpoint's tensors fill
        for name, module in list(net.named_modules()):
            if isinstance(module, torch.nn.Linear) and f"{name}.channel_scale" in names:
                layer = layer_config(qconfig or {}, name) or {}
                net.set_submodule(name, W4A8Linear(module.in_features, module.out_features,
                                                   layer.get("group_size", 128), bias=module.bias is not None))
            elif isinstance(module, torch.nn.Linear) and f"{name}.qweight" in names:
                net.set_submodule(name, _quantized_linear(source, name, module, qconfig))
    net = net.to_empty(device="cpu")
    wanted = list(net.state_dict())
    for name in wanted:
        if name not in names and not (name == "lm_head.weight" and net.config.tie_word_embeddings):
            raise InputError(f"{source.name}: tensor {name} is missing")
    state = dict(source.get_many([name for name in wanted if name in names]))   # coded ones decoded together
    try:
        net.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:
        raise InputError(f"{source.name}: tensors do not fit the model ({str(e).splitlines()[-1].strip()})") from None
    vocabulary = {id(net.get_input_embeddings()), id(net.get_output_embeddings())}
    for module in net.modules():
        if not isinstance(module, (QuantizedLinear, W4A8Linear)) and id(module) not in vocabulary:
            for p in module.parameters(recurse=False):
                p.data = p.data.to(dtype)
    rotary = net.model.rotary_emb                                          # non-persistent buffers: rebuild
    net.model.rotary_emb = type(rotary)(config=net.config)
    net.tie_weights()
    hold_vocabulary(net, dtype)             # a bf16 vocabulary matrix stays bf16 in a float32 model (kernels/vocab.py)
    return net.to(device).eval()


def _quantized_linear(source: ModelSource, name: str, linear: torch.nn.Linear, qconfig: dict | None):
    if not qconfig:
        raise InputError(f"{source.name}: {name}.qweight present but config.json has no quantization_config")
    layer = layer_config(qconfig, name)
    if layer is None:
        raise InputError(f"{source.name}: {name}.qweight present but quantization_config excludes {name}")
    plan = layer_plan(layer, f"{source.name}: {name}")
    if plan.vq and linear.in_features % 2:
        raise InputError(f"{source.name}: {name}: vq in quantization_config codes pairs of inputs, but the linear has "
                         f"{linear.in_features}")
    return layout_of(plan).module(linear.in_features, linear.out_features, plan, bias=linear.bias is not None,
                                  has_g_idx=f"{name}.g_idx" in source)

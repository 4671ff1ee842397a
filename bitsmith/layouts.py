"""Layouts: how one configuration of a linear becomes stored tensors, an entry of `quantization_config`, and
a runtime module. Quantizers return unpacked results (`QuantizedWeight`); only this module packs them.

GPTQ (v1 convention, the tensors GPTQ loaders read; kernels/reference.py describes them):
  qweight int32 [packed(in), out], scales fp16 [G, out], qzeros int32 [G, packed(out)] (zero - 1),
  g_idx int32 [in] (always written: loaders that build it from nothing read uninitialised memory).
Per-linear choices that differ from the checkpoint-wide one go into GPTQModel's `dynamic` block: keys
`+:REGEX` matched (re.match, anchored at the start) against the full module name, values overriding
bits / group_size / sym / desc_act; `-:REGEX` leaves a module unquantized; the first match wins.
"""
from __future__ import annotations

import re
from collections import Counter

import torch

from .formats.errors import InputError
from .formats.packing import pack, packed_length
from .kernels.linear import QuantizedLinear
from .plan import LayerPlan, QuantPlan
from .quantize.rtn import QuantizedWeight


class GPTQLayout:
    """The GPTQ tensors of one linear and their exact size."""

    @staticmethod
    def tensors(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
        maxq = (1 << qw.bits) - 1
        return {"qweight": pack(qw.codes.t(), qw.bits, dim=0),
                "scales": qw.scales.contiguous(),
                "qzeros": pack((qw.zeros - 1) & maxq, qw.bits, dim=1),   # v1 stores zero - 1
                "g_idx": qw.group_index().to(torch.int32).contiguous()}

    @staticmethod
    def stored_bits(out_features: int, in_features: int, layer: LayerPlan) -> int:
        """Bits of every tensor `tensors` writes for an [out, in] linear under `layer`."""
        groups = 1 if layer.group_size == -1 else -(-in_features // layer.group_size)
        words = packed_length(in_features, layer.bits) * out_features + groups * packed_length(out_features,
                                                                                               layer.bits)
        return 32 * words + 16 * groups * out_features + 32 * in_features

    @staticmethod
    def module(in_features: int, out_features: int, bits: int, group_size: int, bias: bool,
               has_g_idx: bool = True) -> QuantizedLinear:
        """The runtime module the tensors load into (checkpoints of other tools may lack g_idx)."""
        return QuantizedLinear(in_features, out_features, bits, group_size, bias=bias, has_g_idx=has_g_idx)


def plan_bits(plan: QuantPlan, shapes: dict[str, tuple[int, int]]) -> tuple[int, int]:
    """(stored bits, weights) over the plan's linears: all-in bits per weight is their ratio."""
    bits = sum(GPTQLayout.stored_bits(*shapes[name], layer) for name, layer in plan.layers.items())
    return bits, sum(out * inp for out, inp in (shapes[name] for name in plan.layers))


def _entry(layer: LayerPlan, desc_act: bool) -> dict:
    return {"bits": layer.bits, "group_size": layer.group_size, "sym": layer.sym, "desc_act": desc_act}


def gptq_config(plan: QuantPlan, shapes: dict[str, tuple[int, int]]) -> dict:
    """The checkpoint-wide fields (the configuration holding the most weights) and a `dynamic` rule for every
    linear that differs from it."""
    desc_act = plan.options.act_order and plan.options.method == "gptq"
    weight = Counter()
    for name, layer in plan.layers.items():
        weight[(layer.bits, layer.group_size, layer.sym)] += shapes[name][0] * shapes[name][1]
    bits, group, sym = max(weight, key=lambda k: (weight[k], k))
    base = LayerPlan(bits, group, sym)
    dynamic = {f"+:{re.escape(name)}$": _entry(layer, desc_act)
               for name, layer in plan.layers.items() if (layer.bits, layer.group_size, layer.sym) != (bits, group,
                                                                                                      sym)}
    return {**_entry(base, desc_act), **({"dynamic": dynamic} if dynamic else {})}


def layer_config(qconfig: dict, name: str) -> dict | None:
    """bits / group_size / sym of module `name` under `qconfig`, after its `dynamic` rules (GPTQModel's
    semantics: `-:` rules first, then the first matching rule); None when a `-:` rule excludes it."""
    base = {"bits": qconfig.get("bits", 4), "group_size": qconfig.get("group_size", 128),
            "sym": qconfig.get("sym", False)}
    dynamic = qconfig.get("dynamic") or {}
    if not isinstance(dynamic, dict):
        raise InputError("quantization_config: dynamic must be an object of REGEX -> overrides")
    rules = sorted(dynamic.items(), key=lambda kv: not kv[0].startswith("-:"))
    for key, override in rules:
        pattern = key[2:] if key.startswith(("+:", "-:")) else key
        try:
            hit = re.match(pattern, name)
        except re.error as e:
            raise InputError(f"quantization_config: dynamic rule {key!r} is not a valid regex ({e})") from None
        if hit and key.startswith("-:"):
            return None
        if hit:
            if not isinstance(override, dict):
                raise InputError(f"quantization_config: dynamic rule {key!r} must map to an object")
            return {**base, **{k: override[k] for k in base if k in override}}
    return base

"""compressed-tensors "pack-quantized" checkpoints, both ways: `bitsmith export` writes a bitsmith checkpoint in
that format, the same weights bit for bit, and every command reads such a folder (`PackQuantizedSource`) as
bitsmith's GPTQ layout.

compressed-tensors "pack-quantized" (the format llm-compressor writes and vLLM's and transformers' compressed-
tensors loaders read; vLLM's W4A16 path for it takes asymmetric zero points). Per quantized linear:
  weight_packed      int32 [out, ceil(in * bits / 32)]  the codes as one little-endian bit stream per output row,
                     code i at stream bits [i * bits, (i + 1) * bits): the bit stream of the GPTQ layout's qweight,
                     along the other axis
  weight_scale       [out, G] in the scales' dtype (fp16)
  weight_zero_point  int32 [ceil(out * bits / 32), G], asymmetric only: the true zero points, the same stream
                     along the output
  weight_shape       int64 [2]: out, in
The format stores codes and zero points signed, shifted by 2^(bits - 1) (the shift cancels in q - z), so the
unsigned values written are bitsmith's own; a symmetric grid's zero point, 2^(bits - 1), is the format's 0 and is
not stored. `quantization_config` holds one config group per distinct (bits, group size, symmetry), targeting
its linears by anchored regex; strategy "group", or "channel" for one group per row. The format reads groups as
contiguous runs of the input that divide it: act-order checkpoints (a g_idx that is not i // group_size) and
partial last groups are refused (`--static-groups` quantizes act-order into contiguous groups).
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from tqdm import tqdm

from .formats.checkpoint import Checkpoint, CheckpointWriter
from .formats.dfloat.folders import side_files
from .formats.errors import InputError
from .formats.packing import GPTQ_BITS, pack, packed_length, unpack
from .formats.source import FOLDER_READERS, ModelSource
from .layouts import GPTQLayout, layer_config, layer_plan
from .plan import LayerPlan
from .quantize.rtn import QuantizedWeight

FORMATS = ("compressed-tensors",)
BITSMITH_FILES = ("plan.json", "measurement.json")      # bitsmith's own: not carried into another format


def gptq_linears(qconfig, keys, where, target: str) -> dict[str, LayerPlan]:
    """The quantized linears of a bitsmith (or GPTQ) folder (its quantization_config and tensor names) and their
    configurations; InputError for a folder without any, or with a linear outside the GPTQ layout, which `target`
    (the format written) cannot hold."""
    if not isinstance(qconfig, dict) or qconfig.get("quant_method") not in ("gptq", "bitsmith"):
        raise InputError(f"{where}: not a quantized checkpoint (no GPTQ quantization_config)")
    keys = list(keys)
    present = set(keys)
    names = [name[:-len(".qweight")] for name in keys if name.endswith(".qweight")]
    if not names or any(f"{name}.channel_scale" in present for name in names):
        raise InputError(f"{where}: holds no GPTQ-layout linears to export (W4A8 and lossless-only "
                         f"checkpoints have no {target} form here)")
    linears = {}
    for name in names:
        layer = layer_config(qconfig, name)
        if layer is None:
            continue
        plan = layer_plan(layer, f"{where}: {name}")
        if plan.technique != "uniform":
            raise InputError(f"{name}: its layout ({plan.key()}) has no {target} form: only uniform grids of "
                             f"{', '.join(map(str, GPTQ_BITS))} bits with groups along the input export")
        linears[name] = plan
    return linears


def contiguous_groups(source: Checkpoint, name: str, layer: LayerPlan) -> int:
    """in_features of a linear whose groups compressed-tensors can store: contiguous runs of the input that divide
    it; InputError otherwise."""
    g_idx = source.get(f"{name}.g_idx") if f"{name}.g_idx" in source else None
    if g_idx is None:
        raise InputError(f"{name}: no g_idx, so its input width is unknown; export reads bitsmith's GPTQ output")
    in_features = g_idx.numel()
    span = in_features if layer.group_size == -1 else layer.group_size
    if in_features % span:
        raise InputError(f"{name}: groups of {span} do not divide its {in_features} inputs (a partial last group), "
                         "which compressed-tensors cannot store")
    if not torch.equal(g_idx.long(), torch.arange(in_features) // span):
        raise InputError(f"{name}: its groups are not contiguous runs of inputs (act-order), which compressed-tensors "
                         "cannot store; quantize with --static-groups (or without act-order) to export")
    return in_features


def pack_quantized(source: Checkpoint, name: str, layer: LayerPlan, in_features: int) -> dict[str, torch.Tensor]:
    """One linear's compressed-tensors tensors from its GPTQ tensors (module docstring); `in_features` as
    `contiguous_groups` found it."""
    qweight, scales, qzeros = (source.get(f"{name}.{part}") for part in ("qweight", "scales", "qzeros"))
    out_features = scales.shape[1]
    maxq = (1 << layer.bits) - 1
    codes = unpack(qweight, layer.bits, in_features, dim=0).t()                        # [out, in]
    zeros = (unpack(qzeros, layer.bits, out_features, dim=1).long() + 1) & maxq         # GPTQ v1: zero - 1 stored
    tensors = {"weight_packed": pack(codes, layer.bits, dim=1), "weight_scale": scales.t().contiguous(),
               "weight_shape": torch.tensor([out_features, in_features], dtype=torch.int64)}
    if layer.sym:
        if not bool((zeros == (maxq + 1) // 2).all()):
            raise InputError(f"{name}: a symmetric grid whose zero point is not {(maxq + 1) // 2}")
    else:
        tensors["weight_zero_point"] = pack(zeros.t().contiguous(), layer.bits, dim=0)
    if f"{name}.bias" in source:
        tensors["bias"] = source.get(f"{name}.bias")
    return tensors


def compressed_tensors_config(linears: dict[str, LayerPlan]) -> dict:
    """`quantization_config` of the export: one config group per distinct configuration (module docstring)."""
    groups: dict[tuple, list[str]] = {}
    for name, layer in linears.items():
        groups.setdefault((layer.bits, layer.group_size, layer.sym), []).append(name)
    config_groups = {}
    for i, ((bits, group_size, sym), names) in enumerate(sorted(groups.items(), key=lambda kv: -len(kv[1]))):
        config_groups[f"group_{i}"] = {
            "targets": [f"re:^{re.escape(name)}$" for name in names],
            "weights": {"num_bits": bits, "type": "int", "symmetric": sym,
                        "strategy": "channel" if group_size == -1 else "group",
                        "group_size": None if group_size == -1 else group_size,
                        "dynamic": False, "actorder": None, "observer": "minmax"},
            "input_activations": None, "output_activations": None, "format": "pack-quantized"}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": config_groups, "ignore": [], "kv_cache_scheme": None}


def export(src, out, fmt: str, overwrite: bool = False, progress: bool = False) -> dict:
    """Write the checkpoint `src` to `out` in format `fmt`; a summary of what was written."""
    if fmt not in FORMATS:
        raise InputError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    source = Checkpoint(src)
    linears = gptq_linears(source.quantization_config, source.keys(), source.path, "compressed-tensors")
    parts = {f"{name}.{part}" for name in linears for part in (*GPTQLayout.parts, "bias")}
    side = [name for name in side_files(source) if name not in BITSMITH_FILES]
    widths = {name: contiguous_groups(source, name, layer)      # every refusal before the output folder exists
              for name, layer in linears.items()}
    with CheckpointWriter(out, overwrite, inputs=[source.path]) as writer:
        for name in tqdm(linears, desc="export", unit="linear", disable=not progress):
            for part, tensor in pack_quantized(source, name, linears[name], widths[name]).items():
                writer.add(f"{name}.{part}", tensor)
        for name in source.keys():
            if name not in parts:
                writer.add(name, source.get(name))
        for name in side:
            writer.add_file(name, source.path / name)
        config = {k: v for k, v in (source.config or {}).items() if k != "quantization_config"}
        writer.commit({**config, "quantization_config": compressed_tensors_config(linears)},
                      {"exported_from": str(source.path), "format": fmt})
    return {"format": fmt, "linears": len(linears), "configurations": len({(p.bits, p.group_size, p.sym)
                                                                          for p in linears.values()}),
            "out": str(Path(out))}



# ---------------------------------------------------------------------------------------------------------------
# Reading: a pack-quantized folder (llm-compressor's output, or an export) as bitsmith's GPTQ layout.

CT_PARTS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")


def _matches(target: str, name: str) -> bool:
    """compressed-tensors' target forms for a linear: "Linear" (the class), "re:REGEX" (re.match), or the name."""
    if target.startswith("re:"):
        try:
            return re.match(target[3:], name) is not None
        except re.error as e:
            raise InputError(f"quantization_config: target {target!r} is not a valid regex ({e})") from None
    return target in ("Linear", name)


def ct_layers(qconfig: dict, names: list[str], where: str) -> dict[str, LayerPlan]:
    """The configuration of every pack-quantized linear `names`, from the config groups that target it."""
    if qconfig.get("format") != "pack-quantized":
        raise InputError(f"{where}: compressed-tensors format {qconfig.get('format')!r} is not read (only "
                         "pack-quantized: integer weights, groups along the input)")
    groups = qconfig.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise InputError(f"{where}: quantization_config has no config_groups")
    ignored = [t for t in qconfig.get("ignore") or [] if isinstance(t, str)]
    layers = {}
    for name in names:
        if any(_matches(t, name) for t in ignored):
            raise InputError(f"{where}: {name} is packed but its quantization_config ignores it")
        group = next((g for g in groups.values() if isinstance(g, dict)
                      and any(_matches(t, name) for t in g.get("targets") or [] if isinstance(t, str))), None)
        weights = (group or {}).get("weights")
        if not isinstance(weights, dict):
            raise InputError(f"{where}: no config group with weights targets {name}")
        bits, strategy, group_size = weights.get("num_bits"), weights.get("strategy"), weights.get("group_size")
        if weights.get("type", "int") != "int" or bits not in GPTQ_BITS or strategy not in ("group", "channel") \
                or weights.get("actorder") not in (None, "weight", "static"):
            raise InputError(f"{where}: {name}: weights {json_line(weights)} are not read (int, 2/3/4/8 bits, "
                             "strategy group or channel, no group act-order)")
        size = -1 if strategy == "channel" else group_size
        if type(size) is not int or (size != -1 and size < 1):
            raise InputError(f"{where}: {name}: group_size {group_size!r}")
        layers[name] = LayerPlan(bits, size, bool(weights.get("symmetric", True)))
    return layers


def json_line(value) -> str:
    """A JSON value on one short line, for a message."""
    return json.dumps(value, sort_keys=True)[:120]


def gptq_weight(tensors: dict[str, torch.Tensor], layer: LayerPlan, name: str) -> QuantizedWeight:
    """One pack-quantized linear as the unpacked weight bitsmith's GPTQ layout stores (the inverse of
    `pack_quantized`): its scales as fp16, which must hold them exactly."""
    if "weight_packed" not in tensors or "weight_scale" not in tensors or "weight_shape" not in tensors:
        raise InputError(f"{name}: weight_packed, weight_scale and weight_shape are needed")
    shape = tensors["weight_shape"]
    if shape.dtype.is_floating_point or shape.numel() != 2 or int(shape.min()) < 1:
        raise InputError(f"{name}: weight_shape {shape.tolist()} is not the [out, in] of a matrix")
    out_features, in_features = (int(n) for n in shape.tolist())
    packed = tensors["weight_packed"]
    if packed.dtype != torch.int32 or list(packed.shape) != [out_features, packed_length(in_features, layer.bits)]:
        raise InputError(f"{name}: weight_packed {packed.dtype} {list(packed.shape)} does not hold weight_shape "
                         f"{[out_features, in_features]} at {layer.bits} bits")
    span = in_features if layer.group_size == -1 else layer.group_size
    groups = -(-in_features // span)
    scale = tensors["weight_scale"]
    if tuple(scale.shape) != (out_features, groups) and not (layer.group_size == -1 and scale.numel() == out_features):
        raise InputError(f"{name}: weight_scale {list(scale.shape)}, expected [{out_features}, {groups}]")
    scales = scale.reshape(out_features, groups).t().contiguous()
    if not torch.equal(scales.to(torch.float16).to(scales.dtype), scales) or not scales.is_floating_point():
        raise InputError(f"{name}: its {scale.dtype} scales do not all fit fp16 exactly")
    maxq = (1 << layer.bits) - 1
    codes = unpack(packed, layer.bits, in_features, dim=1)
    if layer.sym:
        zeros = torch.full((groups, out_features), (maxq + 1) // 2, dtype=torch.int32)
    else:
        zp = tensors.get("weight_zero_point")
        if zp is None or zp.dtype != torch.int32 or list(zp.shape) != [packed_length(out_features, layer.bits), groups]:
            raise InputError(f"{name}: asymmetric, so a weight_zero_point int32 "
                             f"[{packed_length(out_features, layer.bits)}, {groups}] is needed")
        zeros = unpack(zp, layer.bits, out_features, dim=0).t().to(torch.int32)
    g_idx = tensors.get("weight_g_idx")
    if g_idx is not None and (g_idx.numel() != in_features or int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
        raise InputError(f"{name}: weight_g_idx does not index its {groups} groups for {in_features} inputs")
    return QuantizedWeight(codes.contiguous(), scales.to(torch.float16), zeros.contiguous(),
                           None if g_idx is None else g_idx.to(torch.int32), layer.bits, layer.group_size, layer.sym,
                           Q=torch.empty(0))


class PackQuantizedSource(ModelSource):
    """A compressed-tensors pack-quantized folder read as bitsmith's GPTQ layout: each linear's tensors are
    converted when read (`gptq_weight`, then the layout's own `tensors`), and its config groups become a GPTQ
    quantization_config with one `dynamic` rule per linear, so that load, eval and inspect treat it as theirs."""

    def __init__(self, folder):
        self.folder, self.path, self.name = folder, folder.path, folder.name
        names = sorted({k[:-len(".weight_packed")] for k in folder.keys() if k.endswith(".weight_packed")})
        self.layers = ct_layers(folder.config["quantization_config"], names, str(folder.path / "config.json"))
        base = next(iter(self.layers.values()))
        rules = {f"+:{re.escape(n)}$": {"bits": p.bits, "group_size": p.group_size, "sym": p.sym}
                 for n, p in self.layers.items()}
        self.config = {**folder.config, "quantization_config": {
            "quant_method": "gptq", "checkpoint_format": "gptq", "bits": base.bits, "group_size": base.group_size,
            "sym": base.sym, "desc_act": False, "dynamic": rules, "imported_from": "compressed-tensors"}}
        self._keys = []
        for key in folder.keys():
            linear, _, part = key.rpartition(".")
            if linear in self.layers and part in CT_PARTS:
                if part == "weight_packed":
                    self._keys += [f"{linear}.{p}" for p in GPTQLayout.parts]
            else:
                self._keys.append(key)
        self._converted: tuple[str, dict] | None = None

    def _linear(self, linear: str) -> dict[str, torch.Tensor]:
        if self._converted is None or self._converted[0] != linear:
            parts = {p: self.folder.get(f"{linear}.{p}") for p in CT_PARTS if f"{linear}.{p}" in self.folder}
            qw = gptq_weight(parts, self.layers[linear], linear)
            self._converted = (linear, GPTQLayout.tensors(qw, any_zero=True))
        return self._converted[1]

    def keys(self):
        return list(self._keys)

    def get(self, name):
        linear, _, part = name.rpartition(".")
        if linear in self.layers and part in GPTQLayout.parts:
            return self._linear(linear)[part]
        return self.folder.get(name)

    def numel(self, name):
        return math.prod(self.shape(name))

    def shape(self, name):
        linear, _, part = name.rpartition(".")
        if linear in self.layers and part in GPTQLayout.parts:
            return list(self._linear(linear)[part].shape)
        return self.folder.shape(name)

    def tokenizer(self):
        return self.folder.tokenizer()

    def fingerprint(self):
        return self.folder.fingerprint()


FOLDER_READERS["compressed-tensors"] = PackQuantizedSource

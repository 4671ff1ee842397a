"""`bitsmith export`: a bitsmith checkpoint in another loader's format, the same weights bit for bit.

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

import re
from pathlib import Path

import torch
from tqdm import tqdm

from .formats.checkpoint import Checkpoint, CheckpointWriter
from .formats.dfloat.folders import side_files
from .formats.errors import InputError
from .formats.packing import pack, unpack
from .layouts import GPTQLayout, layer_config, layer_plan, layout_of
from .plan import LayerPlan

FORMATS = ("compressed-tensors",)
BITSMITH_FILES = ("plan.json", "measurement.json")      # bitsmith's own: not carried into another format


def gptq_linears(source: Checkpoint) -> dict[str, LayerPlan]:
    """The quantized linears of a bitsmith (or GPTQ) folder and their configurations; InputError for a folder
    without any, or with a linear outside the GPTQ layout."""
    qconfig = source.quantization_config
    if not isinstance(qconfig, dict) or qconfig.get("quant_method") not in ("gptq", "bitsmith"):
        raise InputError(f"{source.path}: not a quantized bitsmith checkpoint (no GPTQ quantization_config)")
    names = [name[:-len(".qweight")] for name in source.keys() if name.endswith(".qweight")]
    if not names or any(f"{name}.channel_scale" in source for name in names):
        raise InputError(f"{source.path}: holds no GPTQ-layout linears to export (W4A8 and lossless-only "
                         "checkpoints have no compressed-tensors form here)")
    linears = {}
    for name in names:
        layer = layer_config(qconfig, name)
        if layer is None:
            continue
        plan = layer_plan(layer, f"{source.path}: {name}")
        if layout_of(plan) is not GPTQLayout:
            raise InputError(f"{name}: its layout ({plan.key()}) has no compressed-tensors form: only uniform grids "
                             "with groups along the input export")
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


def pack_quantized(source: Checkpoint, name: str, layer: LayerPlan) -> dict[str, torch.Tensor]:
    """One linear's compressed-tensors tensors from its GPTQ tensors (module docstring)."""
    in_features = contiguous_groups(source, name, layer)
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
    linears = gptq_linears(source)
    parts = {f"{name}.{part}" for name in linears for part in (*GPTQLayout.parts, "bias")}
    side = [name for name in side_files(source) if name not in BITSMITH_FILES]
    for name, layer in linears.items():               # every refusal before the output folder exists
        contiguous_groups(source, name, layer)
    with CheckpointWriter(out, overwrite, inputs=[source.path]) as writer:
        for name in tqdm(linears, desc="export", unit="linear", disable=not progress):
            for part, tensor in pack_quantized(source, name, linears[name]).items():
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


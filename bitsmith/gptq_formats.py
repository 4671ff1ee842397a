"""GPTQ checkpoints in both zero-point conventions, both ways.

v1 (`checkpoint_format: "gptq"`, AutoGPTQ's) stores each zero point minus one in qzeros; v2 (GPTQModel's
`checkpoint_format: "gptq_v2"`) stores the true zero point; every other tensor is the same (bitsmith/layouts.py).
Reading: a v2 folder is read as bitsmith's v1 layout (`GPTQv2Source`): its qzeros become (zero - 1) mod 2^bits as
they are read, which bitsmith reads back exactly, a zero point of 0 included. Writing (`bitsmith export --format
gptq | gptq-v2`): any folder bitsmith reads whose quantized linears are all GPTQ grids (a bitsmith checkpoint, a
compressed-tensors or v2 import) becomes a plain GPTQ folder, `quant_method: "gptq"` with only GPTQ's config keys,
lossless-coded tensors decoded. v1 output needs every zero point in [1, maxq]: a zero of 0 would be stored as maxq,
which GPTQModel's v1 -> v2 conversion carries into the next field and vLLM reads as 2^bits; such a linear is refused
for v1 (v2 holds it).
"""
from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from .formats.checkpoint import CheckpointWriter
from .formats.dfloat.folders import side_files
from .formats.errors import InputError
from .formats.packing import pack, packed_length, unpack
from .formats.source import FOLDER_READERS, ModelSource, open_source
from .layouts import EXTENDED, GPTQLayout, layer_config, layer_plan, layout_of
from .pack_quantized import BITSMITH_FILES
from .plan import LayerPlan

FORMATS = {"gptq": "gptq", "gptq-v2": "gptq_v2"}     # --format -> checkpoint_format
GPTQ_KEYS = ("bits", "group_size", "sym", "desc_act", "static_groups", "true_sequential", "damp_percent", "mse",
             "pack_dtype", "lm_head", "dynamic", "meta")          # what a GPTQ quantization_config holds


def checkpoint_format(qconfig: dict) -> str:
    """"gptq" or "gptq_v2" (GPTQModel writes `checkpoint_format`, older versions `format`)."""
    fmt = qconfig.get("checkpoint_format", qconfig.get("format", "gptq"))
    return fmt.lower() if isinstance(fmt, str) else repr(fmt)


def shift_zeros(qzeros: torch.Tensor, bits: int, out_features: int, by: int, where: str) -> torch.Tensor:
    """qzeros with every packed zero point moved by `by` modulo 2^bits (v2 -> v1: -1; v1 -> v2: +1), the shape
    checked against the linear first."""
    if qzeros.dtype != torch.int32 or qzeros.dim() != 2 or qzeros.shape[1] != packed_length(out_features, bits):
        raise InputError(f"{where}: qzeros {tuple(qzeros.shape)} {qzeros.dtype} does not fit {out_features} "
                         f"outputs at {bits} bits (int32 [groups, {packed_length(out_features, bits)}])")
    zeros = unpack(qzeros, bits, out_features, dim=1).long()
    return pack((zeros + by) & ((1 << bits) - 1), bits, dim=1)


def gptq_layers(qconfig: dict, keys, shape, where: str) -> dict[str, LayerPlan]:
    """Every quantized linear of a folder (by its qweight) and its configuration, read as v1."""
    qconfig = {**qconfig, "checkpoint_format": "gptq"}
    layers = {}
    for key in keys:
        if key.endswith(".qweight"):
            name = key[:-len(".qweight")]
            layer = layer_config(qconfig, name)
            if layer is None:
                raise InputError(f"{where}: {name} is packed but its quantization_config excludes it")
            layers[name] = layer_plan(layer, f"{where}: {name}")
    return layers


class GPTQv2Source(ModelSource):
    """A GPTQ v2 folder read as v1: qzeros shifted down by one as they are read, the config saying v1."""

    def __init__(self, folder):
        self.folder, self.path, self.name = folder, folder.path, folder.name
        qconfig = folder.config["quantization_config"]
        self.layers = gptq_layers(qconfig, folder.keys(), folder.shape, str(folder.path / "config.json"))
        self.config = {**folder.config, "quantization_config": {
            **{k: v for k, v in qconfig.items() if k != "format"}, "checkpoint_format": "gptq",
            "imported_from": "gptq_v2"}}

    def keys(self):
        return self.folder.keys()

    def get(self, name):
        tensor = self.folder.get(name)
        linear, _, part = name.rpartition(".")
        if part == "qzeros" and linear in self.layers:
            out_features = self.folder.shape(f"{linear}.qweight")[1]
            return shift_zeros(tensor, self.layers[linear].bits, out_features, -1, f"{self.name}: {name}")
        return tensor

    def numel(self, name):
        return self.folder.numel(name)

    def shape(self, name):
        return self.folder.shape(name)

    def tokenizer(self):
        return self.folder.tokenizer()

    def fingerprint(self):
        return self.folder.fingerprint()


def _gptq_reader(folder):
    fmt = checkpoint_format(folder.config["quantization_config"])
    return GPTQv2Source(folder) if fmt == "gptq_v2" else folder


FOLDER_READERS["gptq"] = _gptq_reader


def export_gptq(src: str, out, fmt: str, overwrite: bool = False, progress: bool = False) -> dict:
    """Write the quantized folder `src` as a plain GPTQ checkpoint (`fmt` "gptq" or "gptq-v2"); a summary."""
    source = open_source(src)
    qconfig = source.config.get("quantization_config")
    if not isinstance(qconfig, dict) or not any(k.endswith(".qweight") for k in source.keys()):
        raise InputError(f"{src}: not a quantized checkpoint with GPTQ tensors")
    if any(k.endswith(".channel_scale") for k in source.keys()):
        raise InputError(f"{src}: holds W4A8 linears, which GPTQ cannot hold")
    layers = gptq_layers(qconfig, source.keys(), source.shape, src)
    for name, layer in layers.items():
        if layout_of(layer) is not GPTQLayout:
            raise InputError(f"{src}: {name} ({layer.key()}) is not a GPTQ grid (outliers, lookup tables and "
                             "per-input-channel groups have no GPTQ form)")
    folder = getattr(source, "folder", source)
    side = [name for name in side_files(folder.checkpoint) if name not in BITSMITH_FILES]
    maxq = {name: (1 << layer.bits) - 1 for name, layer in layers.items()}
    zero_parts = {f"{name}.qzeros": name for name in layers}
    if fmt == "gptq":                                   # every refusal before the output folder exists
        for part, name in zero_parts.items():
            zeros = (unpack(source.get(part), layers[name].bits, source.shape(f"{name}.qweight")[1], dim=1).long()
                     + 1) & maxq[name]
            if zeros.numel() and int(zeros.min()) == 0:
                raise InputError(f"{src}: {name} has a zero point of 0, which GPTQ v1 cannot store so that every "
                                 "reader agrees (GPTQModel and vLLM read it differently); export --format gptq-v2")
    with CheckpointWriter(out, overwrite, inputs=[source.path]) as writer:
        for name in tqdm(source.keys(), desc="export", unit="tensor", disable=not progress):
            tensor = source.get(name)
            if fmt == "gptq-v2" and name in zero_parts:
                linear = zero_parts[name]
                tensor = shift_zeros(tensor, layers[linear].bits, source.shape(f"{linear}.qweight")[1], 1, name)
            writer.add(name, tensor)
        for name in side:
            writer.add_file(name, folder.path / name)
        qc = {k: v for k, v in qconfig.items() if k in GPTQ_KEYS}
        if isinstance(qc.get("dynamic"), dict):
            qc["dynamic"] = {k: {f: v for f, v in rule.items() if f not in EXTENDED} if isinstance(rule, dict)
                             else rule for k, rule in qc["dynamic"].items()}
        config = {k: v for k, v in source.config.items() if k != "quantization_config"}
        writer.commit({**config, "quantization_config": {"quant_method": "gptq", "checkpoint_format": FORMATS[fmt],
                                                         **qc}},
                      {"exported_from": str(Path(src)), "format": fmt})
    return {"format": fmt, "linears": len(layers),
            "configurations": len({(p.bits, p.group_size, p.sym) for p in layers.values()}), "out": str(Path(out))}


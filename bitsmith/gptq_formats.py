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
from .layouts import EXTENDED, checkpoint_format, layer_config, layer_plan
from .pack_quantized import BITSMITH_FILES, gptq_linears

FORMATS = {"gptq": "gptq", "gptq-v2": "gptq_v2"}     # --format -> checkpoint_format
GPTQ_KEYS = ("bits", "group_size", "sym", "desc_act", "static_groups", "true_sequential", "damp_percent", "mse",
             "pack_dtype", "lm_head", "dynamic", "meta")          # what a GPTQ quantization_config holds


def zero_fields(qzeros: torch.Tensor, bits: int, qweight_shape: list[int], where: str) -> torch.Tensor:
    """The packed zero-point fields [G, out] as stored, out from qweight's shape [packed(in), out]; both shapes
    checked first."""
    if len(qweight_shape) != 2:
        raise InputError(f"{where}: qweight of shape {list(qweight_shape)} (a GPTQ qweight is [packed(in), out])")
    out_features = qweight_shape[1]
    if qzeros.dtype != torch.int32 or qzeros.dim() != 2 or qzeros.shape[1] != packed_length(out_features, bits):
        raise InputError(f"{where}: qzeros {tuple(qzeros.shape)} {qzeros.dtype} does not fit {out_features} "
                         f"outputs at {bits} bits (int32 [groups, {packed_length(out_features, bits)}])")
    return unpack(qzeros, bits, out_features, dim=1).long()


def shift_zeros(qzeros: torch.Tensor, bits: int, qweight_shape: list[int], by: int, where: str) -> torch.Tensor:
    """qzeros with every packed zero point moved by `by` modulo 2^bits, each field alone (v2 -> v1: -1;
    v1 -> v2: +1)."""
    return pack((zero_fields(qzeros, bits, qweight_shape, where) + by) & ((1 << bits) - 1), bits, dim=1)


class GPTQv2Source(ModelSource):
    """A GPTQ v2 folder read as v1: qzeros shifted down by one as they are read, the config saying v1."""

    def __init__(self, folder):
        self.folder, self.path, self.name = folder, folder.path, folder.name
        qconfig = folder.config["quantization_config"]
        self.config = {**folder.config, "quantization_config": {
            **{k: v for k, v in qconfig.items() if k != "format"}, "checkpoint_format": "gptq",
            "imported_from": "gptq_v2"}}

    def keys(self):
        return self.folder.keys()

    def get(self, name):
        tensor = self.folder.get(name)
        linear, _, part = name.rpartition(".")
        if part == "qzeros" and f"{linear}.qweight" in self.folder:
            return to_v1(tensor, self.config["quantization_config"], linear, self.folder.shape(f"{linear}.qweight"),
                         f"{self.name}: {name}")
        return tensor

    def numel(self, name):
        return self.folder.numel(name)

    def shape(self, name):
        return self.folder.shape(name)

    def tokenizer(self):
        return self.folder.tokenizer()

    def fingerprint(self):
        return self.folder.fingerprint()


def to_v1(qzeros: torch.Tensor, qconfig: dict, linear: str, qweight_shape: list[int], where: str) -> torch.Tensor:
    """A v2 linear's qzeros as v1 stores them, its bits from `qconfig` (v1 view) and its outputs from qweight's
    shape [packed(in), out]."""
    layer = layer_config(qconfig, linear)
    if layer is None:
        raise InputError(f"{where}: {linear} is packed but its quantization_config excludes it")
    return shift_zeros(qzeros, layer_plan(layer, where).bits, qweight_shape, -1, where)


def _gptq_reader(folder):
    fmt = checkpoint_format(folder.config["quantization_config"])
    return GPTQv2Source(folder) if fmt == "gptq_v2" else folder


FOLDER_READERS["gptq"] = _gptq_reader


def export_gptq(src: str, out, fmt: str, overwrite: bool = False, progress: bool = False) -> dict:
    """Write the quantized folder `src` as a plain GPTQ checkpoint (`fmt` "gptq" or "gptq-v2"); a summary."""
    source = open_source(src)
    qconfig = source.config.get("quantization_config")
    layers = gptq_linears(qconfig, source.keys(), src, "GPTQ")
    folder = getattr(source, "folder", source)
    side = [name for name in side_files(folder.checkpoint) if name not in BITSMITH_FILES]
    zero_parts = {f"{name}.qzeros": name for name in layers}
    for part, name in zero_parts.items():               # every refusal before the output folder exists
        bits, shape = layers[name].bits, source.shape(f"{name}.qweight")
        zeros = (zero_fields(source.get(part), bits, shape, f"{src}: {part}") + 1) & ((1 << bits) - 1)   # v1 view
        if fmt == "gptq" and zeros.numel() and int(zeros.min()) == 0:
                raise InputError(f"{src}: {name} has a zero point of 0, which GPTQ v1 cannot store so that every "
                                 "reader agrees (GPTQModel and vLLM read it differently); export --format gptq-v2")
    with CheckpointWriter(out, overwrite, inputs=[source.path]) as writer:
        for name in tqdm(source.keys(), desc="export", unit="tensor", disable=not progress):
            tensor = source.get(name)
            if fmt == "gptq-v2" and name in zero_parts:
                linear = zero_parts[name]
                tensor = shift_zeros(tensor, layers[linear].bits, source.shape(f"{linear}.qweight"), 1, name)
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


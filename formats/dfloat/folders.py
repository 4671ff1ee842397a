"""`bitsmith compress` / `decompress`: a folder of safetensors to the same tensors with every BF16 one coded
where that saves bytes, and back to plain safetensors, bit for bit; side files and config.json carried."""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from ..errors import InputError
from ..paths import inside
from . import originals
from .codec import WINDOW_BITS, check_window
from .parts import CodedWriter, config_block, lossless_block

NOT_SIDE_FILES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".index.json")


def compress_checkpoint(src, out, overwrite: bool = False, window_bits: int = WINDOW_BITS,
                        progress: bool = False) -> dict:
    """A folder of safetensors -> the same tensors with every BF16 one coded where that saves bytes."""
    from ..checkpoint import SAFETENSORS_DTYPES, Checkpoint, CheckpointWriter, sha256_file
    try:
        check_window(window_bits)
    except ValueError as e:
        raise InputError(str(e)) from None
    source = Checkpoint(src)
    if source.coded:
        raise InputError(f"{source.path}: already holds losslessly coded tensors")
    names, dtypes = source.keys(), Counter()
    with CheckpointWriter(out, overwrite, inputs=[source.path]) as writer:
        coder = CodedWriter(writer, window_bits)
        for name in tqdm(names, desc="compress", unit="tensor", disable=not progress):
            tensor = source.get(name)
            dtypes[SAFETENSORS_DTYPES[tensor.dtype]] += 1
            coder.add(name, tensor)
        coder.flush()
        coded = coder.coded
        _copy_side_files(source.path, writer)
        block = lossless_block(coded)
        manifest = {"lossless": block, "source_files": originals.record(source.path, source.files(), sha256_file)}
        writer.commit(_config_with(source.config, config_block(block) if coded else None), manifest)
    return {**_summary(source.path, Path(out), len(names), coded), "source_dtypes": dict(dtypes)}


def decompress_checkpoint(src, out, overwrite: bool = False, progress: bool = False) -> dict:
    """A folder with coded tensors -> plain safetensors, every tensor bit for bit as before compression; the
    files of a folder that `compress_checkpoint` made come back byte for byte (`originals`)."""
    from ..checkpoint import Checkpoint, CheckpointWriter
    source = Checkpoint(src)
    names, recorded = source.keys(), (source.manifest or {}).get("source_files")
    if recorded:
        tensors, files, texts = _recorded(source, recorded)        # all checked before the output is made
    with CheckpointWriter(out, overwrite, inputs=[source.path]) as writer:
        if recorded:
            writer.plan(tensors, files)
            names = [name for name, _, _ in tensors]
        else:
            writer.plan([(name, source.dtype(name), source.shape(name)) for name in names])   # no spool
        for name, tensor in tqdm(source.get_many(names), desc="decompress", unit="tensor", total=len(names),
                                 disable=not progress):
            writer.add(name, tensor)
        _copy_side_files(source.path, writer)
        if recorded:
            for name, data in texts.items():
                writer.add_file(name, data)
            changed = [name for name, shard in recorded["files"].items()
                       if writer.written.get(name) != shard["sha256"]]
            if changed:
                raise RuntimeError(f"{', '.join(changed)}: not restored byte for byte")
        writer.commit(None if recorded else _config_with(source.config, None), {})
    return {**_summary(source.path, Path(out), len(names), source.coded), "identical_files": bool(recorded)}


def _recorded(source, recorded) -> tuple[list, dict, dict[str, bytes]]:
    """The recorded layout (`originals.layout`) and texts of the source files, once they hold exactly the
    tensors the folder holds, with their dtypes and shapes; else InputError naming the manifest."""
    from ..checkpoint import MANIFEST
    try:
        tensors, files = originals.layout(recorded)
        texts = originals.texts(recorded)
        held = {name: (source.dtype(name), source.shape(name)) for name in source}
        kept = {name: (dtype, shape) for name, dtype, shape in tensors}
        for name in sorted(held.keys() | kept.keys()):
            if held.get(name) != kept.get(name):
                raise InputError(f"source_files: tensor {name} recorded as {_dtype_shape(kept.get(name))}, "
                                 f"stored as {_dtype_shape(held.get(name))}")
    except InputError as e:
        raise InputError(f"{source.path / MANIFEST}: {e}") from None
    return tensors, files, texts


def _dtype_shape(entry: tuple[str, list[int]] | None) -> str:
    return "absent" if entry is None else f"{entry[0]} {entry[1]}"


def _config_with(config: dict | None, block: dict | None) -> dict | None:
    """config.json with the lossless block set (or removed, block=None), other keys untouched."""
    if config is None:
        return None
    config = dict(config)
    qc = dict(config.get("quantization_config") or {"quant_method": "bitsmith", "format_version": 1})
    if qc.get("quant_method") != "bitsmith":
        return config                              # a foreign quantization_config: the manifest alone describes
    qc.pop("lossless", None)
    if block is not None:
        qc["lossless"] = block
    if set(qc) <= {"quant_method", "format_version"}:
        config.pop("quantization_config", None)
    else:
        config["quantization_config"] = qc
    return config


def _copy_side_files(folder: Path, writer) -> None:
    """Every file but the weights, config.json and the manifest at the top, subfolders included."""
    from ..checkpoint import MANIFEST
    for f in sorted(folder.rglob("*")):
        name = f.relative_to(folder).as_posix()
        top = "/" not in name
        if f.is_file() and not (top and (name in (MANIFEST, "config.json") or name.endswith(NOT_SIDE_FILES))):
            writer.add_file(name, inside(folder, name, str(folder)))


def _summary(src: Path, out: Path, tensors: int, coded: dict) -> dict:
    def size(folder):
        return sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    return {"tensors": tensors, "coded": len(coded), "source_bytes": size(src), "output_bytes": size(out),
            "coded_values": sum(math.prod(m["shape"]) for m in coded.values())}

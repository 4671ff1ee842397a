"""`bitsmith compress` / `decompress`: a folder of safetensors to the same tensors with every BF16 one coded
where that saves bytes, and back to plain safetensors, bit for bit; config.json and every other file carried, as
opaque bytes whatever its name (a tokenizer's .bin file), pickles refused."""
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
    side = side_files(source)
    names, dtypes = source.keys(), Counter()
    with CheckpointWriter(out, overwrite, inputs=[source.path]) as writer:
        coder = CodedWriter(writer, window_bits)
        for name in tqdm(names, desc="compress", unit="tensor", disable=not progress):
            tensor = source.get(name)
            dtypes[SAFETENSORS_DTYPES[tensor.dtype]] += 1
            coder.add(name, tensor)
        coder.flush()
        coded = coder.coded
        for name in side:
            writer.add_file(name, source.path / name)
        block = lossless_block(coded)
        manifest = {"lossless": block, "source_files": originals.record(source.path, source.files(), sha256_file)}
        writer.commit(_config_with(source.config, config_block(block) if coded else None), manifest)
    return {**_summary(source.path, Path(out), len(names), coded), "source_dtypes": dict(dtypes)}


def decompress_checkpoint(src, out, overwrite: bool = False, progress: bool = False) -> dict:
    """A folder with coded tensors -> plain safetensors, every tensor bit for bit as before compression; the
    files of a folder that `compress_checkpoint` made come back byte for byte (`originals`)."""
    from ..checkpoint import MANIFEST, Checkpoint, CheckpointWriter
    source = Checkpoint(src)
    names, recorded = source.keys(), (source.manifest or {}).get("source_files")
    if recorded:
        tensors, files, texts = recorded_sources(source, recorded)        # all checked before the output is made
        manifest = _source_manifest(source, recorded)
    side = side_files(source)
    with CheckpointWriter(out, overwrite, inputs=[source.path]) as writer:
        if recorded:
            writer.plan(tensors, files)
            names = [name for name, _, _ in tensors]
        else:
            writer.plan([(name, source.dtype(name), source.shape(name)) for name in names])   # no spool
        for name, tensor in tqdm(source.get_many(names), desc="decompress", unit="tensor", total=len(names),
                                 disable=not progress):
            writer.add(name, tensor)
        for name in side:
            writer.add_file(name, source.path / name)
        if not recorded:
            writer.commit(_config_with(source.config, None), {})
        else:
            for name, data in texts.items():
                writer.add_file(name, data)
            changed = [name for name, shard in recorded["files"].items()
                       if writer.written.get(name) != shard["sha256"]]
            try:
                if changed:
                    raise InputError(f"{', '.join(changed)} would not come back byte for byte (its recorded sha256 "
                                     "is not that of the bytes its header and tensors make)")
                writer.commit(None, {}, manifest)
            except InputError as e:
                raise InputError(f"{source.path / MANIFEST}: source_files: {e}") from None
    return {**_summary(source.path, Path(out), len(names), source.coded), "identical_files": bool(recorded)}


def _source_manifest(source, recorded) -> bytes | None:
    """The source's manifest as recorded (None if it had none), or InputError naming the manifest."""
    from ..checkpoint import MANIFEST
    try:
        return originals.manifest(recorded)
    except InputError as e:
        raise InputError(f"{source.path / MANIFEST}: {e}") from None


def recorded_sources(source, recorded) -> tuple[list, dict, dict[str, bytes]]:
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


def side_files(source) -> list[str]:
    """The files of a folder (`source`, a Checkpoint) carried as they are, by relative name, subfolders included:
    all but the safetensors files the reader reads, the shard index, config.json and the manifest (written anew or
    recorded), whatever their names end with. InputError, before anything is written, for a pickle (by its bytes:
    pickled weights are refused, not carried), a safetensors file at the top that the shard index leaves out (once
    carried, it would be read beside the others) and a name the output's writer keeps for itself."""
    from ..checkpoint import MANIFEST, pickled, reserved
    skipped = {MANIFEST, "config.json", originals.INDEX, *(path.name for path in source.files())}
    found = []
    for f in sorted(source.path.rglob("*")):
        name = f.relative_to(source.path).as_posix()
        if name in skipped or not f.is_file():
            continue
        path = inside(source.path, name, str(source.path))
        if reserved(name):
            raise InputError(f"{source.path}: {name!r} is a name bitsmith keeps for its own files in an output "
                             "folder; rename or remove it")
        if "/" not in name and name.endswith(".safetensors"):
            raise InputError(f"{source.path}: {name} is a safetensors file that {originals.INDEX} does not name; "
                             "remove it, or add its tensors to the index")
        if pickled(path):
            raise InputError(f"{source.path}: {name!r} is a pickle; bitsmith never unpickles nor carries pickled "
                             "files (weights are read from the safetensors files): remove it, or convert it")
        found.append(name)
    return found


def _summary(src: Path, out: Path, tensors: int, coded: dict) -> dict:
    def size(folder):
        return sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    return {"tensors": tensors, "coded": len(coded), "source_bytes": size(src), "output_bytes": size(out),
            "coded_values": sum(math.prod(m["shape"]) for m in coded.values())}

"""The source files of a compressed folder, as `decompress_checkpoint` gives them back byte for byte: the
raw header of every safetensors file (tensor order, metadata, padding), its sha256, config.json and the shard
index as they were, and the source's own bitsmith manifest, if it had one. Kept in the manifest under
`source_files`. (Every other file is carried as it is.)"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from ..errors import InputError
from ..paths import plain
from .parts import shown

INDEX = "model.safetensors.index.json"
MANIFEST = "bitsmith_manifest.json"         # checkpoint.MANIFEST (not imported: checkpoint imports this package)
TEXTS = ("config.json", INDEX)


def record(folder: Path, files: list[Path], sha256_file) -> dict:
    """What it takes to write `files` (safetensors files of `folder`) again byte for byte. A safetensors
    file is its header then the tensors' bytes back to back in the order of their offsets, so the raw header
    is all that the tensors do not say."""
    shards = {path.name: {"header": as_text(_raw_header(path)), "sha256": sha256_file(path)} for path in files}
    texts = {name: as_text((folder / name).read_bytes()) for name in TEXTS if (folder / name).exists()}
    recorded = {"files": shards, "texts": texts}
    if (folder / MANIFEST).exists():                    # a bitsmith folder: its manifest comes back as it was
        recorded["manifest"] = as_text((folder / MANIFEST).read_bytes())
    return recorded


def as_text(data: bytes) -> str:
    """Bytes as a JSON-safe string that `as_bytes` turns back into the same bytes, whatever they are."""
    return data.decode("utf-8", errors="surrogateescape")


def as_bytes(text: str) -> bytes:
    return text.encode("utf-8", errors="surrogateescape")


def layout(source_files) -> tuple[list[tuple[str, str, list[int]]], dict[str, tuple[bytes, list[str]]]]:
    """(tensors, layout) for `CheckpointWriter.plan`: every tensor (name, dtype, shape) in file and data
    order, and each file's raw header (with its length prefix) and tensors. Every name, dtype, shape and
    offset is checked first: InputError naming the file and the field."""
    tensors, files = [], {}
    for name, shard in _entries(source_files, "files", dict).items():
        what = f"source_files shard {name!r}"
        if "/" in name or not name.endswith(".safetensors"):
            raise InputError(f"{what}: not a .safetensors file at the top of the folder")
        if not isinstance(shard.get("header"), str) or not isinstance(shard.get("sha256"), str):
            raise InputError(f"{what}: needs a header and a sha256, both strings")
        head = _bytes(shard["header"], what)
        order = _tensors(_json_object(head, what), what)
        tensors += order
        files[name] = (struct.pack("<Q", len(head)) + head, [k for k, _, _ in order])
    seen = set()
    for k, _, _ in tensors:
        if k in seen:
            raise InputError(f"source_files: tensor {shown(k)} recorded in more than one shard")
        seen.add(k)
    return tensors, files


def texts(source_files) -> dict[str, bytes]:
    """The files kept as they were (config.json, the shard index): name -> bytes, the names checked."""
    found = _entries(source_files, "texts", str)
    for name in found:
        if name not in TEXTS:
            raise InputError(f"source_files text {name!r}: not one of {', '.join(TEXTS)}")
    return {name: _bytes(text, f"source_files text {name!r}") for name, text in found.items()}


def manifest(source_files) -> bytes | None:
    """The source's bitsmith manifest as it was, or None when the source had none."""
    text = source_files.get("manifest") if isinstance(source_files, dict) else None
    if text is None:
        return None
    if not isinstance(text, str):
        raise InputError(f"source_files manifest: {type(text).__name__}, not the text of a manifest")
    return _bytes(text, "source_files manifest")


def _entries(source_files, key: str, kind: type) -> dict:
    """source_files[key], an object of plain names to values of `kind`, or InputError."""
    entries = source_files.get(key) if isinstance(source_files, dict) else None
    if not isinstance(entries, dict) or not all(isinstance(v, kind) for v in entries.values()):
        raise InputError(f"source_files {key}: not an object of names to {kind.__name__} values")
    for name in entries:
        plain(name, f"source_files {key}")
    return entries


def _bytes(text: str, what: str) -> bytes:
    try:
        return as_bytes(text)
    except UnicodeEncodeError:
        raise InputError(f"{what}: holds text that no bytes encode (a lone surrogate)") from None


def _json_object(head: bytes, what: str) -> dict:
    try:
        header = json.loads(head)
    except ValueError as e:
        raise InputError(f"{what}: recorded header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise InputError(f"{what}: recorded header is {type(header).__name__}, not an object")
    return header


def _tensors(header: dict, what: str) -> list[tuple[str, str, list[int]]]:
    """(name, dtype, shape) of a safetensors header's tensors in data order, once every entry has a known
    dtype, a shape of non-negative integers and offsets that lay the tensors back to back from 0."""
    from ..checkpoint import DTYPE_BYTES
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InputError(f"{what}: recorded __metadata__ is not an object of strings")
    entries = []
    for k, entry in header.items():
        if k == "__metadata__":
            continue
        dtype, shape, offsets = (entry.get(f) if isinstance(entry, dict) else None
                                 for f in ("dtype", "shape", "data_offsets"))
        if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
            raise InputError(f"{what}: tensor {shown(k)} has dtype {shown(dtype)}, not one of {', '.join(DTYPE_BYTES)}")
        if not isinstance(shape, list) or not all(map(_natural, shape)):
            raise InputError(f"{what}: tensor {shown(k)} has shape {shown(shape)}, not a list of non-negative integers")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_natural, offsets)):
            raise InputError(f"{what}: tensor {shown(k)} has data_offsets {shown(offsets)}, "
                             "not two non-negative integers")
        entries.append((offsets, k, dtype, shape))
    entries.sort(key=lambda e: e[0][0])                         # data order (stable: empty tensors as listed)
    end = 0
    for (begin, stop), k, dtype, shape in entries:
        size = math.prod(shape) * DTYPE_BYTES[dtype]
        if begin != end or stop - begin != size:
            raise InputError(f"{what}: tensor {shown(k)} has data_offsets {shown([begin, stop])}, expected "
                             f"{shown([end, end + size])} for {dtype} {shown(shape)}")
        end = stop
    return [(k, dtype, shape) for _, k, dtype, shape in entries]


def _natural(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _raw_header(path: Path) -> bytes:
    with open(path, "rb") as f:
        prefix = f.read(8)
        size = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else None
        if size is None or size > path.stat().st_size - 8:
            raise InputError(f"{path}: not a readable safetensors file (shorter than its header)")
        return f.read(size)

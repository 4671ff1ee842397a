"""The source files of a compressed folder, as `decompress_checkpoint` gives them back byte for byte: the
raw header of every safetensors file (tensor order, metadata, padding), its sha256, and config.json and
the shard index as they were. Kept in the manifest under `source_files`."""
from __future__ import annotations

import json
import struct
from pathlib import Path

from ..errors import InputError

INDEX = "model.safetensors.index.json"


def record(folder: Path, files: list[Path], sha256_file) -> dict:
    """What it takes to write `files` (safetensors files of `folder`) again byte for byte. A safetensors
    file is its header then the tensors' bytes back to back in the order of their offsets, so the raw header
    is all that the tensors do not say."""
    shards = {path.name: {"header": as_text(_raw_header(path)), "sha256": sha256_file(path)} for path in files}
    texts = {name: as_text((folder / name).read_bytes()) for name in ("config.json", INDEX) if (folder / name).exists()}
    return {"files": shards, "texts": texts}


def as_text(data: bytes) -> str:
    """Bytes as a JSON-safe string that `as_bytes` turns back into the same bytes, whatever they are."""
    return data.decode("utf-8", errors="surrogateescape")


def as_bytes(text: str) -> bytes:
    return text.encode("utf-8", errors="surrogateescape")


def layout(source_files: dict) -> tuple[list[tuple[str, str, list[int]]], dict[str, tuple[bytes, list[str]]]]:
    """(tensors, layout) for `CheckpointWriter.plan`: every tensor (name, dtype, shape) in file and data
    order, and each file's raw header (with its length prefix) and tensors."""
    tensors, files = [], {}
    for name, shard in source_files["files"].items():
        head = as_bytes(shard["header"])
        header = json.loads(head)
        order = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
        tensors += [(k, header[k]["dtype"], header[k]["shape"]) for k in order]
        files[name] = (struct.pack("<Q", len(head)) + head, order)
    return tensors, files


def _raw_header(path: Path) -> bytes:
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise InputError(f"{path}: not a readable safetensors file (shorter than its header)")
        return f.read(struct.unpack("<Q", prefix)[0])

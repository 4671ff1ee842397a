"""Checkpoint folders: an atomic writer and a lazy reader for safetensors folders with a bitsmith manifest.

Write order (DESIGN.md section 4): tensors and side files into a temporary sibling folder, then
`config.json`, then the manifest (sha256 of every file), fsync, and one rename. A folder without a
manifest was never finished, so a half-written folder never looks loadable.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import struct
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from . import dfloat
from .errors import InputError
from .output import Output
from .paths import check_links, inside

MANIFEST = "bitsmith_manifest.json"
FORMAT_VERSION = 1
SHARD_BYTES = 2 * 1024**3
SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class CheckpointWriter:
    """Builds a checkpoint folder in a temporary sibling of `out`; `commit` publishes it.

    Tensors are spooled to disk as they arrive (memory stays flat however large the model), then laid
    out into safetensors shards of at most `shard_bytes` at commit, in the order they were added. When
    every tensor is declared first (`plan`), the shards are laid out at once and `add` writes straight
    into them, with no spool.
    """

    def __init__(self, out, overwrite: bool = False, shard_bytes: int = SHARD_BYTES, inputs=()):
        """`inputs`: the paths the run reads, which OUT may not be, lie inside or contain (formats/output.py);
        OUT is locked from here to `commit` or `abort`."""
        self.out = Path(out)
        self._output = Output(out, inputs, overwrite)
        self.tmp = self._output.tmp
        self.shard_bytes = shard_bytes
        self._spool = None
        self._entries: dict[str, tuple[str, list[int], int, int]] = {}   # name -> dtype, shape, offset, bytes
        self._planned: list[str] | None = None           # names still to come, last first, once planned
        self._layout: dict[str, list[str]] | None = None  # shard -> its tensors, once planned
        self._shard_files: dict[str, str] = {}           # shard -> sha256, once written
        self._stream: _HashedFile | None = None
        self._heads: dict[str, bytes] = {}               # shard -> raw header given by the plan

    def plan(self, tensors: list[tuple[str, str, list[int]]],
             layout: dict[str, tuple[bytes, list[str]]] | None = None) -> None:
        """Declare every tensor (name, safetensors dtype, shape) in the order `add` will give them. `layout`
        (shard file -> its raw header, from the length prefix on, and its tensors) takes the place of the
        shards this writer would lay out; then no shard index is written either."""
        if self._entries:
            raise ValueError("plan() must come before the first add()")
        for name, dtype, shape in tensors:
            self._entries[name] = (dtype, list(shape), 0, math.prod(shape) * DTYPE_BYTES[dtype])
        self._planned = list(self._entries)[::-1]
        self._heads = {shard: head for shard, (head, _) in (layout or {}).items()}
        self._layout = {shard: names for shard, (_, names) in layout.items()} if layout else self._shard_names()
        if [name for names in self._layout.values() for name in names] != list(self._entries):
            raise ValueError("the layout must hold the planned tensors, in order")
        self._shard_of = {name: shard for shard, names in self._layout.items() for name in names}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        t = tensor.detach().cpu().contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy()
        entry = (SAFETENSORS_DTYPES[t.dtype], list(t.shape))
        if self._planned is not None:
            if not self._planned or self._planned[-1] != name or self._entries[name][:2] != entry:
                raise ValueError(f"tensor {name} {entry} is not the next one planned")
            self._write_planned(self._planned.pop(), raw)
            return
        if name in self._entries:
            raise ValueError(f"tensor {name} written twice")
        if self._spool is None:
            self._spool = open(self.tmp / ".spool", "w+b")  # noqa: SIM115 (closed by close())
        self._entries[name] = (*entry, self._spool.tell(), raw.nbytes)
        self._spool.write(raw.data)

    @property
    def written(self) -> dict[str, str]:
        """Planned shards written so far -> their sha256."""
        return dict(self._shard_files)

    def _write_planned(self, name: str, raw) -> None:
        shard = self._shard_of[name]
        if self._stream is None:
            self._stream = _HashedFile(self.tmp / shard, self._heads.get(shard) or self._head(self._layout[shard]))
        self._stream.write(raw.data)
        if name == self._layout[shard][-1]:
            self._shard_files[shard] = self._stream.close()
            self._stream = None

    def add_file(self, name: str, data: bytes | str | Path) -> None:
        """A side file (tokenizer, generation config, ...) copied into the folder."""
        dst = self.tmp / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, (bytes, str)) and not (isinstance(data, str) and Path(data).exists()):
            dst.write_bytes(data.encode() if isinstance(data, str) else data)
        else:
            shutil.copyfile(data, dst)

    def _shard_names(self) -> dict[str, list[str]]:
        """Shard file -> its tensors: consecutive runs of at most shard_bytes, in order."""
        if self._layout is not None:
            return self._layout
        shards, size = [[]], 0
        for name, (_, _, _, nbytes) in self._entries.items():
            if shards[-1] and size + nbytes > self.shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(name)
            size += nbytes
        if len(shards) == 1:
            return {"model.safetensors": shards[0]}
        return {f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors": names for i, names in enumerate(shards)}

    def _head(self, names: list[str]) -> bytes:
        """safetensors layout: u64 header length, JSON header (space-padded to 8 bytes), then the raw data."""
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name in names:
            dtype, shape, _, nbytes = self._entries[name]
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        return struct.pack("<Q", len(blob)) + blob

    def _write_spooled(self, path: Path, names: list[str]) -> str:
        """A shard from the spool; its sha256, hashed as it is written."""
        stream = _HashedFile(path, self._head(names))
        for name in names:
            _, _, start, nbytes = self._entries[name]
            self._spool.seek(start)
            while nbytes:
                chunk = self._spool.read(min(nbytes, 1 << 24))
                stream.write(chunk)
                nbytes -= len(chunk)
        return stream.close()

    def commit(self, config: dict | None, manifest: dict) -> Path:
        """Lay out shards, write config.json and the manifest, fsync and rename into place."""
        if self._planned:
            raise ValueError(f"{len(self._planned)} planned tensors never added, {self._planned[-1]} first")
        shards = self._shard_names()
        files = self._shard_files if self._planned is not None else {
            shard: self._write_spooled(self.tmp / shard, names) for shard, names in shards.items()}
        for shard in shards.keys() - files.keys():     # a planned shard without tensors: its header alone
            files[shard] = _HashedFile(self.tmp / shard, self._heads.get(shard) or self._head([])).close()
        if len(shards) > 1 and not self._heads:
            weight_map = {n: shard for shard, names in shards.items() for n in names}
            index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
            (self.tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        self._close_spool()
        if config is not None:
            (self.tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for p in sorted(self.tmp.rglob("*")):
            name = p.relative_to(self.tmp).as_posix()
            if p.is_file() and name not in files:
                files[name] = sha256_file(p)
        body = {"format_version": FORMAT_VERSION, "bitsmith_version": _version(), **manifest, "files": files}
        (self.tmp / MANIFEST).write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")
        _fsync_tree(self.tmp)
        self._output.publish()
        return self.out

    def abort(self) -> None:
        self._close_spool()
        if self._stream is not None:
            self._stream.close()
        self._output.discard()

    def _close_spool(self) -> None:
        if self._spool is not None:
            self._spool.close()
            (self.tmp / ".spool").unlink()
            self._spool = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        return False


class _HashedFile:
    """A file written front to back, hashed as it is written."""

    def __init__(self, path: Path, head: bytes):
        self.file, self.digest = open(path, "wb"), hashlib.sha256()  # noqa: SIM115 (closed by close())
        self.write(head)

    def write(self, data) -> None:
        self.file.write(data)
        self.digest.update(data)

    def close(self) -> str:
        self.file.close()
        return self.digest.hexdigest()


class Checkpoint:
    """Lazy reader of a safetensors folder (HF or bitsmith): config, manifest and tensors by name."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise InputError(f"{self.path}: no such folder")
        check_links(self.path)
        self.config = _read_json(self.path / "config.json") if (self.path / "config.json").exists() else None
        self.manifest = _read_json(self.path / MANIFEST) if (self.path / MANIFEST).exists() else None
        self._where = self._index()
        self.coded = dfloat.coded_tensors(self.manifest, self.config)   # name -> metadata of coded tensors
        self._check_parts()

    @property
    def quantization_config(self) -> dict | None:
        return (self.config or {}).get("quantization_config")

    def _index(self) -> dict[str, Path]:
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise InputError(f"{index}: no weight_map in the shard index")
            where = {name: inside(self.path, shard, f"{index} weight_map") for name, shard in weight_map.items()}
            for shard in where.values():
                if not shard.is_file():
                    raise InputError(f"{index}: weight_map names {shard.name}, which is not a file in the folder")
            return where
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            pickles = [p.name for p in self.path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
            if pickles:
                raise InputError(f"{self.path}: only pickle checkpoints ({', '.join(sorted(pickles))}); "
                                 "bitsmith never unpickles files, convert to safetensors first")
            raise InputError(f"{self.path}: no *.safetensors files")
        where = {}
        for f in files:
            for name in _safetensors_keys(f):
                where[name] = f
        return where

    def _check_parts(self) -> None:
        """Every coded tensor's part is stored, uint8 and exactly as long as its metadata says (`part_size`):
        no size in the metadata goes beyond the file."""
        by_file: dict[Path, list[str]] = {}
        for name in self.coded:
            if name + dfloat.PART not in self._where:
                raise InputError(f"{name}: coded tensor without its stored part {name + dfloat.PART}")
            by_file.setdefault(self._where[name + dfloat.PART], []).append(name)
        for path, names in by_file.items():
            try:
                stored = {}
                with safe_open(str(path), framework="pt") as f:
                    for name in names:
                        part = f.get_slice(name + dfloat.PART)
                        stored[name] = (part.get_dtype(), list(part.get_shape()))
            except Exception as e:  # noqa: BLE001 safetensors raises its own error types for truncated/corrupt files
                raise InputError(f"{path}: cannot read the coded tensors ({e})") from None
            for name in names:
                size = dfloat.part_size(self.coded[name])
                if stored[name] != ("U8", [size]):
                    dtype, shape = stored[name]
                    raise InputError(f"{name + dfloat.PART}: stored as {dtype} {shape}, its metadata needs U8 [{size}] "
                                     "(corrupted coded tensor)")

    def keys(self) -> list[str]:
        return dfloat.tensor_names(self._where)

    def files(self) -> list[Path]:
        """The safetensors files, in the order of the shard index (else by name)."""
        return list(dict.fromkeys(self._where.values()))

    def __contains__(self, name: str) -> bool:
        return name in self._where or name in self.coded

    def __iter__(self):
        return iter(self.keys())

    def numel(self, name: str) -> int:
        n = 1
        for d in self.coded[name]["shape"] if name in self.coded else self._slice(name).get_shape():
            n *= d
        return n

    def nbytes(self, name: str) -> int:
        """Stored size of one tensor in bytes."""
        return self.numel(name) * DTYPE_BYTES[self.dtype(name)]

    def dtype(self, name: str) -> str:
        """The safetensors dtype of a tensor as `get` gives it (BF16 for a coded one)."""
        return "BF16" if name in self.coded else self._slice(name).get_dtype()

    def shape(self, name: str) -> list[int]:
        return list(self.coded[name]["shape"]) if name in self.coded else list(self._slice(name).get_shape())

    def _slice(self, name: str):
        with safe_open(str(self._where[name]), framework="pt") as f:
            return f.get_slice(name)

    def get(self, name: str) -> torch.Tensor:
        """A tensor by name; a coded one is decoded and checked against its recorded sha256."""
        return next(self.get_many([name]))[1]

    def get_many(self, names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) in the order asked, as `get` gives them; the coded ones are decoded together, up to
        dfloat.BATCH_VALUES values a call (one table build and one lockstep loop for many tensors)."""
        batch, values = [], 0
        for name in names:
            batch.append(name)
            values += math.prod(self.coded[name]["shape"]) if name in self.coded else 0
            if values >= dfloat.BATCH_VALUES:
                yield from self._read(batch)
                batch, values = [], 0
        yield from self._read(batch)

    def _read(self, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        files: dict[Path, object] = {}                  # each file opened once for the batch
        coded = [name for name in names if name in self.coded]
        parts = [dfloat.from_parts(name, self.coded[name], lambda n: self.stored(n, files)) for name in coded]
        decoded = dict(zip(coded, dfloat.decode_many(parts, coded)))
        for name in names:
            yield name, decoded.pop(name) if name in decoded else self.stored(name, files)

    def stored(self, name: str, files: dict | None = None) -> torch.Tensor:
        """A tensor exactly as stored in the files (the parts of a coded tensor included); `files` keeps the
        files open between calls."""
        path = self._where.get(name)
        if path is None:
            raise KeyError(name)
        try:
            if files is None:
                with safe_open(str(path), framework="pt") as f:
                    return f.get_tensor(name)
            if path not in files:
                files[path] = safe_open(str(path), framework="pt")
            return files[path].get_tensor(name)
        except Exception as e:  # noqa: BLE001 safetensors raises its own error types for truncated/corrupt files
            raise InputError(f"{path}: cannot read tensor {name} ({e})") from None


def verify(path) -> list[str]:
    """Problems found in a bitsmith folder: missing manifest, missing or altered files (sha256), files the
    reader reads that the manifest leaves out, names leading out of the folder, coded tensors that do not
    decode to their source (sha256 recorded at compress time)."""
    path = Path(path)
    if not (path / MANIFEST).exists():
        return [f"{path}: no {MANIFEST} (not a finished bitsmith checkpoint)"]
    files = _read_json(path / MANIFEST).get("files")
    if not isinstance(files, dict):
        return [f"{path / MANIFEST}: no files map (names to sha256)"]
    problems = []
    for name, digest in files.items():
        try:
            f = inside(path, name, f"{path / MANIFEST} files")
        except InputError as e:
            problems.append(str(e))
            continue
        if not f.is_file():
            problems.append(f"{name}: missing")
        elif sha256_file(f) != digest:
            problems.append(f"{name}: sha256 mismatch")
    if not problems:
        try:
            checkpoint = Checkpoint(path)
            read = [p.relative_to(path).as_posix() for p in checkpoint.files()]
            read += [name for name in ("config.json", "model.safetensors.index.json") if (path / name).exists()]
            problems += [f"{name}: not in the manifest" for name in read if name not in files]
            deque(checkpoint.get_many(checkpoint.coded), maxlen=0)   # decoding checks each source sha256
        except InputError as e:
            problems.append(str(e))
    return problems


def _safetensors_keys(path: Path) -> list[str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as e:  # noqa: BLE001 safetensors raises its own error types
        raise InputError(f"{path}: not a readable safetensors file ({e})") from None


def _read_json(path: Path) -> dict:
    """A JSON object from a file (config, manifest, shard index), or InputError."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: holds a JSON {type(data).__name__}, not an object")
    return data


def _fsync_tree(root: Path) -> None:
    for p in [*root.rglob("*"), root]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("bitsmith")
    except PackageNotFoundError:
        return "0+unknown"

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
import zipfile
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from . import dfloat, faults
from .errors import InputError, library_error, one_line
from .journal import NAME as JOURNAL
from .journal import Journal
from .output import Output, ResumeRefused, fsync
from .paths import check_folder, inside, open_regular, read_bytes

MANIFEST = "bitsmith_manifest.json"
FORMAT_VERSION = 1
SHARD_BYTES = 2 * 1024**3
SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}
TORCH_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}
SPOOL = ".spool"
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
# transformers does not know quant_method "bitsmith": left alone it warns and builds the model with random weights in
# place of the linears it cannot read. An attention implementation no transformers has makes its from_pretrained
# refuse such a folder instead; bitsmith's transformers quantizer (bitsmith/hf_quantizer.py, registered by
# `import bitsmith`) clears it and loads the folder, and bitsmith's own reader ignores it.
TRANSFORMERS_GUARD = "bitsmith (import bitsmith to load this checkpoint)"


def guarded(config: dict) -> dict:
    """config.json with TRANSFORMERS_GUARD as its attention implementation when its quant_method is "bitsmith"
    (a layout transformers cannot read by itself), and without it otherwise."""
    config = {k: v for k, v in config.items() if not (k == "attn_implementation" and v == TRANSFORMERS_GUARD)}
    qc = config.get("quantization_config")
    if isinstance(qc, dict) and qc.get("quant_method") == "bitsmith":
        config["attn_implementation"] = TRANSFORMERS_GUARD
    return config


def sha256_file(path: Path, what: str | None = None) -> str:
    """sha256 of a regular file (`paths.open_regular`: a FIFO or device is refused unread)."""
    h = hashlib.sha256()
    with open_regular(path, what) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def reserved(name: str) -> bool:
    """Whether a file name in a folder is one a writer keeps for itself: the manifest, or under its spool or
    journal (a side file of that name would overwrite them while the folder is written)."""
    return name == MANIFEST or name.split("/")[0] in (SPOOL, JOURNAL)


class CheckpointWriter:
    """Builds a checkpoint folder in a temporary sibling of `out`; `commit` publishes it.

    Tensors are spooled to disk as they arrive (memory stays flat however large the model), then laid
    out into safetensors shards of at most `shard_bytes` at commit, in the order they were added. When
    every tensor is declared first (`plan`), the shards are laid out at once and `add` writes straight
    into them, with no spool.

    A spooling writer keeps a journal (formats/journal.py): `record` makes the tensors added so far durable
    and notes them with the caller's entry. A writer made with `resume` continues the unfinished folder a
    killed run on the same OUT left, up to its last entry: the entries are in `resumed` (empty when there
    was nothing to continue), the tensors they cover stay added (`get` reads them back), and the files given
    to `save_file` stay in place. Interrupted (KeyboardInterrupt: Ctrl-C, or SIGTERM through the command line), a
    writer that has journaled keeps its folder for such a run, and says where; any other failure deletes it.
    """

    def __init__(self, out, overwrite: bool = False, shard_bytes: int = SHARD_BYTES, inputs=(),
                 resume: bool = False):
        """`inputs`: the paths the run reads, which OUT may not be, lie inside or contain (formats/output.py);
        OUT is locked from here to `commit`, `abort` or `release`."""
        self.out = Path(out)
        self._output = Output(out, inputs, overwrite, JOURNAL if resume else None)
        self.tmp = self._output.tmp
        self._journal = Journal(self.tmp)
        self._recorded = 0                               # tensors the journal covers (the first ones added)
        self.shard_bytes = shard_bytes
        self._spool = None
        self._entries: dict[str, tuple[str, list[int], int, int]] = {}   # name -> dtype, shape, offset, bytes
        self._planned: list[str] | None = None           # names still to come, last first, once planned
        self._layout: dict[str, list[str]] | None = None  # shard -> its tensors, once planned
        self._shard_files: dict[str, str] = {}           # shard -> sha256, once written
        self._stream: _HashedFile | None = None
        self._heads: dict[str, bytes] = {}               # shard -> raw header given by the plan
        try:
            self.resumed: list[dict] = self._continue() if self._output.adopted else []
        except BaseException:
            self._output.release()
            raise

    def _continue(self) -> list[dict]:
        """Take up the adopted folder as its journal leaves it: the spool cut back to the last entry, the
        tensors and saved files the entries name kept, anything else deleted. A spool shorter than the journal
        says leaves nothing to continue (the folder is emptied)."""
        entries = self._journal.read()
        length, spool = (entries[-1]["spool"] if entries else 0), self.tmp / SPOOL
        if length > (spool.stat().st_size if spool.is_file() else 0):
            entries = []
        kept = {JOURNAL, SPOOL, *(e["file"] for e in entries if "file" in e)} if entries else set()
        for p in self.tmp.iterdir():
            if p.name not in kept:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        if spool.exists():
            os.truncate(spool, length)
            self._spool = open(spool, "r+b")  # noqa: SIM115 (closed by close())
            self._spool.seek(length)
        for entry in entries:
            for name, dtype, shape, offset, nbytes in entry["tensors"]:
                self._entries.pop(name, None)           # a tensor `replace`d: its later place, as it was added
                self._entries[name] = (dtype, shape, offset, nbytes)
        self._recorded = len(self._entries)
        return [{k: v for k, v in e.items() if k not in ("tensors", "spool")} for e in entries]

    def record(self, entry: dict) -> None:
        """Make every tensor added so far durable, then journal `entry` (a JSON object) with them: a run that
        resumes this folder finds it in `resumed`, and those tensors added."""
        if self._planned is not None:
            raise ValueError("a planned layout is written straight into its shards and not journaled")
        if self._spool is not None:
            self._spool.flush()
            os.fsync(self._spool.fileno())
        new = [[name, *self._entries[name]] for name in list(self._entries)[self._recorded:]]
        self._journal.append({**entry, "tensors": new, "spool": self._spool.tell() if self._spool else 0})
        self._recorded = len(self._entries)

    def save_file(self, name: str, data: bytes) -> None:
        """A side file written at once, durably, and journaled: a run that resumes this folder keeps it."""
        part = self.tmp / f"{name}.part"
        part.write_bytes(data)
        fsync(part)
        os.replace(part, self.tmp / name)
        self.record({"file": name})

    def saved(self, name: str) -> Path | None:
        """A side file already in the folder (one `save_file` wrote before a resume included), or None."""
        path = self.tmp / name
        return path if path.is_file() else None

    def get(self, name: str) -> torch.Tensor:
        """A tensor added to the spool, read back as it was added."""
        dtype, shape, offset, nbytes = self._entries[name]
        self._spool.flush()
        raw = bytearray(os.pread(self._spool.fileno(), nbytes, offset))
        if not raw:
            return torch.empty(shape, dtype=TORCH_DTYPES[dtype])
        return torch.frombuffer(raw, dtype=TORCH_DTYPES[dtype]).reshape(shape)

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
            self._spool = open(self.tmp / SPOOL, "w+b")  # noqa: SIM115 (closed by close())
        self._entries[name] = (*entry, self._spool.tell(), raw.nbytes)
        self._spool.write(raw.data)

    def replace(self, name: str, tensor: torch.Tensor) -> None:
        """Store `tensor` instead of the one added as `name` (same dtype and shape): it is written after the
        tensors added so far, and journaled by the next `record` as a new one."""
        if self._planned is not None:
            raise ValueError("a planned layout is written straight into its shards: nothing in it is replaced")
        dtype, shape, _, _ = self._entries[name]
        if (SAFETENSORS_DTYPES[tensor.dtype], list(tensor.shape)) != (dtype, list(shape)):
            raise ValueError(f"tensor {name}: a replacement must be {dtype} {list(shape)}, "
                             f"not {SAFETENSORS_DTYPES[tensor.dtype]} {list(tensor.shape)}")
        if list(self._entries).index(name) < self._recorded:
            self._recorded -= 1
        del self._entries[name]
        self.add(name, tensor)

    def holds(self, name: str) -> bool:
        """Whether a tensor was added as `name` (as it is: not as the parts of a coded one)."""
        return name in self._entries

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
        """A side file (tokenizer, generation config, ...) copied into the folder; not one of the names this writer
        keeps for its own files (`reserved`)."""
        if reserved(name):
            raise InputError(f"{name}: a name bitsmith keeps for its own files in an output folder; rename the file")
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

    def commit(self, config: dict | None, manifest: dict, recorded: bytes | None = None) -> Path:
        """Lay out shards, write config.json and the manifest, fsync and rename into place. `recorded`: the manifest
        of a folder given back byte for byte (decompress), written as it was once its files map is exactly the files
        written (else InputError, nothing published)."""
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
        faults.point("commit")
        self._journal.remove()                          # before the spool: a journal never outlives it
        self._close_spool()
        if config is not None:
            (self.tmp / "config.json").write_text(json.dumps(guarded(config), indent=2, sort_keys=True) + "\n")
        for p in sorted(self.tmp.rglob("*")):
            name = p.relative_to(self.tmp).as_posix()
            if p.is_file() and name not in files:
                files[name] = sha256_file(p)
        if recorded is not None:
            _check_recorded(recorded, files)
            (self.tmp / MANIFEST).write_bytes(recorded)
        else:
            body = {"format_version": FORMAT_VERSION, "bitsmith_version": _version(), **manifest, "files": files}
            (self.tmp / MANIFEST).write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")
        _fsync_tree(self.tmp)
        self._output.publish()
        return self.out

    def abort(self) -> None:
        self._close_files()
        self._output.discard()

    def release(self) -> None:
        """Unlock, leaving the folder as it is on disk for a later run to continue (or delete)."""
        self._close_files()
        self._output.release()

    def _close_files(self) -> None:
        if self._spool is not None:
            self._spool.close()
            self._spool = None
        if self._stream is not None:
            self._stream.close()
        self._journal.close()

    def _close_spool(self) -> None:
        if self._spool is not None:
            self._spool.close()
            (self.tmp / SPOOL).unlink()
            self._spool = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if isinstance(exc, ResumeRefused):
            self.release()                              # nothing lost: a run with the right inputs continues
        elif isinstance(exc, KeyboardInterrupt) and self._journal.path.is_file():
            self.release()                              # interrupted (Ctrl-C, SIGTERM): kept for --resume
            raise type(exc)(f"{self.out}: the unfinished output is kept in {self.tmp}; run the same command with "
                            "--resume to continue it (a run without --resume deletes it)") from None
        elif exc_type is not None:
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
            raise InputError(f"{self.path}: {'not a folder' if self.path.exists() else 'no such folder'}")
        check_folder(self.path)
        self.manifest = _read_json(self.path / MANIFEST) if (self.path / MANIFEST).exists() else None
        self.listed = None if self.manifest is None else listed_files(self.manifest, self.path / MANIFEST)
        if self.listed is not None:
            self._check_unchanged()
        self.config = self._json("config.json") if (self.path / "config.json").exists() else None
        self._where = self._index()
        self.coded = dfloat.coded_tensors(self.manifest, self.config)   # name -> metadata of coded tensors
        self._check_parts()

    @property
    def quantization_config(self) -> dict | None:
        return (self.config or {}).get("quantization_config")

    def _json(self, name: str) -> dict:
        """A JSON object the reader reads from the folder: one the manifest lists, when there is a manifest."""
        self._check_listed(name)
        return _read_json(self.path / name)

    def _check_unchanged(self) -> None:
        """With a manifest: every listed file but the shards (config, index, plan, tokenizer files: small, read
        whole) holds the bytes its sha256 says, and the manifest's plan is plan.json's; a folder changed after it
        was written is refused instead of read. (The shards' bytes are `verify`'s to hash: too large for every
        open.)"""
        for name, digest in self.listed.items():
            if name.endswith(".safetensors"):
                continue
            path = inside(self.path, name, f"{self.path / MANIFEST} files")
            if os.path.lexists(path) and sha256_file(path, name) != digest:
                raise InputError(f"{self.path}: {name} does not match its sha256 in {MANIFEST} (changed after the "
                                 "checkpoint was written); see bitsmith verify")
        plan = self.manifest.get("plan")
        if (plan is not None and "plan.json" in self.listed and (self.path / "plan.json").is_file()
                and _read_json(self.path / "plan.json") != plan):
            raise InputError(f"{self.path}: the plan in {MANIFEST} is not the one in plan.json (changed after the "
                             "checkpoint was written); see bitsmith verify")

    def _check_listed(self, name: str) -> None:
        """With a manifest, the reader reads only the files it lists: any other was added afterwards."""
        if self.listed is not None and name not in self.listed:
            raise InputError(f"{self.path}: {name} is not in its {MANIFEST} (added after the checkpoint was "
                             "written); remove it, or see bitsmith verify")

    def _index(self) -> dict[str, Path]:
        for extra in sorted(p.name for p in self.path.glob("*.safetensors")):
            self._check_listed(extra)               # unread with an index, yet no stray shard may sit beside it
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            return self._sharded(index)
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            pickles = [p.name for p in self.path.iterdir() if p.is_file() and (weights_name(p.name) or pickled(p))]
            if pickles:
                raise InputError(f"{self.path}: only pickle checkpoints ({', '.join(sorted(pickles))}); "
                                 "bitsmith never unpickles files, convert to safetensors first")
            raise InputError(f"{self.path}: no *.safetensors files")
        where = {}
        for f in files:
            for name in _safetensors_keys(f):
                where[name] = f
        return where

    def _sharded(self, index: Path) -> dict[str, Path]:
        """Tensor -> shard from the shard index, once every shard is a listed file that holds its tensors."""
        weight_map = self._json(index.name).get("weight_map")
        if not isinstance(weight_map, dict):
            raise InputError(f"{index}: no weight_map in the shard index")
        where = {name: inside(self.path, shard, f"{index} weight_map") for name, shard in weight_map.items()}
        for shard in dict.fromkeys(where.values()):
            if not shard.is_file():
                raise InputError(f"{index}: weight_map names {shard.name}, which is not a file in the folder")
            self._check_listed(shard.relative_to(self.path).as_posix())
        held = {shard: set(_safetensors_keys(shard)) for shard in dict.fromkeys(where.values())}
        for name, shard in where.items():
            if name not in held[shard]:
                raise InputError(f"{index}: weight_map puts {name} in {shard.name}, which does not hold it")
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
                raise library_error(f"{path}: cannot read the coded tensors ({one_line(e)})") from None
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
            raise library_error(f"{path}: cannot read tensor {name} ({one_line(e)})") from None


def verify(path) -> list[str]:
    """Problems found in a bitsmith folder: missing manifest, an empty or malformed files map, missing or altered
    files (sha256), files in the folder the manifest leaves out, names leading out of the folder (the recorded
    source files' too), coded tensors that do not decode to their source (sha256 recorded at compress time)."""
    path = Path(path)
    if not path.is_dir():
        return [f"{path}: {'not a folder' if path.exists() else 'no such folder'}"]
    if not (path / MANIFEST).exists():
        return [f"{path}: no {MANIFEST} (not a finished bitsmith checkpoint)"]
    try:
        files = listed_files(_read_json(path / MANIFEST), path / MANIFEST)
    except InputError as e:
        return [str(e)]
    problems = [problem for name, digest in files.items() if (problem := _file_problem(path, name, digest))]
    problems += [f"{name}: not in the manifest" for name in unlisted(path, files)]
    if not problems:
        try:
            checkpoint = Checkpoint(path)
            deque(checkpoint.get_many(checkpoint.coded), maxlen=0)   # decoding checks each source sha256
            recorded = (checkpoint.manifest or {}).get("source_files")
            if recorded:                                # what decompress would write: names inside, same tensors
                from .dfloat.folders import recorded_sources
                recorded_sources(checkpoint, recorded)
        except InputError as e:
            problems.append(str(e))
    return problems


def listed_files(manifest: dict, where: Path) -> dict[str, str]:
    """The manifest's files map (name -> sha256), checked: a format this version reads, at least one file, every
    sha256 64 lowercase hex digits."""
    version = manifest.get("format_version")
    if type(version) is not int or not 1 <= version <= FORMAT_VERSION:
        raise InputError(f"{where}: format_version {version!r} is not one this bitsmith reads "
                         f"(1 to {FORMAT_VERSION})")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise InputError(f"{where}: no files map (names to sha256)")
    if not files:
        raise InputError(f"{where}: the files map is empty (a checkpoint lists at least its weights)")
    for name, digest in files.items():
        if not (isinstance(digest, str) and len(digest) == 64 and set(digest) <= set("0123456789abcdef")):
            raise InputError(f"{where}: files: {name!r} has sha256 {digest!r}, not 64 lowercase hex digits")
    return files


def unlisted(folder: Path, files: dict) -> list[str]:
    """Everything in `folder` but folders and the manifest that `files` leaves out, by relative name."""
    found = []
    for root, dirs, names in os.walk(folder):              # does not descend into linked folders
        for entry in names + [d for d in dirs if Path(root, d).is_symlink()]:
            name = Path(root, entry).relative_to(folder).as_posix()
            if name != MANIFEST and name not in files:
                found.append(name)
    return sorted(found)


def _file_problem(folder: Path, name: str, digest: str) -> str | None:
    """What is wrong with one file the manifest lists, or None."""
    try:
        path = inside(folder, name, f"{folder / MANIFEST} files")
        if not os.path.lexists(path):
            return f"{name}: missing"
        return None if sha256_file(path, name) == digest else f"{name}: sha256 mismatch"
    except InputError as e:
        return str(e)


def weights_name(name: str) -> bool:
    """Whether a file name is one of pickled weights by convention (`pytorch_model*.bin`, `*.pt`, `*.pth`,
    `*.ckpt`, `*.pkl`); whether a file is a pickle is `pickled`'s to say."""
    return name.endswith((".pt", ".pth", ".ckpt", ".pkl")) or (name.startswith("pytorch_model") and
                                                              name.endswith(".bin"))


def pickled(path: Path) -> bool:
    """Whether a regular file holds a pickle, by its first bytes, never by its name and without unpickling: pickle
    protocol 2 to 5 (what torch.save and pickle.dump write), or a zip archive holding a .pkl member (torch.save's
    zip format). A tokenizer's .bin file is no pickle."""
    with open_regular(path) as f:
        head = f.read(4)
        if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
            return True
        if head != b"PK\x03\x04":
            return False
        try:
            with zipfile.ZipFile(f) as archive:
                return any(name.endswith(".pkl") for name in archive.namelist())
        except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError, OSError):
            return False


def _check_recorded(recorded: bytes, files: dict[str, str]) -> None:
    """A recorded manifest describes a folder restored byte for byte only when its files map is the files written."""
    try:
        listed = json.loads(recorded).get("files")
    except (ValueError, AttributeError, RecursionError):
        listed = None
    if not isinstance(listed, dict):
        raise InputError(f"{MANIFEST} as recorded: no files map (names to sha256)")
    differ = sorted(name for name in listed.keys() | files.keys() if listed.get(name) != files.get(name))
    if differ:
        raise InputError(f"{MANIFEST} as recorded does not describe the files given back ({', '.join(differ[:3])}"
                         f"{', ...' if len(differ) > 3 else ''})")


def _safetensors_keys(path: Path) -> list[str]:
    open_regular(path).close()                  # a FIFO would block the parser, a device never end
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as e:  # noqa: BLE001 safetensors raises its own error types
        raise library_error(f"{path}: not a readable safetensors file ({one_line(e)})") from None


def _read_json(path: Path) -> dict:
    """A JSON object from a file (config, manifest, shard index), or InputError."""
    raw = read_bytes(path)
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise library_error(f"{path}: not valid JSON ({one_line(e)})") from None
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

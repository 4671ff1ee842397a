"""A bitsmith folder someone changed after it was written: the reader reads only what the manifest lists, verify
reports everything the manifest does not cover, and malformed manifests, indexes and headers are InputError
(one line, exit 2), never a crash, a hang or a silently different tensor."""
from __future__ import annotations

import json
import os
import stat
import struct

import pytest
import torch
from hostile_support import never_blocks, refused, run, tree
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import bitsmith
from bitsmith.formats.checkpoint import MANIFEST, Checkpoint, CheckpointWriter, sha256_file, verify
from bitsmith.formats.errors import InputError

CONFIG = {"model_type": "llama", "hidden_size": 8}


def write_folder(out, shard_bytes: int = 1 << 30) -> None:
    with CheckpointWriter(out, shard_bytes=shard_bytes) as w:
        w.add("a.weight", torch.arange(12, dtype=torch.float32).reshape(3, 4))
        w.add("b.weight", torch.ones(5, dtype=torch.bfloat16))
        w.add_file("plan.json", b'{"layers": {}}\n')
        w.add_file("tokenizer.json", b"{}\n")
        w.commit(CONFIG, {"note": "test"})


@pytest.fixture
def ck(tmp_path):
    """A finished single-shard folder."""
    write_folder(tmp_path / "ck")
    return tmp_path / "ck"


@pytest.fixture
def sharded(tmp_path):
    """A finished folder of two shards and their index."""
    write_folder(tmp_path / "sh", shard_bytes=48)
    assert (tmp_path / "sh" / "model.safetensors.index.json").exists()
    return tmp_path / "sh"


def edit_manifest(folder, change) -> None:
    manifest = json.loads((folder / MANIFEST).read_text())
    change(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest))


def refused_by_reader(folder, message: str) -> None:
    """Checkpoint, bitsmith.load and inspect refuse the folder with `message`, writing nothing."""
    before = tree(folder.parent)
    with pytest.raises(InputError) as e:
        Checkpoint(folder)
    assert str(e.value) == message
    with pytest.raises(InputError):
        bitsmith.load(str(folder))
    refused(run("inspect", folder), f"error: {message}")
    assert tree(folder.parent) == before


def failed_verify(folder, problems: list[str]) -> None:
    before = tree(folder.parent)
    assert verify(folder) == problems
    r = run("verify", folder)
    assert r.exit_code == 2 and r.stdout == "" and r.stderr.splitlines() == [f"FAIL {p}" for p in problems]
    assert tree(folder.parent) == before


# files the manifest does not list


def unlisted_message(folder, name: str) -> str:
    return (f"{folder}: {name} is not in its {MANIFEST} (added after the checkpoint was written); remove it, or "
            "see bitsmith verify")


@pytest.mark.parametrize("tensor", ["a.weight", "c.weight"])
def test_an_added_shard_is_never_read(ck, tensor):
    """Beside the listed shard, a shard holding a tensor of the same name would override it when read."""
    save_file({tensor: torch.full((3, 4), 666.0)}, str(ck / "extra.safetensors"))
    refused_by_reader(ck, unlisted_message(ck, "extra.safetensors"))
    failed_verify(ck, ["extra.safetensors: not in the manifest"])


def test_a_shard_added_beside_an_index_is_refused(sharded):
    save_file({"a.weight": torch.zeros(3, 4)}, str(sharded / "model-00009-of-00009.safetensors"))
    refused_by_reader(sharded, unlisted_message(sharded, "model-00009-of-00009.safetensors"))
    failed_verify(sharded, ["model-00009-of-00009.safetensors: not in the manifest"])


def test_an_added_config_is_never_read(tmp_path):
    with CheckpointWriter(tmp_path / "ck") as w:
        w.add("a.weight", torch.ones(3))
        w.commit(None, {})
    (tmp_path / "ck" / "config.json").write_text(json.dumps(CONFIG))
    refused_by_reader(tmp_path / "ck", unlisted_message(tmp_path / "ck", "config.json"))
    failed_verify(tmp_path / "ck", ["config.json: not in the manifest"])


def test_an_added_index_is_never_read(ck):
    (ck / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a.weight": "model.safetensors"}}))
    refused_by_reader(ck, unlisted_message(ck, "model.safetensors.index.json"))
    failed_verify(ck, ["model.safetensors.index.json: not in the manifest"])


def test_an_added_side_file_fails_verify_but_not_the_reader(ck):
    (ck / "notes").mkdir()
    (ck / "notes" / "README.md").write_text("hello")
    assert Checkpoint(ck).keys() == ["a.weight", "b.weight"]
    failed_verify(ck, ["notes/README.md: not in the manifest"])


@pytest.mark.parametrize("name", ["config.json", "plan.json", "tokenizer.json"])
def test_every_written_file_is_covered_by_its_sha256(ck, name):
    assert name in json.loads((ck / MANIFEST).read_text())["files"]
    (ck / name).write_text((ck / name).read_text().replace("}", ', "edited": 1}', 1))
    failed_verify(ck, [f"{name}: sha256 mismatch"])
    refused_by_reader(ck, f"{ck}: {name} does not match its sha256 in {MANIFEST} (changed after the checkpoint was "
                          "written); see bitsmith verify")


def test_the_manifests_plan_is_the_one_in_plan_json(ck):
    edit_manifest(ck, lambda m: m.update(plan={"layers": {}}))          # as written: plan.json holds the same
    assert verify(ck) == [] and Checkpoint(ck).keys() == ["a.weight", "b.weight"]
    edit_manifest(ck, lambda m: m.update(plan={"layers": {"a": {"bits": 8}}}))
    message = (f"{ck}: the plan in {MANIFEST} is not the one in plan.json (changed after the checkpoint was "
               "written); see bitsmith verify")
    failed_verify(ck, [message])
    refused_by_reader(ck, message)


@pytest.mark.parametrize("name, problem", [
    ("../secret.txt", "climbs out of the folder (a '..' part)"),
    ("/etc/hostname", "is an absolute path (names are relative to the folder)"),
])
def test_the_reader_refuses_a_manifest_naming_files_outside(ck, name, problem):
    (ck.parent / "secret.txt").write_text("not for the reader")
    edit_manifest(ck, lambda m: m["files"].update({name: sha256_file(ck.parent / "secret.txt")}))
    message = f"{ck / MANIFEST} files: {name!r} {problem}"
    failed_verify(ck, [message])
    refused_by_reader(ck, message)


def test_a_deleted_config_fails_verify(ck):
    (ck / "config.json").unlink()
    failed_verify(ck, ["config.json: missing"])


# the manifest itself


@pytest.mark.parametrize("change, problem", [
    (lambda m: m.pop("files"), "no files map (names to sha256)"),
    (lambda m: m.update(files={}), "the files map is empty (a checkpoint lists at least its weights)"),
    (lambda m: m.update(files="model.safetensors"), "no files map (names to sha256)"),
    (lambda m: m["files"].update({"model.safetensors": 5}),
     "files: 'model.safetensors' has sha256 5, not 64 lowercase hex digits"),
    (lambda m: m["files"].update({"model.safetensors": "AB" * 32}),
     f"files: 'model.safetensors' has sha256 '{'AB' * 32}', not 64 lowercase hex digits"),
    (lambda m: m.update(format_version="1"), "format_version '1' is not one this bitsmith reads (1 to 1)"),
    (lambda m: m.update(format_version=2), "format_version 2 is not one this bitsmith reads (1 to 1)"),
    (lambda m: m.pop("format_version"), "format_version None is not one this bitsmith reads (1 to 1)"),
])
def test_a_malformed_files_map_fails_verify_and_the_reader(ck, change, problem):
    edit_manifest(ck, change)
    message = f"{ck / MANIFEST}: {problem}"
    failed_verify(ck, [message])
    refused_by_reader(ck, message)


@pytest.mark.parametrize("raw, problem", [
    (b"{not json", "not valid JSON (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))"),
    (b"[1, 2]", "holds a JSON list, not an object"),
    (b"[" * 100_000, ("not valid JSON (maximum recursion depth exceeded while decoding a JSON array from a "
                      "unicode string)")),
    (b"\x80{}", "not valid JSON ('utf-8' codec can't decode byte 0x80 in position 0: invalid start byte)"),
])
def test_a_manifest_that_is_not_a_json_object_fails_verify_and_the_reader(ck, raw, problem):
    (ck / MANIFEST).write_bytes(raw)
    message = f"{ck / MANIFEST}: {problem}"
    failed_verify(ck, [message])
    refused_by_reader(ck, message)


def test_verify_of_something_that_is_not_a_folder(tmp_path, ck):
    failed_verify(ck / "model.safetensors", [f"{ck / 'model.safetensors'}: not a folder"])
    failed_verify(tmp_path / "nowhere", [f"{tmp_path / 'nowhere'}: no such folder"])


# the shard index


@pytest.mark.parametrize("change, problem", [
    (lambda index: index["weight_map"].update({"a.weight": "model-00002-of-00002.safetensors"}),
     ": weight_map puts a.weight in model-00002-of-00002.safetensors, which does not hold it"),
    (lambda index: index.update(weight_map=[["a.weight", "model-00001-of-00002.safetensors"]]),
     ": no weight_map in the shard index"),
    (lambda index: index["weight_map"].update({"a.weight": 1}), " weight_map: 1 is not a file name"),
])
def test_an_index_that_does_not_describe_its_shards_is_refused(sharded, change, problem):
    """The index edited and its sha256 updated, as someone would to pass verify's checksums."""
    path = sharded / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    change(index)
    path.write_text(json.dumps(index))
    edit_manifest(sharded, lambda m: m["files"].update({path.name: sha256_file(path)}))
    refused_by_reader(sharded, f"{path}{problem}")
    failed_verify(sharded, [f"{path}{problem}"])


# safetensors headers


def header_file(path, header, data: bytes = b"", length: int | None = None) -> None:
    blob = json.dumps(header).encode() if not isinstance(header, bytes) else header
    path.write_bytes(struct.pack("<Q", len(blob) if length is None else length) + blob + data)


@pytest.mark.parametrize("header, data, length", [
    ({"x": {"dtype": 5, "shape": [2], "data_offsets": [0, 8]}}, bytes(8), None),
    ({"x": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}}, bytes(8), None),
    ({"x": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, bytes(8), None),
    ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 2**40]}}, bytes(8), None),
    ({"x": {"dtype": "F32", "shape": [2], "data_offsets": ["0", "8"]}}, bytes(8), None),
    ({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, bytes(8), None),
    ({"__metadata__": {"format": 5}}, b"", None),
    ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(8), 2**60),
    (b"{not json", b"", None),
    (b"", b"", None),
])
def test_a_malformed_safetensors_header_is_refused(tmp_path, header, data, length):
    folder = tmp_path / "m"
    folder.mkdir()
    header_file(folder / "model.safetensors", header, data, length)
    (folder / "config.json").write_text(json.dumps(CONFIG))
    before = tree(tmp_path)
    with pytest.raises(InputError) as e:
        Checkpoint(folder)
    assert str(e.value).startswith(f"{folder / 'model.safetensors'}: not a readable safetensors file (")
    assert "\n" not in str(e.value)
    refused(run("compress", folder, "-o", tmp_path / "z"), f"error: {e.value}")
    assert tree(tmp_path) == before


def test_a_three_byte_shard_is_refused(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.safetensors").write_bytes(b"abc")
    with pytest.raises(InputError, match="not a readable safetensors file"):
        Checkpoint(tmp_path / "m")


# files that are not regular files


def test_a_fifo_in_place_of_a_listed_shard_is_refused_unread(ck):
    (ck / "model.safetensors").unlink()
    os.mkfifo(ck / "model.safetensors")
    with never_blocks():
        failed_verify(ck, ["model.safetensors is a FIFO (named pipe), not a regular file"])
        with pytest.raises(InputError) as e:
            Checkpoint(ck)
        refused(run("decompress", ck, "-o", ck.parent / "d"), f"error: {e.value}")
    assert str(e.value) == f"{ck}: 'model.safetensors' is a FIFO (named pipe), not a regular file"
    assert not (ck.parent / "d").exists()


def test_an_added_fifo_is_refused_unread(ck):
    os.mkfifo(ck / "tokenizer.model")
    with never_blocks():
        failed_verify(ck, ["tokenizer.model: not in the manifest"])
        refused_by_reader(ck, f"{ck}: 'tokenizer.model' is a FIFO (named pipe), not a regular file")


def test_a_device_in_place_of_a_listed_shard_is_refused_unread(ck):
    (ck / "model.safetensors").unlink()
    try:
        os.mknod(ck / "model.safetensors", stat.S_IFCHR | 0o600, os.makedev(1, 5))      # /dev/zero: never ends
    except PermissionError:
        pytest.skip("making a device node needs root")
    failed_verify(ck, ["model.safetensors is a character device, not a regular file"])
    refused_by_reader(ck, f"{ck}: 'model.safetensors' is a character device, not a regular file")


def test_a_folder_in_place_of_the_config_is_refused(ck):
    (ck / "config.json").unlink()
    (ck / "config.json").mkdir()
    failed_verify(ck, ["config.json is a folder, not a regular file"])


# fuzzing: nothing but InputError, whatever the bytes say


def json_values():
    leaves = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=8)
    return st.recursive(leaves, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6),
                                                                                             inner, max_size=3),
                        max_leaves=8)


def header_entries():
    dtypes = st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "f32"]) | json_values()
    shapes = st.lists(st.integers(-1, 4), max_size=3) | json_values()
    offsets = st.lists(st.integers(-1, 40), min_size=2, max_size=2) | json_values()
    entry = st.fixed_dictionaries({}, optional={"dtype": dtypes, "shape": shapes, "data_offsets": offsets})
    return st.dictionaries(st.text(max_size=4), entry | json_values(), max_size=3)


def shard_bytes():
    """A length prefix (true, or any u64) and a header (structured, or any bytes), then up to 40 data bytes."""
    header = st.builds(lambda h: json.dumps(h).encode(), header_entries()) | st.binary(max_size=40)
    length = st.none() | st.integers(0, 2**64 - 1)
    return st.builds(lambda h, n, data: struct.pack("<Q", len(h) if n is None else n) + h + data,
                     header, length, st.binary(max_size=40)) | st.binary(max_size=16)


@pytest.fixture
def fuzz_folder(tmp_path):
    folder = tmp_path / "fuzz"
    folder.mkdir()
    return folder


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shard_bytes())
def test_fuzzed_safetensors_files_read_or_fail_with_input_error(fuzz_folder, raw):
    (fuzz_folder / "model.safetensors").write_bytes(raw)
    try:
        checkpoint = Checkpoint(fuzz_folder)
        tensors = dict(checkpoint.get_many(checkpoint.keys()))
    except InputError as e:
        assert "\n" not in str(e)
        return
    for name, t in tensors.items():
        assert list(t.shape) == checkpoint.shape(name)


def manifests(files: dict):
    """The written manifest with fields replaced by any JSON, or any JSON at all."""
    field = st.sampled_from(["files", "format_version", "lossless", "plan", "layers"])
    edits = st.dictionaries(field, json_values() | st.just(files) | st.just({}), max_size=3)
    return st.builds(lambda e: {"format_version": 1, "files": files, **e}, edits) | json_values()


@pytest.fixture
def fuzz_ck(tmp_path):
    write_folder(tmp_path / "ck")
    return tmp_path / "ck", json.loads((tmp_path / "ck" / MANIFEST).read_text())["files"]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_fuzzed_manifests_read_or_fail_with_input_error(fuzz_ck, data):
    folder, files = fuzz_ck
    manifest = data.draw(manifests(files))
    (folder / MANIFEST).write_text(json.dumps(manifest))
    problems = verify(folder)
    assert all("\n" not in p for p in problems)
    try:
        checkpoint = Checkpoint(folder)
        got = dict(checkpoint.get_many(checkpoint.keys()))
    except InputError as e:
        assert "\n" not in str(e) and problems
        return
    assert torch.equal(got["a.weight"], torch.arange(12, dtype=torch.float32).reshape(3, 4))

"""compress / decompress give back every file of the folder byte for byte, whatever its name ends with (a
tokenizer's .bin file is carried as opaque bytes), a bitsmith folder's manifest included; pickles (told by their
bytes, not their names), a safetensors file the shard index leaves out and names the writer keeps for itself are
refused with one line and exit 2, nothing written."""
from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch
from hostile_support import refused, run, tree
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from bitsmith.formats.checkpoint import MANIFEST, Checkpoint, CheckpointWriter, pickled, verify

INDEX = "model.safetensors.index.json"


def round_trip(folder, tmp_path):
    """compress then decompress through the command line; the decompressed folder."""
    for command, src, out in (("compress", folder, tmp_path / "z"), ("decompress", tmp_path / "z", tmp_path / "d")):
        r = run(command, src, "-o", out)
        assert r.exit_code == 0, r.output
    return tmp_path / "d"


def without_manifest(files: dict) -> dict:
    return {name: data for name, data in files.items() if name != MANIFEST}


@pytest.fixture
def model(tmp_path, stories_bf16):
    """stories260K in BF16 (its tensors coded), with its tokenizer .bin file, and more side files."""
    folder = tmp_path / "model"
    shutil.copytree(stories_bf16, folder)
    (folder / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    (folder / "original").mkdir()
    (folder / "original" / "params.json").write_text('{"dim": 64}')
    (folder / "original" / "tokenizer.model").write_bytes(bytes(range(256)) * 3)
    (folder / "weights.pt").write_bytes(b"not a pickle, whatever its name says")
    (folder / "data.bin").write_bytes(b"\x80\x01 protocol 1 is not sniffed; \x00\xff")
    return folder


def test_every_file_comes_back_byte_for_byte(model, tmp_path):
    assert (model / "tok512.bin").stat().st_size > 0
    out = round_trip(model, tmp_path)
    assert Checkpoint(tmp_path / "z").coded                                 # the BF16 tensors were coded
    assert without_manifest(tree(out)) == tree(model)
    assert verify(tmp_path / "z") == [] and verify(out) == []


def test_the_asset_folder_comes_back_byte_for_byte(stories_path, tmp_path):
    out = round_trip(stories_path, tmp_path)
    assert without_manifest(tree(out)) == tree(stories_path)


def test_a_sharded_folder_comes_back_byte_for_byte(model, tmp_path):
    tensors = load_file(str(model / "model.safetensors"))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:20], "model-00002-of-00002.safetensors": names[20:]}
    for shard, held in shards.items():
        save_file({k: tensors[k] for k in held}, str(model / shard), metadata={"format": "pt"})
    (model / "model.safetensors").unlink()
    (model / INDEX).write_text(json.dumps({"metadata": {"total_size": 1},
                                           "weight_map": {k: s for s, held in shards.items() for k in held}}))
    out = round_trip(model, tmp_path)
    assert without_manifest(tree(out)) == tree(model)


def test_a_bitsmith_folder_comes_back_with_its_own_manifest(tmp_path):
    plan = {"format_version": 1, "layers": {}}
    with CheckpointWriter(tmp_path / "q") as writer:
        writer.add("embed.weight", (torch.randn(300, 64, generator=torch.Generator().manual_seed(0)) * 0.02)
                   .to(torch.bfloat16))
        writer.add("lm_head.qweight", torch.arange(64, dtype=torch.int32))
        writer.add_file("plan.json", json.dumps(plan).encode())
        writer.add_file("tok512.bin", bytes(range(256)))
        writer.commit({"model_type": "llama"}, {"plan": plan, "layers": {}, "source": {"name": "m"}})
    out = round_trip(tmp_path / "q", tmp_path)
    assert Checkpoint(tmp_path / "z").coded
    assert tree(out) == tree(tmp_path / "q")
    assert verify(out) == [] and run("inspect", out).exit_code == 0


def compressed(model, tmp_path):
    r = run("compress", model, "-o", tmp_path / "z")
    assert r.exit_code == 0, r.output
    return tmp_path / "z"


def edit(folder, change) -> None:
    manifest = json.loads((folder / MANIFEST).read_text())
    change(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("change, message", [
    (lambda m: m["source_files"].update(manifest=5), "source_files manifest: int, not the text of a manifest"),
    (lambda m: m["source_files"].update(manifest="\ud800"),
     "source_files manifest: holds text that no bytes encode (a lone surrogate)"),
    (lambda m: m["source_files"].update(manifest="[]"),
     "source_files: bitsmith_manifest.json as recorded: no files map (names to sha256)"),
    (lambda m: m["source_files"].update(manifest=json.dumps({"files": {"tokenizer.json": "0" * 64}})),
     ("source_files: bitsmith_manifest.json as recorded does not describe the files given back (.gitattributes, "
      "LICENSE, config.json, ...)")),
    (lambda m: m["source_files"]["files"]["model.safetensors"].update(sha256="0" * 64),
     ("source_files: model.safetensors would not come back byte for byte (its recorded sha256 is not that of the "
      "bytes its header and tensors make)")),
])
def test_recorded_files_the_bytes_do_not_match_are_refused(model, tmp_path, change, message):
    z = compressed(model, tmp_path)
    edit(z, change)
    before = tree(tmp_path)
    refused(run("decompress", z, "-o", tmp_path / "d"), f"error: {z / MANIFEST}: {message}")
    assert tree(tmp_path) == before


# pickles: told by their bytes


class Weights:
    """Stands for any pickled object (never unpickled here)."""


def torch_zip(path):
    torch.save({"w": torch.ones(3)}, path)


def torch_legacy(path):
    torch.save({"w": torch.ones(3)}, path, _use_new_zipfile_serialization=False)


def protocol(n):
    def write(path):
        path.write_bytes(pickle.dumps(Weights(), protocol=n))
    return write


@pytest.mark.parametrize("write", [torch_zip, torch_legacy, protocol(2), protocol(4), protocol(5)])
@pytest.mark.parametrize("name", ["pytorch_model.bin", "training_args.bin", "original/consolidated.00.pth",
                                  "tokenizer.data"])
def test_a_pickle_is_refused_whatever_its_name(model, tmp_path, write, name):
    (model / name).parent.mkdir(exist_ok=True)
    write(model / name)
    assert pickled(model / name)
    before = tree(tmp_path)
    refused(run("compress", model, "-o", tmp_path / "z"),
            f"error: {model}: {name!r} is a pickle; bitsmith never unpickles nor carries pickled files (weights are "
            "read from the safetensors files): remove it, or convert it")
    assert tree(tmp_path) == before


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.binary(max_size=64),
                 st.builds(lambda rest: b"PK\x03\x04" + rest, st.binary(max_size=200)),
                 st.builds(lambda p, rest: bytes([0x80, p]) + rest, st.integers(0, 255), st.binary(max_size=16))))
def test_fuzzed_first_bytes_are_told_apart_without_a_crash(tmp_path, raw):
    (tmp_path / "file").write_bytes(raw)
    assert pickled(tmp_path / "file") == (len(raw) >= 2 and raw[0] == 0x80 and 2 <= raw[1] <= 5)


def test_a_zip_without_a_pickle_is_carried(model, tmp_path):
    shutil.make_archive(str(model / "extras"), "zip", model / "original")
    assert not pickled(model / "extras.zip")
    out = round_trip(model, tmp_path)
    assert without_manifest(tree(out)) == tree(model)


def test_a_folder_of_pickled_weights_only_is_refused_naming_them(tmp_path, stories_path):
    folder = tmp_path / "m"
    folder.mkdir()
    shutil.copy(stories_path / "config.json", folder)
    shutil.copy(stories_path / "tok512.bin", folder)
    torch_zip(folder / "pytorch_model.bin")
    before = tree(tmp_path)
    message = (f"error: {folder}: only pickle checkpoints (pytorch_model.bin); bitsmith never unpickles files, "
               "convert to safetensors first")
    refused(run("compress", folder, "-o", tmp_path / "z"), message)
    refused(run("quantize", folder, "-o", tmp_path / "q", "--method", "rtn"), message)
    (folder / "pytorch_model.bin").unlink()                  # the tokenizer's .bin alone is no pickle checkpoint
    refused(run("compress", folder, "-o", tmp_path / "z"), f"error: {folder}: no *.safetensors files")
    del before["m/pytorch_model.bin"]
    assert tree(tmp_path) == before


# files that cannot be carried


def test_a_shard_the_index_leaves_out_is_refused(model, tmp_path):
    tensors = load_file(str(model / "model.safetensors"))
    (model / "model.safetensors").rename(model / "model-00001-of-00001.safetensors")
    (model / INDEX).write_text(json.dumps({"weight_map": {k: "model-00001-of-00001.safetensors" for k in tensors}}))
    save_file({"model.norm.weight": torch.zeros(64, dtype=torch.bfloat16)}, str(model / "consolidated.safetensors"))
    before = tree(tmp_path)
    refused(run("compress", model, "-o", tmp_path / "z"),
            f"error: {model}: consolidated.safetensors is a safetensors file that {INDEX} does not name; remove it, "
            "or add its tensors to the index")
    assert tree(tmp_path) == before


@pytest.mark.parametrize("name", [".spool", ".journal", ".spool/part", ".journal/x"])
def test_names_the_writer_keeps_for_itself_are_refused(model, tmp_path, name):
    (model / name).parent.mkdir(exist_ok=True)
    (model / name).write_bytes(b"\x00" * 4096)
    before = tree(tmp_path)
    refused(run("compress", model, "-o", tmp_path / "z"),
            f"error: {model}: {name!r} is a name bitsmith keeps for its own files in an output folder; rename or "
            "remove it")
    assert tree(tmp_path) == before


def test_such_names_in_a_subfolder_are_carried(model, tmp_path):
    (model / "original" / ".spool").write_bytes(b"\x01" * 64)
    out = round_trip(model, tmp_path)
    assert without_manifest(tree(out)) == tree(model)

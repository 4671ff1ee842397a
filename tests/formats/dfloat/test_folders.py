"""Coded tensors inside checkpoint folders: transparent reads, verify, compress/decompress of folders."""
from __future__ import annotations

import itertools
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from bitsmith.formats import dfloat
from bitsmith.formats.checkpoint import (
    MANIFEST,
    Checkpoint,
    CheckpointWriter,
    sha256_file,
    verify,
)
from bitsmith.formats.dfloat import parts
from bitsmith.formats.errors import InputError


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.fixture
def source(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"embed.weight": (torch.randn(300, 64, generator=g) * 0.02).to(torch.bfloat16),
               "norm.weight": torch.ones(64, dtype=torch.bfloat16),
               "tiny.bias": torch.zeros(3, dtype=torch.bfloat16),
               "fp32.weight": torch.randn(8, 8, generator=g),
               "position_ids": torch.arange(10)}
    folder = tmp_path / "src"
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "toy", "hidden_size": 64}))
    (folder / "tokenizer.json").write_text("{}")
    return folder, tensors


def test_write_coded_then_read_back_transparently(tmp_path):
    x = (torch.randn(64, 64) * 0.1).to(torch.bfloat16)
    with CheckpointWriter(tmp_path / "out") as writer:
        meta = dfloat.write_coded(writer, "w", x)
        assert dfloat.write_coded(writer, "f", torch.ones(4)) is None      # not bf16: stored as is
        assert dfloat.write_coded(writer, "s", torch.ones(2, dtype=torch.bfloat16)) is None   # does not pay
        writer.commit(None, {"lossless": dfloat.lossless_block({"w": meta})})
    ckpt = Checkpoint(tmp_path / "out")
    assert sorted(ckpt.keys()) == ["f", "s", "w"] and "w" in ckpt
    assert same_bits(ckpt.get("w"), x) and ckpt.numel("w") == 64 * 64 and ckpt.nbytes("w") == 2 * 64 * 64
    assert verify(tmp_path / "out") == []


def test_coded_writer_checks_batches_and_keeps_the_order(monkeypatch, tmp_path):
    monkeypatch.setattr(parts, "BATCH_VALUES", 5000)           # a check every two or three tensors
    g = torch.Generator().manual_seed(1)
    tensors = {f"t{i}": (torch.randn(40, 60 + i, generator=g) * 0.02).to(torch.bfloat16) for i in range(7)}
    tensors["ids"] = torch.arange(5)
    checked = []
    decode_many = parts.decode_many
    monkeypatch.setattr(parts, "decode_many",
                        lambda c, names, **kw: checked.append(names) or decode_many(c, names, **kw))
    with CheckpointWriter(tmp_path / "out") as writer:
        coder = dfloat.CodedWriter(writer)
        for name, x in tensors.items():
            coder.add(name, x)
        coder.flush()
        writer.commit(None, {"lossless": dfloat.lossless_block(coder.coded)})
    assert len(checked) >= 3 and list(itertools.chain.from_iterable(checked)) == [f"t{i}" for i in range(7)]
    ckpt = Checkpoint(tmp_path / "out")
    assert sorted(ckpt.keys()) == sorted(tensors) and all(same_bits(ckpt.get(k), v) for k, v in tensors.items())
    blob = (tmp_path / "out" / "model.safetensors").read_bytes()
    header = json.loads(blob[8: 8 + struct.unpack("<Q", blob[:8])[0]])
    layout = sorted((v["data_offsets"][0], k) for k, v in header.items() if k != "__metadata__")
    assert [k for _, k in layout] == [f"t{i}{dfloat.PART}" for i in range(7)] + ["ids"]   # the order added


def test_coded_writer_refuses_a_round_trip_that_differs(monkeypatch, tmp_path):
    monkeypatch.setattr(parts, "decode_many", lambda c, names, **kw: [torch.zeros(x.shape, dtype=torch.bfloat16)
                                                                      for x in c])
    with CheckpointWriter(tmp_path / "out") as writer:
        coder = dfloat.CodedWriter(writer)
        coder.add("w", (torch.randn(64, 64) * 0.1).to(torch.bfloat16))
        with pytest.raises(RuntimeError, match="w: lossless round trip failed"):
            coder.flush()
    assert not (tmp_path / "out").exists()


def test_compress_decompress_folder_bit_for_bit(source, tmp_path):
    folder, tensors = source
    s = dfloat.compress_checkpoint(folder, tmp_path / "z", window_bits=64)
    assert s["coded"] == 2 and s["output_bytes"] < s["source_bytes"]
    z = Checkpoint(tmp_path / "z")
    assert sorted(z.keys()) == sorted(tensors) and set(z.coded) == {"embed.weight", "norm.weight"}
    assert all(same_bits(z.get(k), v) for k, v in tensors.items())
    assert z.config["hidden_size"] == 64 and z.config["quantization_config"]["lossless"]["codec"] == dfloat.CODEC
    assert (tmp_path / "z" / "tokenizer.json").exists() and verify(tmp_path / "z") == []
    assert dfloat.decompress_checkpoint(tmp_path / "z", tmp_path / "d")["identical_files"]
    back = load_file(str(tmp_path / "d" / "model.safetensors"))
    assert sorted(back) == sorted(tensors) and all(same_bits(back[k], v) for k, v in tensors.items())
    assert same_files(folder, tmp_path / "d")


def same_files(a: Path, b: Path) -> bool:
    """The same files with the same bytes, but for the manifest bitsmith adds."""
    def files(folder):
        return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
                and p.name != MANIFEST}
    return files(a) == files(b)


def test_sharded_folder_with_metadata_and_subfolders_comes_back_byte_for_byte(tmp_path):
    g = torch.Generator().manual_seed(2)
    folder = tmp_path / "src"
    (folder / "1_Pooling").mkdir(parents=True)
    shards = {"model-00001-of-00002.safetensors": {"z.weight": (torch.randn(40, 30, generator=g) * 0.02).bfloat16(),
                                                    "a.bias": torch.randn(30, generator=g)},
              "model-00002-of-00002.safetensors": {"m.weight": (torch.randn(50, 20, generator=g) * 0.1).bfloat16()}}
    for name, tensors in shards.items():
        save_file(tensors, str(folder / name), metadata={"format": "pt", "note": name})
    index = {"metadata": {"total_size": 9000}, "weight_map": {k: n for n, t in shards.items() for k in t}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))
    (folder / "config.json").write_bytes(b'{"model_type": "toy",\r\n   "hidden_size": 64}')   # not our formatting
    (folder / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    dfloat.compress_checkpoint(folder, tmp_path / "z")
    assert len(Checkpoint(tmp_path / "z").coded) == 2 and verify(tmp_path / "z") == []
    assert dfloat.decompress_checkpoint(tmp_path / "z", tmp_path / "d")["identical_files"]
    assert same_files(folder, tmp_path / "d")


def test_decompress_that_would_not_restore_the_files_exactly_publishes_nothing(source, tmp_path):
    folder, _ = source
    dfloat.compress_checkpoint(folder, tmp_path / "z")
    manifest = json.loads((tmp_path / "z" / MANIFEST).read_text())
    manifest["source_files"]["files"]["model.safetensors"]["sha256"] = "0" * 64
    (tmp_path / "z" / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="source_files: model.safetensors would not come back byte for byte"):
        dfloat.decompress_checkpoint(tmp_path / "z", tmp_path / "d")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src", "z"]


def test_get_many_reads_in_the_order_asked_and_decodes_in_batches(monkeypatch, source, tmp_path):
    folder, tensors = source
    dfloat.compress_checkpoint(folder, tmp_path / "z", window_bits=64)
    z = Checkpoint(tmp_path / "z")
    calls = []
    decode_many = dfloat.decode_many
    monkeypatch.setattr(dfloat, "decode_many", lambda c, names: calls.append(names) or decode_many(c, names))
    monkeypatch.setattr(dfloat, "BATCH_VALUES", 64)              # every coded tensor fills a batch
    order = ["tiny.bias", "norm.weight", "position_ids", "embed.weight", "fp32.weight"]
    got = list(z.get_many(order))
    assert [name for name, _ in got] == order and all(same_bits(t, tensors[name]) for name, t in got)
    assert [names for names in calls if names] == [["norm.weight"], ["embed.weight"]]


def test_folder_without_config_gets_no_config(source, tmp_path):
    folder, tensors = source
    (folder / "config.json").unlink()
    dfloat.compress_checkpoint(folder, tmp_path / "z")
    assert not (tmp_path / "z" / "config.json").exists()
    assert same_bits(Checkpoint(tmp_path / "z").get("embed.weight"), tensors["embed.weight"])


def test_verify_catches_a_coded_tensor_that_no_longer_decodes_to_its_source(source, tmp_path):
    folder, _ = source
    dfloat.compress_checkpoint(folder, tmp_path / "z")
    out = tmp_path / "z"
    stored = load_file(str(out / "model.safetensors"))
    blob = stored["embed.weight" + dfloat.PART].clone()
    blob[-100] ^= 1                                    # a sign/mantissa byte: decodes, but to other values
    stored["embed.weight" + dfloat.PART] = blob
    save_file(stored, str(out / "model.safetensors"))
    assert any("sha256 mismatch" in p for p in verify(out))          # the file hash sees it first
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["files"]["model.safetensors"] = sha256_file(out / "model.safetensors")
    (out / MANIFEST).write_text(json.dumps(manifest))
    problems = verify(out)
    assert len(problems) == 1 and "embed.weight" in problems[0] and "sha256" in problems[0]
    with pytest.raises(InputError, match="embed.weight"):
        Checkpoint(out).get("embed.weight")
    with pytest.raises(InputError, match="embed.weight"):
        dfloat.decompress_checkpoint(out, tmp_path / "d")
    assert not (tmp_path / "d").exists()


def test_compress_refuses_a_coded_folder_and_unknown_codecs(source, tmp_path):
    folder, _ = source
    dfloat.compress_checkpoint(folder, tmp_path / "z")
    with pytest.raises(InputError, match="already"):
        dfloat.compress_checkpoint(tmp_path / "z", tmp_path / "zz")
    manifest = json.loads((tmp_path / "z" / MANIFEST).read_text())
    manifest["lossless"]["codec"] = "other"
    (tmp_path / "z" / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="unsupported lossless codec"):
        Checkpoint(tmp_path / "z")


def test_stories260k_in_bf16_compresses_and_restores(stories_path, tmp_path):
    folder = tmp_path / "bf16"
    folder.mkdir()
    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(str(stories_path / "model.safetensors")).items()}
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_bytes((stories_path / "config.json").read_bytes())
    s = dfloat.compress_checkpoint(folder, tmp_path / "z")
    assert s["output_bytes"] / s["source_bytes"] < 0.70
    z = Checkpoint(tmp_path / "z")
    assert all(same_bits(z.get(k), v) for k, v in tensors.items())

import json
import struct

import pytest
import torch
from safetensors.torch import load_file

from bitsmith.formats.checkpoint import MANIFEST, SAFETENSORS_DTYPES, Checkpoint, CheckpointWriter, verify
from bitsmith.formats.errors import InputError


def sample_tensors():
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(7, 5, generator=g).to(torch.bfloat16),
            "a.qweight": torch.randint(-2**31, 2**31 - 1, (4, 3), dtype=torch.int32, generator=g),
            "scalar": torch.tensor(3.5), "empty": torch.zeros(0, 4, dtype=torch.float16),
            "b.scales": torch.rand(2, 9, generator=g).half(), "mask": torch.tensor([True, False])}


@pytest.mark.parametrize("shard_bytes", [1 << 30, 64])
def test_written_shards_are_valid_safetensors(tmp_path, shard_bytes):
    tensors = sample_tensors()
    with CheckpointWriter(tmp_path / "out", shard_bytes=shard_bytes) as w:
        for k, v in tensors.items():
            w.add(k, v)
        w.commit({"model_type": "llama"}, {"note": "test"})
    out = tmp_path / "out"
    sharded = (out / "model.safetensors.index.json").exists()
    assert sharded == (shard_bytes == 64)
    loaded = {}
    for f in out.glob("*.safetensors"):
        loaded.update(load_file(str(f)))
    assert loaded.keys() == tensors.keys()
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v)
    ckpt = Checkpoint(out)
    assert sorted(ckpt.keys()) == sorted(tensors) and torch.equal(ckpt.get("a.weight"), tensors["a.weight"])
    assert json.loads((out / MANIFEST).read_text())["note"] == "test"
    assert verify(out) == [] and not list(tmp_path.glob(".*"))


@pytest.mark.parametrize("shard_bytes", [1 << 30, 64])
def test_planned_layout_writes_the_same_files_without_a_spool(tmp_path, shard_bytes):
    tensors = sample_tensors()
    for name, planned in (("spooled", False), ("planned", True)):
        with CheckpointWriter(tmp_path / name, shard_bytes=shard_bytes) as w:
            if planned:
                w.plan([(k, SAFETENSORS_DTYPES[v.dtype], list(v.shape)) for k, v in tensors.items()])
            for k, v in tensors.items():
                w.add(k, v)
                assert not (w.tmp / ".spool").exists() or not planned
            w.commit(None, {})
    manifests = [json.loads((tmp_path / name / MANIFEST).read_text())["files"] for name in ("spooled", "planned")]
    assert manifests[0] == manifests[1] and len(manifests[0]) == (1 if shard_bytes > 64 else 4)   # 3 shards + index
    assert verify(tmp_path / "planned") == []


def test_planned_layout_refuses_other_tensors_and_missing_ones(tmp_path):
    x = torch.ones(3)
    with CheckpointWriter(tmp_path / "out") as w:
        w.plan([("x", "F32", [3]), ("y", "F32", [3])])
        for name, t in (("y", x), ("x", x.half()), ("x", torch.ones(4))):
            with pytest.raises(ValueError, match="not the next one planned"):
                w.add(name, t)
        w.add("x", x)
        with pytest.raises(ValueError, match="1 planned tensors never added, y first"):
            w.commit(None, {})
        w.abort()
    assert list(tmp_path.iterdir()) == []
    with CheckpointWriter(tmp_path / "out") as w:
        w.add("x", x)
        with pytest.raises(ValueError, match="before the first add"):
            w.plan([("x", "F32", [3])])
        w.abort()


def test_planned_layout_with_given_headers_is_written_as_given(tmp_path):
    x = torch.arange(6, dtype=torch.int16)
    head = json.dumps({"x": {"dtype": "I16", "shape": [6], "data_offsets": [0, 12]}, "__metadata__": {"k": "v"}})
    head = head.encode() + b" " * 9                                      # any padding a source had
    empty = b'{"__metadata__":{"format":"pt"}}'
    layout = {"a.safetensors": (struct.pack("<Q", len(head)) + head, ["x"]),
              "b.safetensors": (struct.pack("<Q", len(empty)) + empty, [])}
    with CheckpointWriter(tmp_path / "bad") as w:
        with pytest.raises(ValueError, match="layout must hold the planned tensors"):
            w.plan([("x", "I16", [6]), ("y", "I16", [1])], layout)
        w.abort()
    with CheckpointWriter(tmp_path / "out") as w:
        w.plan([("x", "I16", [6])], layout)
        w.add("x", x)
        w.commit(None, {})
    out = tmp_path / "out"
    assert (out / "a.safetensors").read_bytes() == layout["a.safetensors"][0] + x.numpy().tobytes()
    assert (out / "b.safetensors").read_bytes() == layout["b.safetensors"][0]
    assert not (out / "model.safetensors.index.json").exists() and verify(out) == []


def test_failure_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), CheckpointWriter(tmp_path / "out") as w:
        w.add("x", torch.ones(3))
        raise RuntimeError("killed halfway")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(InputError, match="already exists"):
        CheckpointWriter(tmp_path / "out")
    with CheckpointWriter(tmp_path / "out", overwrite=True) as w:
        w.add("x", torch.ones(3))
        w.commit(None, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_same_tensor_twice_is_refused(tmp_path):
    with CheckpointWriter(tmp_path / "out") as w:
        w.add("x", torch.ones(1))
        with pytest.raises(ValueError, match="twice"):
            w.add("x", torch.ones(1))
        w.abort()


def test_missing_parent_folders_are_created(tmp_path):
    with CheckpointWriter(tmp_path / "a" / "b" / "out") as w:
        w.add("x", torch.ones(2))
        w.commit(None, {})
    assert (tmp_path / "a" / "b" / "out" / "model.safetensors").exists()

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tests_support import needs_smollm2

from bitsmith.formats.errors import InputError
from bitsmith.formats.source import GGUFSource, open_source


def sharded_copy(src, dst, dtype):
    """The same model as fp16/bf16 safetensors in two shards with an index."""
    dst.mkdir()
    tensors = {k: v.to(dtype) for k, v in load_file(src / "model.safetensors").items()}
    names = sorted(tensors)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        shard = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, str(dst / shard))
        weight_map.update({n: shard for n in part})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (dst / f).write_bytes((src / f).read_bytes())
    return tensors


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sharded_folder_reads_every_tensor(tmp_path, stories_path, dtype):
    tensors = sharded_copy(stories_path, tmp_path / "m", dtype)
    source = open_source(str(tmp_path / "m"))
    assert sorted(source.keys()) == sorted(tensors)
    for name, t in tensors.items():
        got = source.get(name)
        assert got.dtype == dtype and torch.equal(got, t)
        assert source.numel(name) == t.numel()


def test_fp32_folder_keeps_its_dtype(stories_path):
    source = open_source(str(stories_path))
    assert source.get("model.layers.0.self_attn.q_proj.weight").dtype == torch.float32


@pytest.mark.parametrize("spec,message", [("no/such/model", "no such file"), ("weights.pt", "pickle")])
def test_bad_specs(tmp_path, spec, message):
    if spec.endswith(".pt"):
        (tmp_path / spec).write_bytes(b"\x80\x04not really")
        spec = str(tmp_path / spec)
    with pytest.raises(InputError, match=message):
        open_source(spec)


@needs_smollm2
def test_bundled_gguf_maps_every_tensor_to_hf_names():
    source = open_source("smollm2-135m")
    assert isinstance(source, GGUFSource)
    assert source.config["num_hidden_layers"] == 30 and source.config["tie_word_embeddings"]
    assert len(source.keys()) == 2 + 30 * 9
    q = source.get("model.layers.0.self_attn.q_proj.weight")
    assert q.shape == (576, 576) and q.dtype == torch.bfloat16
    assert source.get("model.embed_tokens.weight").shape == (49152, 576)

"""GPTQ v1 / v2 checkpoints (bitsmith/gptq_formats.py): `export --format gptq-v2` loads to its source's logits and
converts back to the source's tensors byte for byte; a v2 folder written as GPTQModel writes them (no bitsmith
manifest) reads its true zero points exactly, a zero of 0 included, which v1 output refuses; compressed-tensors
imports export to GPTQ; other layouts, W4A8 and unquantized folders are refused before anything is written."""
import json
import shutil

import pytest
import torch
from hostile_support import refused, run
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import bitsmith
from bitsmith.formats.errors import InputError
from bitsmith.formats.packing import pack, packed_length, unpack
from bitsmith.gptq_formats import shift_zeros

CALIB = ["--nsamples", "16", "--seqlen", "128", "--seed", "0"]
IDS = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(1))


@given(bits=st.sampled_from([2, 3, 4, 8]), groups=st.integers(1, 4), out=st.integers(1, 70), seed=st.integers(0, 99))
def test_zero_shifts_move_each_field_alone(bits, groups, out, seed):
    """+1 / -1 modulo 2^bits per packed field, with no carry into the next one (GPTQModel's word-wide add has one)."""
    zeros = torch.randint(0, 1 << bits, (groups, out), generator=torch.Generator().manual_seed(seed))
    packed = pack(zeros, bits, dim=1)
    up = shift_zeros(packed, bits, [1, out], 1, "t")
    assert torch.equal(unpack(up, bits, out, dim=1).long(), (zeros + 1) % (1 << bits))
    assert torch.equal(shift_zeros(up, bits, [1, out], -1, "t"), packed)


def test_a_qzeros_or_qweight_of_the_wrong_shape_is_refused():
    with pytest.raises(InputError, match=r"does not fit 10 outputs at 4 bits \(int32 \[groups, 2\]\)"):
        shift_zeros(torch.zeros(3, 3, dtype=torch.int32), 4, [2, 10], 1, "m.qzeros")
    with pytest.raises(InputError, match=r"m.qzeros: qweight of shape \[20\] \(a GPTQ qweight is"):
        shift_zeros(torch.zeros(3, 2, dtype=torch.int32), 4, [20], 1, "m.qzeros")
    assert packed_length(10, 4) == 2


def logits(folder) -> torch.Tensor:
    with torch.no_grad():
        return bitsmith.load(str(folder))(IDS).logits


@pytest.fixture(scope="module")
def w4(tmp_path_factory, stories_path, stories_split):
    out = tmp_path_factory.mktemp("q") / "w4"
    r = run("quantize", stories_path, "-o", out, "--bits", "4", "--group-size", "32", "--calib", stories_split[0],
            *CALIB)
    assert r.exit_code == 0, r.output
    return out


def test_v2_export_loads_to_the_same_logits_and_converts_back_byte_for_byte(w4, tmp_path):
    r = run("export", w4, "-o", tmp_path / "v2", "--format", "gptq-v2", "--json", "-")
    assert r.exit_code == 0, r.output and json.loads(r.stdout)["linears"] == 35
    qc = json.loads((tmp_path / "v2" / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["checkpoint_format"]) == ("gptq", "gptq_v2") and "lossless" not in qc
    source, v2 = load_file(str(w4 / "model.safetensors")), load_file(str(tmp_path / "v2" / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj"
    true = (unpack(source[f"{name}.qzeros"], 4, 64, dim=1).long() + 1) % 16     # v1 stores zero - 1
    assert torch.equal(unpack(v2[f"{name}.qzeros"], 4, 64, dim=1).long(), true)  # v2 stores the zero itself
    assert torch.equal(logits(tmp_path / "v2"), logits(w4))
    assert run("export", tmp_path / "v2", "-o", tmp_path / "v1", "--format", "gptq").exit_code == 0
    back = load_file(str(tmp_path / "v1" / "model.safetensors"))
    assert sorted(back) == sorted(source) and all(torch.equal(back[k], source[k]) for k in source)


def foreign_v2(w4, folder, edit=None):
    """A v2 folder as GPTQModel writes one: config.json, model.safetensors, tokenizer files; no bitsmith manifest."""
    folder.mkdir()
    tensors = load_file(str(w4 / "model.safetensors"))
    for name in [k for k in tensors if k.endswith(".qzeros")]:
        tensors[name] = shift_zeros(tensors[name], 4, list(tensors[name[:-6] + "qweight"].shape), 1, name)
    if edit:
        edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"))
    config = json.loads((w4 / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "checkpoint_format": "gptq_v2", "bits": 4,
                                     "group_size": 32, "sym": False, "desc_act": True}
    (folder / "config.json").write_text(json.dumps(config))
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(w4 / f, folder / f)
    return folder


def test_a_foreign_v2_folder_reads_its_true_zeros_a_zero_of_0_included(w4, tmp_path):
    name = "model.layers.1.self_attn.o_proj"

    def zero_to_0(tensors):        # the first group's zero points of every output: 0, a value v1 cannot store
        zeros = unpack(tensors[f"{name}.qzeros"], 4, 64, dim=1).long()
        zeros[0] = 0
        tensors[f"{name}.qzeros"] = pack(zeros, 4, dim=1)

    plain = foreign_v2(w4, tmp_path / "plain")
    assert torch.equal(logits(plain), logits(w4))
    zeroed = foreign_v2(w4, tmp_path / "zeroed", zero_to_0)
    source = load_file(str(w4 / "model.safetensors"))
    codes = unpack(source[f"{name}.qweight"], 4, 64, dim=0).long().t()          # [out, in]
    g_idx = source[f"{name}.g_idx"].long()
    module = bitsmith.load(str(zeroed)).get_submodule(name)
    weight = module.dequantize() if hasattr(module, "dequantize") else module.weight
    first = g_idx == 0
    expected = source[f"{name}.scales"][0].float()[:, None] * codes[:, first].float()    # scale * (q - 0)
    assert torch.equal(weight.float()[:, first], expected)
    refused(run("export", zeroed, "-o", tmp_path / "v1", "--format", "gptq"),
            f"error: {zeroed}: {name} has a zero point of 0, which GPTQ v1 cannot store so that every reader agrees "
            "(GPTQModel and vLLM read it differently); export --format gptq-v2")
    assert not (tmp_path / "v1").exists()
    assert run("export", zeroed, "-o", tmp_path / "v2", "--format", "gptq-v2").exit_code == 0
    assert torch.equal(logits(tmp_path / "v2"), logits(zeroed))


def test_a_compressed_tensors_import_exports_to_gptq(stories_path, stories_split, tmp_path):
    w4 = tmp_path / "w4"    # contiguous groups dividing 64 and 172: what compressed-tensors holds
    assert run("quantize", stories_path, "-o", w4, "--bits", "4", "--group-size", "4", "--static-groups",
               "--calib", stories_split[0], *CALIB).exit_code == 0
    assert run("export", w4, "-o", tmp_path / "ct", "--format", "compressed-tensors").exit_code == 0
    assert run("export", tmp_path / "ct", "-o", tmp_path / "g", "--format", "gptq").exit_code == 0
    qc = json.loads((tmp_path / "g" / "config.json").read_text())["quantization_config"]
    assert qc["checkpoint_format"] == "gptq" and "imported_from" not in qc
    assert torch.equal(logits(tmp_path / "g"), logits(w4))


def test_what_gptq_cannot_hold_is_refused_before_writing(w4, stories_path, stories_split, tmp_path):
    refused(run("export", stories_path, "-o", tmp_path / "o", "--format", "gptq"),
            f"error: {stories_path}: not a quantized checkpoint (no GPTQ quantization_config)")
    lut = tmp_path / "lut"
    names = [k[:-len(".qweight")] for k in load_file(str(w4 / "model.safetensors")) if k.endswith(".qweight")]
    (tmp_path / "plan.json").write_text(json.dumps({"layers": {n: {"bits": 3, "group_size": -1, "sym": False,
                                                                   "lut": "down_proj" in n} for n in names}}))
    assert run("quantize", stories_path, "-o", lut, "--plan", tmp_path / "plan.json", "--calib", stories_split[0],
               *CALIB).exit_code == 0
    r = run("export", lut, "-o", tmp_path / "o", "--format", "gptq-v2")
    refused(r, "error: model.layers.0.mlp.down_proj: its layout (w3lut) has no GPTQ form: only uniform grids of "
               "2, 3, 4, 8 bits with groups along the input export")
    w5 = tmp_path / "w5"
    assert run("quantize", stories_path, "-o", w5, "--bits", "5", "--group-size", "4", "--static-groups",
               "--calib", stories_split[0], *CALIB).exit_code == 0
    assert json.loads((w5 / "config.json").read_text())["quantization_config"]["quant_method"] == "bitsmith"
    for fmt, name in (("gptq", "GPTQ"), ("compressed-tensors", "compressed-tensors")):
        refused(run("export", w5, "-o", tmp_path / "o", "--format", fmt),
                f"error: model.layers.0.mlp.down_proj: its layout (w5g4) has no {name} form: only uniform grids of "
                "2, 3, 4, 8 bits with groups along the input export")
    broken = foreign_v2(w4, tmp_path / "broken", lambda t: t.update(
        {"model.layers.0.mlp.up_proj.qzeros": torch.zeros(2, 3, dtype=torch.int32)}))
    r = run("eval", broken, "--data", stories_split[1], "--seqlen", "64", "--max-tokens", "128")
    refused(r, f"error: {broken}: model.layers.0.mlp.up_proj.qzeros: qzeros (2, 3) torch.int32 does not fit 172 "
               "outputs at 4 bits (int32 [groups, 22])")
    assert not (tmp_path / "o").exists()

"""compressed-tensors pack-quantized (bitsmith/pack_quantized.py). `bitsmith export --format compressed-tensors`,
read back by the real library: its decompressor gives bitsmith's weights exactly (in the scales' fp16), and
transformers loads a symmetric export to the same logits as `bitsmith.load`; what the format cannot hold is
refused in one line, before anything is written. Read by bitsmith: an export loads to the logits of its source,
and a folder the library itself compressed (as llm-compressor writes them) loads to the library's weights."""
import json

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationScheme
from hostile_support import refused, run, tree
from safetensors.torch import load_file

import bitsmith
from bitsmith.calibration.adapter import BlockRunner
from bitsmith.formats.source import open_source
from bitsmith.pipeline import linear_shapes

CALIB = ["--nsamples", "16", "--seqlen", "128", "--seed", "0"]


def quantize(tmp_path_factory, stories_path, stories_split, *options) -> str:
    out = tmp_path_factory.mktemp("q") / "out"
    r = run("quantize", stories_path, "-o", out, "--calib", stories_split[0], *CALIB, *options)
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, stories_path):
    """A plan with every strategy the format has: asymmetric 2, 3, 4 bits in groups of 4 (4 divides 64 and
    172), 8 bits symmetric, and one grid per row at 3 bits."""
    names = list(linear_shapes(BlockRunner(open_source(str(stories_path)).config)))
    configs = [(4, 4, False), (3, 4, False), (2, 4, False), (8, 4, True), (3, -1, False)]
    plan = {"layers": {n: dict(zip(("bits", "group_size", "sym"), configs[i % len(configs)]))
                       for i, n in enumerate(names)}}
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    path.write_text(json.dumps(plan))
    return path


@pytest.fixture(scope="module")
def asym_export(tmp_path_factory, stories_path, stories_split, mixed):
    src = quantize(tmp_path_factory, stories_path, stories_split, "--plan", mixed, "--static-groups")
    out = tmp_path_factory.mktemp("ct") / "out"
    r = run("export", src, "-o", out, "--format", "compressed-tensors", "--json", "-")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["linears"] == 35 and json.loads(r.stdout)["configurations"] == 5
    return src, out


@pytest.mark.slow
def test_the_decompressed_weights_are_bitsmiths(asym_export):
    src, out = asym_export
    reference = bitsmith.load(str(src), dequantized=True)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["format"]) == ("compressed-tensors", "pack-quantized")
    tensors = load_file(str(out / "model.safetensors"))
    seen = set()
    for group in qc["config_groups"].values():
        scheme = QuantizationScheme(targets=group["targets"], weights=group["weights"])
        for target in group["targets"]:
            name = target[len("re:^"):-1].replace("\\", "")
            state = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
            assert ("weight_zero_point" in state) == (not group["weights"]["symmetric"])
            W = PackedQuantizationCompressor.decompress(state, scheme)["weight"]
            assert W.dtype == torch.float16                          # the format dequantizes in the scales' dtype
            assert torch.equal(W, reference.get_submodule(name).dequantize().half())
            seen.add(name)
    assert len(seen) == 35 and not any(k.endswith((".qweight", ".qzeros", ".g_idx")) for k in tensors)
    strategies = {(g["weights"]["num_bits"], g["weights"]["strategy"]) for g in qc["config_groups"].values()}
    assert strategies == {(4, "group"), (3, "group"), (2, "group"), (8, "group"), (3, "channel")}


@pytest.mark.slow
def test_transformers_loads_a_symmetric_export_to_the_same_logits(tmp_path_factory, stories_path, stories_split):
    from transformers import AutoModelForCausalLM
    src = quantize(tmp_path_factory, stories_path, stories_split, "--bits", "4", "--group-size", "4", "--sym",
                   "--static-groups")
    out = tmp_path_factory.mktemp("ct") / "sym"
    assert run("export", src, "-o", out, "--format", "compressed-tensors").exit_code == 0
    loaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    reference = bitsmith.load(str(src), dequantized=True)
    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, reference(ids).logits, atol=1e-5, rtol=0)


ACT_ORDER = ("model.layers.0.mlp.down_proj: its groups are not contiguous runs of inputs (act-order), which "
             "compressed-tensors cannot store; quantize with --static-groups (or without act-order) to export")
PARTIAL = ("model.layers.0.mlp.down_proj: groups of 32 do not divide its 172 inputs (a partial last group), which "
           "compressed-tensors cannot store")


@pytest.mark.parametrize("options, message", [(["--bits", "4", "--group-size", "4"], ACT_ORDER),
                                              (["--bits", "4", "--group-size", "32", "--no-act-order"], PARTIAL)])
def test_what_the_format_cannot_hold_is_refused_before_writing(tmp_path_factory, stories_path, stories_split,
                                                               tmp_path, options, message):
    src = quantize(tmp_path_factory, stories_path, stories_split, *options)
    refused(run("export", src, "-o", tmp_path / "ct", "--format", "compressed-tensors"), f"error: {message}")
    assert tree(tmp_path) == {}


def test_other_layouts_and_unquantized_folders_are_refused(tmp_path_factory, stories_path, stories_split, tmp_path):
    names = list(linear_shapes(BlockRunner(open_source(str(stories_path)).config)))
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"layers": {n: {"bits": 3, "group_size": 4, "sym": False, "per_ic": "q_proj" in n}
                                           for n in names}}))
    src = quantize(tmp_path_factory, stories_path, stories_split, "--plan", plan, "--no-act-order")
    refused(run("export", src, "-o", tmp_path / "ct", "--format", "compressed-tensors"),
            "error: model.layers.0.self_attn.q_proj: its layout (w3ic4) has no compressed-tensors form: only uniform "
            "grids of 2, 3, 4, 8 bits with groups along the input export")
    refused(run("export", stories_path, "-o", tmp_path / "ct", "--format", "compressed-tensors"),
            f"error: {stories_path}: not a quantized checkpoint (no GPTQ quantization_config)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]


@pytest.mark.slow
def test_an_export_loads_back_to_the_logits_of_its_source(asym_export):
    src, out = asym_export
    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        original = bitsmith.load(str(src), dequantized=True)(ids).logits
        assert torch.equal(bitsmith.load(str(out), dequantized=True)(ids).logits, original)


@pytest.mark.slow
def test_a_folder_the_library_compressed_loads_to_its_weights(tmp_path, stories_path):
    """Every linear of stories260K quantized by hand (4 bits, groups of 4, asymmetric, bf16 scales: zero points
    of 0 included), compressed by compressed-tensors itself, config groups targeting "Linear" as llm-compressor
    writes them; bitsmith reads every weight as the library decompresses it."""
    import shutil

    from safetensors.torch import save_file
    source = load_file(str(stories_path / "model.safetensors"))
    weights = {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 4}
    scheme = QuantizationScheme(targets=["Linear"], weights=weights)
    tensors, expected, lowest = {}, {}, 0
    for key, W in source.items():
        name = key[:-len(".weight")]
        if not (key.endswith("_proj.weight") and ".layers." in key):
            tensors[key] = W
            continue
        groups = W.float().unflatten(1, (-1, 4))
        lo, hi = groups.amin(-1).clamp(max=0), groups.amax(-1).clamp(min=0)
        scale = ((hi - lo) / 15).clamp(min=1e-4).to(torch.bfloat16)
        zero = (torch.round(-lo / scale.float()) - 8).clamp(-8, 7).to(torch.int8)
        lowest += int((zero == -8).sum())
        state = PackedQuantizationCompressor.compress({"weight": W.float(), "weight_scale": scale,
                                                       "weight_zero_point": zero}, scheme)
        tensors.update({f"{name}.{k}": v for k, v in state.items()})
        exact = {**state, "weight_scale": state["weight_scale"].float()}
        expected[name] = PackedQuantizationCompressor.decompress(exact, scheme)["weight"]
    folder = tmp_path / "ct"
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"))
    for f in stories_path.iterdir():
        if f.name not in ("model.safetensors", "config.json"):
            shutil.copy(f, folder / f.name)
    config = json.loads((stories_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "compressed-tensors", "format": "pack-quantized",
                                     "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}},
                                     "ignore": ["lm_head"], "quantization_status": "compressed"}
    (folder / "config.json").write_text(json.dumps(config))
    model = bitsmith.load(str(folder))
    assert len(expected) == 35 and lowest > 0          # zero points at the bottom of the range: unsigned 0
    for name, W in expected.items():
        assert torch.equal(model.get_submodule(name).dequantize(), W), name


@pytest.mark.parametrize("change, message", [
    (lambda t, n: t.__setitem__(f"{n}.weight_shape", torch.tensor([64, 10 ** 9])),
     "weight_packed torch.int32 [64, 8] does not hold weight_shape [64, 1000000000] at 4 bits"),
    (lambda t, n: t.pop(f"{n}.weight_zero_point"), "asymmetric, so a weight_zero_point int32 [8, 16] is needed"),
    (lambda t, n: t.__setitem__(f"{n}.weight_shape", torch.tensor([64.0, 64.0])),
     "weight_shape [64.0, 64.0] is not the [out, in] of a matrix"),
])
def test_a_damaged_folder_is_refused_in_one_line(asym_export, tmp_path, change, message):
    """Sizes are checked against the tensors before anything is unpacked: a forged weight_shape allocates
    nothing."""
    import shutil

    from safetensors.torch import save_file
    _, out = asym_export
    folder = tmp_path / "damaged"
    shutil.copytree(out, folder)
    (folder / "bitsmith_manifest.json").unlink()                  # as a folder from another tool: no manifest
    tensors = load_file(str(folder / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj"                       # 4 bits, groups of 4, asymmetric
    change(tensors, name)
    save_file(tensors, str(folder / "model.safetensors"))
    refused(run("eval", folder, "--data", folder / "config.json"), f"error: {name}: {message}")

"""bitsmith's GPTQ checkpoints as GPTQModel reads them.

The tensors (no other library needed): every linear has g_idx, every stored zero point field is below maxq (a
v1 zero - 1 that never wraps) and the config says who wrote the checkpoint and in which convention.

GPTQModel itself (`gptqmodel_reader.py`, run where gptqmodel imports: this interpreter, or the one the environment
variable BITSMITH_GPTQMODEL_PYTHON names, since GPTQModel pins its own torch and transformers and lives best in
a venv of its own; skipped otherwise): stories260K quantized by bitsmith and loaded with `GPTQModel.load` on CPU
with its torch kernel gives every quantized linear exactly bitsmith's weight rounded to fp16 (what GPTQModel
computes in), and logits within float16 compute of bitsmith's. Its intermediate size of 172 is not a multiple of
32, so the packed shapes are checked where GPTQModel pads differently from whole runs of 32 codes. GPTQModel reads
3-bit tensors only in whole runs of 32 codes (3 words, models/loader.py: "3-bit GPTQ qzeros expects columns
divisible by 3"), so the 3-bit case keeps the MLP (172) at 4 bits through a plan, which also exercises `dynamic`.

    BITSMITH_GPTQMODEL_PYTHON=/path/to/venv/bin/python pytest tests/test_interop_gptqmodel.py -m slow
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import bitsmith
from bitsmith.formats.packing import unpack
from bitsmith.kernels.linear import QuantizedLinear

READER = Path(__file__).with_name("gptqmodel_reader.py")
CALIB = {"nsamples": 16, "seqlen": 128}
IDS = torch.tensor([[1, 45, 100, 300, 7, 12, 511, 256, 3, 90, 17, 400]])
LOGIT_TOLERANCE = 0.3       # |logit| up to ~17; float16 compute alone moves them by ~0.1 (bitsmith fp16 vs fp32)


def reader_python() -> str:
    if importlib.util.find_spec("gptqmodel") is not None:
        return sys.executable
    python = os.environ.get("BITSMITH_GPTQMODEL_PYTHON")
    if python and subprocess.run([python, "-c", "import gptqmodel"], capture_output=True, check=False).returncode == 0:
        return python
    pytest.skip("gptqmodel is not importable here (set BITSMITH_GPTQMODEL_PYTHON to a Python that imports it)")


def stored_tensors(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def test_what_is_written_for_gptq_readers(tmp_path, stories_path, text_dir):
    """RTN at 2 bits (rows whose zero point would be 0 occur on stories260K there): g_idx for every linear, no
    stored zero field at maxq, packed shapes of ceil(n * bits / 32) words, the writer named as itself."""
    out = tmp_path / "w2"
    bitsmith.quantize(str(stories_path), str(out), method="rtn", bits=2, group_size=32, progress=False)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["checkpoint_format"], qc["sym"]) == ("gptq", "gptq", False)
    assert qc["meta"]["quantizer"] == [f"bitsmith:{bitsmith.__version__}"]
    tensors = stored_tensors(out)
    linears = [name[:-len(".qweight")] for name in tensors if name.endswith(".qweight")]
    assert len(linears) == 35
    for name in linears:
        out_f, groups = tensors[f"{name}.scales"].shape[1], tensors[f"{name}.scales"].shape[0]
        in_f = tensors[f"{name}.g_idx"].numel()
        assert torch.equal(tensors[f"{name}.g_idx"], torch.arange(in_f, dtype=torch.int32) // 32)
        assert tensors[f"{name}.qweight"].shape == (-(-in_f * 2 // 32), out_f)
        assert tensors[f"{name}.qzeros"].shape == (groups, -(-out_f * 2 // 32))
        assert int(unpack(tensors[f"{name}.qzeros"], 2, out_f, dim=1).max()) < 3


CASES = {
    "w4g32-asym-act-order": {"bits": 4, "group_size": 32},
    "w4g32-sym-in-order": {"bits": 4, "group_size": 32, "sym": True, "act_order": False},
    "w2g32-rtn-asym": {"method": "rtn", "bits": 2, "group_size": 32},
    "w3g32-attention-w4g64-mlp": {"plan": lambda name: (3, 32) if "self_attn" in name else (4, 64)},
}


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_gptqmodel_reads_the_same_weights_and_logits(case, tmp_path, stories_path, text_dir):
    python = reader_python()
    options = dict(CASES[case])
    if "plan" in options:
        choose = options.pop("plan")
        names = [f"model.layers.{i}.{kind}" for i in range(5) for kind in (
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
        layers = {n: {"bits": choose(n)[0], "group_size": choose(n)[1], "sym": False} for n in names}
        (tmp_path / "plan.json").write_text(json.dumps({"layers": layers}))
        options["plan"] = str(tmp_path / "plan.json")
    out = tmp_path / "q"
    calib = {} if options.get("method") == "rtn" else {"calib": [str(text_dir / "tinystories_calib.txt")], **CALIB}
    bitsmith.quantize(str(stories_path), str(out), **calib, **{"progress": False, **options})
    save_file({"ids": IDS}, tmp_path / "ids.safetensors")
    sym = json.loads((out / "config.json").read_text())["quantization_config"]["sym"]
    run = subprocess.run([python, str(READER), str(out), str(tmp_path / "ids.safetensors"), str(tmp_path / "read.safetensors"),
                          *([] if sym else ["--past-producer-check"])],
                         capture_output=True, text=True, cwd=tmp_path, timeout=600, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    with safe_open(str(tmp_path / "read.safetensors"), framework="pt") as f:
        assert f.metadata()["kernels"] == "TorchLinear"
        read = {"logits": f.get_tensor("logits"),
                "weights": {k[len("weight/"):]: f.get_tensor(k) for k in f.keys() if k.startswith("weight/")}}

    net = bitsmith.load(str(out))
    ours = {name: m for name, m in net.named_modules() if isinstance(m, QuantizedLinear)}
    assert sorted(read["weights"]) == sorted(ours) and len(ours) == 35
    for name, module in ours.items():
        assert torch.equal(read["weights"][name], module.dequantize().half().float()), name
    with torch.no_grad():
        logits = net(IDS).logits.float()
    assert (read["logits"] - logits).abs().max() < LOGIT_TOLERANCE
    assert (read["logits"].argmax(-1) == logits.argmax(-1)).all()

"""transformers' `AutoModelForCausalLM.from_pretrained` on folders with quant_method "bitsmith" (compress,
--lossless-rest, qoq): after `import bitsmith` the same model as `bitsmith.load`, logit for logit; without it a
loud refusal, never random weights; GPTQ folders left to transformers."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import bitsmith
from bitsmith import api, transformers_hook
from bitsmith.formats.checkpoint import TRANSFORMERS_GUARD
from bitsmith.formats.dfloat import compress_checkpoint
from bitsmith.kernels.linear import QuantizedLinear
from bitsmith.kernels.w4a8_linear import W4A8Linear

IDS = torch.tensor([[1, 403, 73, 11, 290, 5, 17, 88, 260, 2], [1, 9, 9, 9, 120, 121, 122, 33, 44, 55]])
KINDS = {"compress": torch.nn.Linear, "lossless-rest": QuantizedLinear, "qoq": W4A8Linear}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def folders(tmp_path_factory, stories_path, text_dir):
    """stories260K in BF16, and from it one folder of each kind that is declared quant_method "bitsmith", and a
    plain GPTQ one."""
    root = tmp_path_factory.mktemp("hf")
    bf16 = root / "bf16"
    shutil.copytree(stories_path, bf16)
    (bf16 / "model.safetensors").chmod(0o644)
    tensors = load_file(str(stories_path / "model.safetensors"))
    save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, str(bf16 / "model.safetensors"),
              metadata={"format": "pt"})
    calib = [str(text_dir / "tinystories_calib.txt")]
    compress_checkpoint(bf16, root / "compress")
    api.quantize(str(bf16), str(root / "lossless-rest"), method="rtn", group_size=32, lossless_rest=True,
                 progress=False)
    api.quantize(str(bf16), str(root / "qoq"), method="qoq", group_size=-1, calib=calib, nsamples=4, seqlen=64,
                 progress=False)
    api.quantize(str(bf16), str(root / "gptq"), method="rtn", group_size=32, progress=False)
    return root


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("kind", list(KINDS))
def test_from_pretrained_is_bitsmith_load(folders, kind):
    from transformers import AutoModelForCausalLM
    folder = folders / kind
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "bitsmith"
    assert config["attn_implementation"] == TRANSFORMERS_GUARD
    model = AutoModelForCausalLM.from_pretrained(folder)
    reference = bitsmith.load(str(folder))
    assert torch.equal(logits(model), logits(reference))
    assert type(model.model.layers[0].self_attn.q_proj) is KINDS[kind]
    assert model.is_quantized and model.config.quantization_config.quant_method == "bitsmith"
    assert model.config._attn_implementation == "sdpa" and model.model.config is model.config
    assert model.dtype == torch.float32 and not model.training
    assert torch.equal(model.generate(IDS[:1], max_new_tokens=8, do_sample=False),
                       reference.generate(IDS[:1], max_new_tokens=8, do_sample=False))
    with pytest.raises(ValueError, match="not serializable"):
        model.save_pretrained(folders / f"saved-{kind}")


def test_from_pretrained_in_bfloat16(folders):
    from transformers import AutoModelForCausalLM
    folder = folders / "lossless-rest"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert torch.equal(logits(model), logits(bitsmith.load(str(folder), dtype=torch.bfloat16)))


def test_gptq_folders_are_left_to_transformers(folders):
    from transformers import AutoModelForCausalLM
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
    from transformers.quantizers.quantizer_gptq import GptqHfQuantizer
    from transformers.utils.quantization_config import GPTQConfig
    assert AUTO_QUANTIZER_MAPPING["gptq"] is GptqHfQuantizer and AUTO_QUANTIZATION_CONFIG_MAPPING["gptq"] is GPTQConfig
    config = json.loads((folders / "gptq" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "gptq" and "attn_implementation" not in config
    try:
        model = AutoModelForCausalLM.from_pretrained(folders / "gptq")
    except ImportError as e:                    # transformers' GPTQ support needs optimum and gptqmodel
        assert "optimum" in str(e) or "gptqmodel" in str(e)
    else:
        assert type(model.hf_quantizer) is GptqHfQuantizer


def python(code: str, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=600,
                          env=env, check=False)


def test_without_import_bitsmith_transformers_refuses(folders):
    code = ("import sys\nfrom transformers import AutoModelForCausalLM\nfor f in sys.argv[1:]:\n"
            "    try:\n        AutoModelForCausalLM.from_pretrained(f)\n"
            "    except ValueError as e:\n        print('refused', f, e)\n"
            "    else:\n        print('LOADED', f)\n"
            "assert 'bitsmith' not in sys.modules\n")
    r = python(code, *(folders / kind for kind in KINDS))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert [line.split()[:2] for line in lines] == [["refused", str(folders / kind)] for kind in KINDS]
    assert all("import bitsmith to load this checkpoint" in line for line in lines)


def test_import_bitsmith_is_light_and_registers_when_transformers_comes(folders):
    code = ("import sys\nimport bitsmith\n"
            "assert 'transformers' not in sys.modules, 'transformers imported by import bitsmith'\n"
            "import torch\nfrom transformers import AutoModelForCausalLM\n"
            "ids = torch.tensor([[1, 403, 73, 11, 290]])\n"
            "with torch.no_grad():\n"
            "    a = AutoModelForCausalLM.from_pretrained(sys.argv[1])(ids).logits\n"
            "    b = bitsmith.load(sys.argv[1])(ids).logits\n"
            "print('equal' if torch.equal(a, b) else 'DIFFERENT')\n")
    r = python(code, folders / "qoq")
    assert r.returncode == 0 and r.stdout == "equal\n", r.stderr


def test_import_bitsmith_without_imports_of_torch_or_transformers():
    r = python("import sys, bitsmith; print(sorted({'torch', 'transformers'} & set(sys.modules)))")
    assert r.returncode == 0 and r.stdout == "[]\n", r.stderr


def test_registration_survives_a_transformers_without_the_api(monkeypatch):
    from transformers.quantizers import auto
    monkeypatch.delattr(auto, "register_quantizer")
    monkeypatch.delitem(auto.AUTO_QUANTIZER_MAPPING, "bitsmith")
    assert transformers_hook.register() is False
    assert "bitsmith" not in auto.AUTO_QUANTIZER_MAPPING

"""`bitsmith compress` / `decompress`: round trip through the command line, one-line errors, exit 2,
nothing half-written."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import bitsmith
from bitsmith.cli.lossless import compress, decompress
from bitsmith.cli.main import main
from bitsmith.formats import dfloat
from bitsmith.formats.checkpoint import Checkpoint, verify

main.add_command(compress)
main.add_command(decompress)


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def model(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    tensors = {"a.weight": (torch.randn(64, 48, generator=g) * 0.05).to(torch.bfloat16),
               "b.weight": torch.randn(5, 5, generator=g)}
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "toy"}))
    return folder, tensors


def test_compress_verify_decompress(model, tmp_path):
    folder, tensors = model
    r = run("compress", folder, "-o", tmp_path / "z")
    assert r.exit_code == 0, r.output
    assert "tensors (coded)" in r.output and "1 (1)" not in r.output
    assert run("verify", tmp_path / "z").exit_code == 0
    r = run("decompress", tmp_path / "z", "-o", tmp_path / "d")
    assert r.exit_code == 0, r.output
    back = load_file(str(tmp_path / "d" / "model.safetensors"))
    assert all(torch.equal(back[k].view(torch.uint8), v.view(torch.uint8)) for k, v in tensors.items())


@pytest.mark.parametrize("args, message", [
    (["compress", "{tmp}/missing", "-o", "{tmp}/out"], "no such folder"),
    (["compress", "{tmp}/model", "-o", "{tmp}/model"], "may not be the input itself"),
    (["compress", "{tmp}/model", "-o", "{tmp}/out", "--window-bits", "100"], "multiple of 32"),
    (["decompress", "{tmp}/model", "-o", "{tmp}/out", "--overwrite"], None),
])
def test_bad_input_is_one_line_and_exit_2(model, tmp_path, args, message):
    r = run(*[a.format(tmp=tmp_path) for a in args])
    if message is None:                           # decompressing a plain folder is a plain copy
        assert r.exit_code == 0
        return
    assert r.exit_code == 2 and message in r.output
    assert "Traceback" not in r.output
    assert not (tmp_path / "out").exists()


def test_corrupted_checkpoint_fails_cleanly_and_writes_nothing(model, tmp_path):
    folder, _ = model
    assert run("compress", folder, "-o", tmp_path / "z").exit_code == 0
    stored = load_file(str(tmp_path / "z" / "model.safetensors"))
    stored["a.weight" + dfloat.PART] = stored["a.weight" + dfloat.PART][:-1].clone()
    save_file(stored, str(tmp_path / "z" / "model.safetensors"))
    r = run("decompress", tmp_path / "z", "-o", tmp_path / "d")
    assert r.exit_code == 2 and "a.weight" in r.output and len(r.output.strip().splitlines()[-1]) > 0
    assert "Traceback" not in r.output and not (tmp_path / "d").exists()
    assert not list(tmp_path.glob(".d.*"))
    r = run("verify", tmp_path / "z")
    assert r.exit_code == 2 and "sha256 mismatch" in r.output




def test_quantize_lossless_rest_codes_what_stays_bf16_and_changes_no_output(stories_bf16, text_dir, tmp_path):
    common = ["quantize", stories_bf16, "--method", "rtn", "--bits", "4", "--group-size", "32",
              "--calib", text_dir / "tinystories_calib.txt", "--nsamples", "4", "--seqlen", "64"]
    for out, extra in (("plain", []), ("coded", ["--lossless-rest"])):
        r = run(*common, "-o", tmp_path / out, *extra)
        assert r.exit_code == 0, r.output
    plain, coded = Checkpoint(tmp_path / "plain"), Checkpoint(tmp_path / "coded")
    assert not plain.coded and "model.embed_tokens.weight" in coded.coded
    assert sorted(coded.config["quantization_config"]["lossless"]["tensors"]) == sorted(coded.coded)
    assert sorted(coded.keys()) == sorted(plain.keys())
    assert all(torch.equal(coded.get(k).view(torch.uint8), plain.get(k).view(torch.uint8)) for k in plain)
    size = {name: sum(f.stat().st_size for f in (tmp_path / name).glob("*.safetensors")) for name in ("plain", "coded")}
    assert size["coded"] < size["plain"] and verify(tmp_path / "coded") == []
    ids = torch.randint(3, 512, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = [bitsmith.load(str(tmp_path / name)).eval()(ids).logits for name in ("plain", "coded")]
    assert torch.equal(logits[0], logits[1])

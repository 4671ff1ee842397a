"""`bitsmith compress` / `decompress`: round trip through the command line, one-line errors, exit 2,
nothing half-written."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from bitsmith.cli.lossless import compress, decompress
from bitsmith.cli.main import main
from bitsmith.formats import dfloat

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
    (["compress", "{tmp}/model", "-o", "{tmp}/model"], "already exists"),
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

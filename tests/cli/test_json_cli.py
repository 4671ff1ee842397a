"""`--json FILE` and `--json -` on every command that reports a result, checked against what the command did:
verify (ok and its problems), compress and decompress (counts and sizes on disk), eval."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file

from bitsmith.cli.main import main
from bitsmith.formats.checkpoint import Checkpoint


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def safetensors_bytes(folder):
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))




@pytest.fixture
def compressed(stories_bf16, tmp_path):
    folder = stories_bf16
    r = run("compress", folder, "-o", tmp_path / "z", "--json", tmp_path / "compress.json")
    assert r.exit_code == 0, r.output
    return tmp_path / "z", json.loads((tmp_path / "compress.json").read_text())


def test_compress_json_matches_the_folders(stories_bf16, compressed):
    folder = stories_bf16
    n_tensors = len(load_file(str(folder / "model.safetensors")))
    z, s = compressed
    assert (s["model"], s["out"]) == (str(folder), str(z))
    assert s["tensors"] == n_tensors and s["source_dtypes"] == {"BF16": n_tensors}
    assert s["coded"] == len(Checkpoint(z).coded) > 0
    assert s["source_bytes"] == safetensors_bytes(folder) and s["output_bytes"] == safetensors_bytes(z)
    assert s["output_bytes"] < s["source_bytes"] and s["coded_values"] > 0 and s["seconds"] > 0


def test_decompress_json_to_stdout(stories_bf16, compressed, tmp_path):
    folder = stories_bf16
    n_tensors = len(load_file(str(folder / "model.safetensors")))
    z, coded = compressed
    r = run("decompress", z, "-o", tmp_path / "d", "--json", "-")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert (s["path"], s["out"], s["tensors"], s["coded"]) == (str(z), str(tmp_path / "d"), n_tensors, coded["coded"])
    assert s["identical_files"] is True and s["output_bytes"] == safetensors_bytes(folder)
    assert (tmp_path / "d" / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()


def test_compress_json_to_stdout_keeps_the_note_on_stderr(stories_path, tmp_path):
    """stories260K as stored is float32: nothing is coded, and the note saying so is not part of the JSON."""
    r = run("compress", stories_path, "-o", tmp_path / "z", "--json", "-")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["coded"] == 0 and s["source_dtypes"] == {"F32": s["tensors"]}
    assert "nothing was coded" in r.stderr


def test_verify_json(compressed, tmp_path):
    z, _ = compressed
    r = run("verify", z, "--json", tmp_path / "ok.json")
    assert r.exit_code == 0 and r.stdout == f"OK {z}\n"
    assert json.loads((tmp_path / "ok.json").read_text()) == {"path": str(z), "ok": True, "problems": []}
    r = run("verify", z, "--json", "-")
    assert r.exit_code == 0 and json.loads(r.stdout) == {"path": str(z), "ok": True, "problems": []}


def test_verify_json_lists_the_problems(compressed, tmp_path):
    z, _ = compressed
    with open(z / "model.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    for target in (tmp_path / "bad.json", "-"):
        r = run("verify", z, "--json", target)
        assert r.exit_code == 2 and r.stderr == "FAIL model.safetensors: sha256 mismatch\n"
        result = json.loads(r.stdout if target == "-" else target.read_text())
        assert result == {"path": str(z), "ok": False, "problems": ["model.safetensors: sha256 mismatch"]}


def test_eval_json_to_stdout(stories_path, text_dir):
    r = run("eval", stories_path, "--data", text_dir / "tinystories_calib.txt", "--seqlen", "64",
            "--max-tokens", "256", "--json", "-")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert (result["model"], result["tokens"], result["seqlen"]) == (str(stories_path), 256, 64)
    assert result["perplexity"] > 1


@pytest.mark.parametrize("command", ["compress", "decompress"])
def test_bad_input_with_json_to_stdout_is_one_line_on_stderr(stories_path, tmp_path, command):
    r = run(command, stories_path, "-o", stories_path, "--json", "-")
    assert r.exit_code == 2 and r.stdout == "" and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1


@pytest.mark.parametrize("command", ["quantize", "eval", "inspect", "verify", "compress", "decompress"])
def test_every_reporting_command_takes_json(command):
    text = " ".join(run(command, "--help").stdout.split())
    assert "--json FILE Write" in text and "('-': to stdout, instead of the printed report)" in text

"""The command line as users run it: the happy path, and bad inputs (one line, exit 2, nothing left behind)."""
import json
import shutil

import pytest
from click.testing import CliRunner

from bitsmith.cli.main import main


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, stories_path, text_dir):
    out = tmp_path_factory.mktemp("cli") / "q"
    r = run("quantize", stories_path, "-o", out, "--method", "rtn", "--bits", "4", "--group-size", "32",
            "--calib", text_dir / "tinystories_calib.txt", "--nsamples", "4", "--seqlen", "64")
    assert r.exit_code == 0, r.output
    return out, r.output


def test_quantize_prints_a_summary(quantized):
    out, output = quantized
    for row in ("bits per weight (all-in)", "size", "wall time", "peak RSS"):
        assert row in output
    assert (out / "bitsmith_manifest.json").exists()


def test_eval_inspect_verify(quantized, stories_path, text_dir, tmp_path):
    out, _ = quantized
    r = run("eval", out, "--data", text_dir / "tinystories_calib.txt", "--seqlen", "128", "--max-tokens", "1024",
            "--base", stories_path, "--json", tmp_path / "r.json")
    assert r.exit_code == 0, r.output
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["tokens"] == 1024 and result["seqlen"] == 128
    assert result["perplexity"] > 1 and 0 <= result["kl"] and 0 <= result["top1_agreement"] <= 1
    r = run("inspect", out, "--json", tmp_path / "i.json")
    assert r.exit_code == 0 and "model.layers.0.mlp.down_proj" in r.output
    table = json.loads((tmp_path / "i.json").read_text())
    assert table["totals"]["layers"] == 35 and 4 < table["totals"]["bpw"] < 5.5
    assert run("verify", out).exit_code == 0


def test_verify_catches_an_altered_file(quantized, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(quantized[0], copy)
    with open(copy / "model.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    r = run("verify", copy)
    assert r.exit_code == 2 and "sha256 mismatch" in r.output


def broken_copy(src, dst, damage):
    shutil.copytree(src, dst)
    damage(dst)
    return dst


def corrupt_header(d):
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes((10**12).to_bytes(8, "little") + data[8:])


def truncate(d):
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])


def unknown_architecture(d):
    config = json.loads((d / "config.json").read_text())
    config["model_type"] = "gpt2"
    (d / "config.json").write_text(json.dumps(config))


def pickle_only(d):
    (d / "model.safetensors").rename(d / "pytorch_model.bin")


@pytest.mark.parametrize("damage,message", [
    (corrupt_header, "safetensors"), (truncate, "safetensors"),
    (unknown_architecture, "unsupported architecture 'gpt2'"), (pickle_only, "pickle"),
])
def test_broken_models_are_refused(tmp_path, stories_path, text_dir, damage, message):
    model = broken_copy(stories_path, tmp_path / "model", damage)
    out = tmp_path / "out"
    r = run("quantize", model, "-o", out, "--method", "rtn", "--calib", text_dir / "tinystories_calib.txt",
            "--nsamples", "2", "--seqlen", "32")
    assert r.exit_code == 2, r.output
    assert message in r.output and len(r.output.strip().splitlines()) == 1
    assert not out.exists() and leftovers(tmp_path) == []


def test_bad_options_are_refused(tmp_path, stories_path, text_dir):
    calib = text_dir / "tinystories_calib.txt"
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    cases = [
        (["nowhere/model", "-o", tmp_path / "o1", "--calib", calib], "no such file or folder"),
        ([stories_path, "-o", tmp_path / "o2", "--group-size", "48", "--calib", calib], "does not divide"),
        ([stories_path, "-o", tmp_path / "o3", "--calib", empty], "empty"),
        ([stories_path, "-o", existing, "--calib", calib], "already exists"),
        ([stories_path, "-o", tmp_path / "o4", "--bits", "7", "--calib", calib], "--bits 7"),
        ([stories_path, "-o", tmp_path / "o5", "--seqlen", "4096", "--target-bpw", "4", "--calib", calib], "exceeds"),
    ]
    for args, message in cases:
        r = run("quantize", *args, "--method", "rtn", "--nsamples", "2", "--seqlen", "32") if "--seqlen" not in args \
            else run("quantize", *args, "--method", "rtn", "--nsamples", "2")
        assert r.exit_code == 2, (args, r.output)
        assert message in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt", "existing"]
    assert (existing / "keep.txt").read_text() == "mine"


def test_eval_without_data_is_a_usage_error(stories_path):
    r = run("eval", stories_path)
    assert r.exit_code == 2 and "--data" in r.output

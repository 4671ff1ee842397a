"""Options and files a user gets wrong: every mistake is one line on stderr and exit 2, refused before any heavy
work, nothing written; exit 1 stays for bugs (with --debug, their traceback)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
from hostile_support import DROP_READ_ACCESS, never_blocks, refused, run, said, tree

FAST = ["--method", "rtn", "--bits", "4", "--group-size", "32"]


@pytest.fixture
def work(tmp_path, stories_path, text_dir):
    """A folder holding the user's text beside the model (read from the assets)."""
    shutil.copy(text_dir / "tinystories_calib.txt", tmp_path / "text.txt")
    return tmp_path, stories_path, tmp_path / "text.txt"


def quantize(model, out, *args):
    return run("quantize", model, "-o", out, *args)


# windows and token counts


@pytest.mark.parametrize("args, message", [
    (["--seqlen", "0"], "--seqlen 0: a window needs at least 2 tokens (one to predict from)"),
    (["--seqlen", "1"], "--seqlen 1: a window needs at least 2 tokens (one to predict from)"),
    (["--seqlen", "-3"], "--seqlen -3: a window needs at least 2 tokens (one to predict from)"),
    (["--seqlen", "1024"], "--seqlen 1024 exceeds the model's context of 512 tokens"),
    (["--max-tokens", "-1"], "--max-tokens -1: expected a positive number of tokens"),
    (["--max-tokens", "0"], "--max-tokens 0: expected a positive number of tokens"),
])
def test_eval_refuses_windows_the_model_cannot_take(work, args, message):
    tmp_path, model, text = work
    before = tree(tmp_path)
    refused(run("eval", model, "--data", text, *args, "--json", tmp_path / "r.json"), f"error: {message}")
    assert tree(tmp_path) == before


def test_eval_windows_default_to_a_shorter_context(work):
    _tmp_path, model, text = work
    r = run("eval", model, "--data", text, "--max-tokens", "1100", "--json", "-")
    assert r.exit_code == 0, r.output
    assert (json.loads(r.stdout)["seqlen"], json.loads(r.stdout)["tokens"]) == (512, 1024)
    help_text = " ".join(run("eval", "--help").stdout.split())
    assert "(default: 2048, or the model's context when shorter)" in help_text


def test_eval_refuses_a_base_with_another_vocabulary(work):
    tmp_path, model, text = work
    shutil.copytree(model, tmp_path / "base")
    os.chmod(tmp_path / "base" / "config.json", 0o644)
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    (tmp_path / "base" / "config.json").write_text(json.dumps({**config, "vocab_size": 1000}))
    refused(run("eval", model, "--data", text, "--seqlen", "64", "--base", tmp_path / "base"),
            f"error: --base {tmp_path / 'base'}: a vocabulary of 1000 tokens, MODEL has 512; compare a model with "
            "its own base")


@pytest.mark.parametrize("args, message", [
    (["--nsamples", "0"], "--nsamples must be >= 1 and --seqlen >= 2"),
    (["--seqlen", "0"], "--nsamples must be >= 1 and --seqlen >= 2"),
    (["--seqlen", "-5"], "--nsamples must be >= 1 and --seqlen >= 2"),
    (["--method", "gptq", "--seqlen", "1024"], "--seqlen 1024 exceeds the model's context of 512 tokens"),
    (["--method", "gptq", "--seqlen", "256", "--tune-epochs", "1", "--tune-seqlen", "1024"],
     "--tune-seqlen 1024 exceeds the model's context of 512 tokens"),
    (["--eval-data", "{text}", "--eval-seqlen", "1024"], "--eval-seqlen 1024 exceeds the model's context of 512 tokens"),
    (["--eval-data", "{text}", "--eval-seqlen", "1"], ("--eval-seqlen 1: a window needs at least 2 tokens (one to "
                                                      "predict from)")),
    (["--eval-data", "{text}", "--eval-max-tokens", "-1"], ("--eval-max-tokens -1: expected a positive number of "
                                                           "tokens")),
])
def test_quantize_refuses_bad_counts_before_any_work(work, args, message):
    tmp_path, model, text = work
    before = tree(tmp_path)
    args = [a.format(text=text) for a in args]
    refused(quantize(model, tmp_path / "out", "--calib", text, *FAST, *args), f"error: {message}")
    assert tree(tmp_path) == before


def test_rtn_needs_no_calibration_window_within_the_context(work):
    """RTN reads no calibration text, so the default --seqlen 2048 is no reason to refuse a 512-token model; the
    evaluation windows default to the context."""
    tmp_path, model, text = work
    r = quantize(model, tmp_path / "out", *FAST, "--eval-data", text, "--eval-max-tokens", "1100", "--json",
                 tmp_path / "s.json")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "s.json").read_text())["eval"]["seqlen"] == 512
    help_text = " ".join(run("quantize", "--help").stdout.split())
    assert "Tokens per evaluation window (default: 2048, or the model's context when shorter)." in help_text


# texts that are not text


def binary(path):
    path.write_bytes(bytes(range(256)) * 8)


def nul_filled(path):
    path.write_bytes(b"\x00" * 4096)


def utf16(path):
    path.write_bytes("Once upon a time there was a cat.\n".encode("utf-16-le") * 50)


def a_folder(path):
    path.mkdir()


def empty(path):
    path.write_text(" \n\n")


TEXTS = [
    (binary, "{p}: {what} is not UTF-8 (byte 0x80 at offset 128); give a plain text file"),
    (nul_filled, "{p}: {what} is 100% control characters, not text (a binary file?)"),
    (utf16, "{p}: {what} is 50% control characters, not text (a binary file?)"),
    (a_folder, "{p}: {what} is a folder, not a regular file"),
    (empty, "{p}: {what} is empty"),
    (None, "{p}: {what} not found"),
]


@pytest.mark.parametrize("make, message", TEXTS)
def test_calibration_text_that_is_not_text_is_refused(work, make, message):
    tmp_path, model, _ = work
    bad = tmp_path / "calib.txt"
    if make:
        make(bad)
    before = tree(tmp_path)
    refused(quantize(model, tmp_path / "out", "--calib", bad, "--method", "gptq", "--nsamples", "2", "--seqlen", "32"),
            "error: " + message.format(p=bad, what="calibration text"))
    assert tree(tmp_path) == before


@pytest.mark.parametrize("make, message", TEXTS[:4])
def test_evaluation_text_that_is_not_text_is_refused(work, make, message):
    tmp_path, model, text = work
    bad = tmp_path / "eval.txt"
    make(bad)
    before = tree(tmp_path)
    expected = "error: " + message.format(p=bad, what="evaluation text")
    refused(run("eval", model, "--data", bad, "--seqlen", "64"), expected)
    refused(quantize(model, tmp_path / "out", "--calib", text, *FAST, "--eval-data", bad), expected)
    assert tree(tmp_path) == before


# FIFOs where a file is read: refused unread, never blocking


@pytest.mark.parametrize("option, message", [
    ("--calib", "{fifo}: calibration text is a FIFO (named pipe), not a regular file"),
    ("--eval-data", "{fifo}: evaluation text is a FIFO (named pipe), not a regular file"),
    ("--plan", "--plan {fifo} is a FIFO (named pipe), not a regular file"),
    ("--measurement", "--measurement {fifo} is a FIFO (named pipe), not a regular file"),
])
def test_quantize_refuses_a_fifo_unread(work, option, message):
    tmp_path, model, _text = work
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    extra = ["--target-bpw", "4"] if option == "--measurement" else []
    before = tree(tmp_path)
    with never_blocks():
        refused(quantize(model, tmp_path / "out", *FAST, option, fifo, *extra), "error: " + message.format(fifo=fifo))
    assert tree(tmp_path) == before


def test_eval_refuses_a_fifo_unread(work):
    tmp_path, model, _ = work
    os.mkfifo(tmp_path / "pipe")
    with never_blocks():
        refused(run("eval", model, "--data", tmp_path / "pipe"),
                f"error: {tmp_path / 'pipe'}: evaluation text is a FIFO (named pipe), not a regular file")


# --json FILE


@pytest.mark.parametrize("command", ["quantize", "eval", "inspect", "verify", "compress", "decompress"])
def test_json_into_a_missing_folder_is_refused_before_any_work(work, command, monkeypatch):
    tmp_path, model, text = work
    monkeypatch.chdir(tmp_path)
    args = {"quantize": ["quantize", model, "-o", "out", *FAST],
            "eval": ["eval", model, "--data", text],
            "inspect": ["inspect", model], "verify": ["verify", model],
            "compress": ["compress", model, "-o", "out"], "decompress": ["decompress", model, "-o", "out"]}[command]
    before = tree(tmp_path)
    refused(run(*args, "--json", "nowhere/r.json"), "error: --json nowhere/r.json: the folder nowhere does not exist")
    assert tree(tmp_path) == before


def test_json_onto_a_folder_is_refused(work):
    tmp_path, model, _text = work
    (tmp_path / "r.json").mkdir()
    before = tree(tmp_path)
    refused(quantize(model, tmp_path / "out", *FAST, "--json", tmp_path / "r.json"),
            f"error: Invalid value for '--json': File '{tmp_path / 'r.json'}' is a directory.")
    assert tree(tmp_path) == before


# usage


@pytest.mark.parametrize("args, message", [
    (["--method", "awq"], "error: Invalid value for '--method': 'awq' is not one of 'rtn', 'gptq', 'qoq'."),
    (["--bits", "four"], "error: Invalid value for '--bits': 'four' is not a valid integer."),
    (["--no-such-option"], "error: No such option '--no-such-option'."),
])
def test_usage_errors_are_one_line(work, args, message):
    tmp_path, model, _ = work
    refused(quantize(model, tmp_path / "out", *args), message)
    assert not (tmp_path / "out").exists()


def test_a_missing_argument_is_one_line(tmp_path):
    refused(run("quantize", "-o", tmp_path / "out"), "error: Missing argument 'MODEL'.")


# exit 1 is for bugs


def test_an_internal_error_is_exit_1_and_its_traceback_shown_with_debug(work, monkeypatch):
    tmp_path, model, _ = work
    from bitsmith import api

    def broken(*args, **kwargs):
        raise RuntimeError("a bug\nover two lines")
    monkeypatch.setattr(api, "quantize", broken)
    refused(quantize(model, tmp_path / "out", *FAST),
            "internal error: RuntimeError: a bug over two lines (rerun with --debug for the traceback)", code=1)
    r = run("--debug", "quantize", model, "-o", tmp_path / "out", *FAST)
    assert r.exit_code == 1 and isinstance(r.exception, RuntimeError)     # raised on, as a traceback


# files this user may not read


UNREADABLE = textwrap.dedent("""
    import sys
    from bitsmith.cli.main import main
    for args in sys.argv[1:]:
        try:
            main(args.split("|"))
        except SystemExit as e:
            print(e.code)
""")


@pytest.mark.skipif(os.geteuid() == 0 and shutil.which("setpriv") is None, reason="root without setpriv reads all")
def test_files_this_user_may_not_read_are_refused(tmp_path, stories_path, text_dir):
    model = tmp_path / "model"
    shutil.copytree(stories_path, model)
    shutil.copy(text_dir / "tinystories_calib.txt", tmp_path / "text.txt")
    (tmp_path / "plan.json").write_text("{}")
    for path in (model / "model.safetensors", tmp_path / "text.txt", tmp_path / "plan.json"):
        path.chmod(0o000)
    commands = [["quantize", model, "-o", tmp_path / "out", *FAST],
                ["quantize", stories_path, "-o", tmp_path / "out", *FAST, "--calib", tmp_path / "text.txt"],
                ["quantize", stories_path, "-o", tmp_path / "out", *FAST, "--plan", tmp_path / "plan.json"],
                ["eval", stories_path, "--data", tmp_path / "text.txt"]]
    prefix = DROP_READ_ACCESS if os.geteuid() == 0 else []
    before = tree_of_names(tmp_path)
    r = subprocess.run([*prefix, sys.executable, "-c", UNREADABLE, *("|".join(map(str, c)) for c in commands)],
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.stdout.split() == ["2"] * 4, r.stderr
    assert said(r.stderr) == [
        f"error: {model / 'model.safetensors'} cannot be read (Permission denied)",
        f"error: {tmp_path / 'text.txt'}: calibration text cannot be read (Permission denied)",
        f"error: Invalid value for '--plan': File '{tmp_path / 'plan.json'}' is not readable.",
        f"error: Invalid value for '--data': Path '{tmp_path / 'text.txt'}' is not readable."]
    assert tree_of_names(tmp_path) == before


def tree_of_names(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


# a full disk


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs (root only), too small for the quantized model."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True,
                       check=False)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()})")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


@pytest.mark.parametrize("command", ["quantize", "compress"])
def test_a_full_disk_is_one_line_and_leaves_nothing(small_disk, stories_path, command):
    args = [command, stories_path, "-o", small_disk / "out", *(FAST if command == "quantize" else [])]
    refused(run(*args), "error: No space left on device: the output could not be written; free some space and run "
                        "again")
    assert os.listdir(small_disk) == []

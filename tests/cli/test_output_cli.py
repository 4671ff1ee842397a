"""The command line never destroys its input or another run's output: `-o` equal to, inside or containing MODEL
is refused (one line, exit 2) before anything is read or written; a second run on an OUT being written is
refused naming the first; a replaced OUT is swapped in whole."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import textwrap

import pytest
from click.testing import CliRunner
from tests_support import needs_smollm2

import bitsmith
from bitsmith.cli.main import main
from bitsmith.formats.checkpoint import verify
from bitsmith.formats.errors import InputError
from bitsmith.formats.source import bundled_path

FAST = ["--method", "rtn", "--bits", "4", "--group-size", "32", "--nsamples", "4", "--seqlen", "64"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def tree(root):
    """Every path under root -> its bytes (None for a folder): the exact state of the disk."""
    return {p.relative_to(root).as_posix(): None if p.is_dir() else p.read_bytes() for p in root.rglob("*")}


@pytest.fixture
def work(tmp_path, stories_path, text_dir):
    """A copy of stories260K in `model`, beside a file of the user's; the calibration text."""
    shutil.copytree(stories_path, tmp_path / "model")
    (tmp_path / "notes.txt").write_text("mine")
    return tmp_path, text_dir / "tinystories_calib.txt"


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def command(name, model, out, calib):
    return {"quantize": ["quantize", model, "-o", out, "--calib", calib, *FAST],
            "compress": ["compress", model, "-o", out],
            "decompress": ["decompress", model, "-o", out]}[name]


@pytest.mark.parametrize("name", ["quantize", "compress", "decompress"])
@pytest.mark.parametrize("out, message", [
    ("model", "{out}: the output may not be the input itself"),
    ("model/q", "{out}: the output may not lie inside the input {model}"),
    (".", "{out}: the output may not contain the input {model}"),
])
@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_output_overlapping_the_input_is_refused(work, name, out, message, overwrite):
    tmp_path, calib = work
    before = tree(tmp_path)
    model, out = tmp_path / "model", tmp_path / out
    r = run(*command(name, model, out, calib), *overwrite)
    assert (r.exit_code, r.output) == (2, f"error: {message.format(out=out, model=model)}\n")
    assert tree(tmp_path) == before


@needs_smollm2
def test_bundled_model_resolves_to_its_file(work):
    """`smollm2-135m` is a GGUF inside site-packages; OUT may not replace it or its folder. (An impossible
    --seqlen stops the run right after the check, should the check ever let it through.)"""
    _, calib = work
    gguf = bundled_path("smollm2-135m")
    r = run("quantize", "smollm2-135m", "-o", gguf.parent, "--overwrite", "--calib", calib, "--method", "rtn",
            "--seqlen", "100000")
    assert (r.exit_code, r.output) == (2, f"error: {gguf.parent}: the output may not contain the input {gguf}\n")
    with pytest.raises(InputError) as e:        # the command line refuses a file for -o before this check
        bitsmith.quantize("smollm2-135m", gguf, overwrite=True, calib=str(calib), method="rtn", seqlen=100000)
    assert str(e.value) == f"{gguf}: the output may not be the input itself"
    assert gguf.is_file()


HOLDER = textwrap.dedent("""
    import sys, torch
    from bitsmith.formats.checkpoint import CheckpointWriter
    w = CheckpointWriter(sys.argv[1])
    w.add("x", torch.ones(4))
    print(w.tmp.name, flush=True)
    sys.stdin.readline()
    w.abort()
""")


@pytest.mark.parametrize("name", ["quantize", "compress"])
def test_second_run_on_the_same_output_is_refused(work, name):
    tmp_path, calib = work
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        partial = proc.stdout.readline().strip()
        before = tree(tmp_path)
        r = run(*command(name, tmp_path / "model", out, calib), "--overwrite")
        assert r.exit_code == 2
        prefix = f"error: {out}: is being written by pid {proc.pid} on {socket.gethostname()} since "
        assert r.output.startswith(prefix) and r.output.count("\n") == 1, r.output
        assert tree(tmp_path) == before and {".out.lock", partial} < set(before)
    finally:
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "notes.txt"]


def test_quantize_overwrite_replaces_the_output_whole(work):
    tmp_path, calib = work
    model = tree(tmp_path / "model")
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "stale.txt").write_text("from an earlier run")
    r = run("quantize", tmp_path / "model", "-o", tmp_path / "q", "--calib", calib, *FAST, "--overwrite")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "notes.txt", "q"]
    assert "stale.txt" not in {p.name for p in (tmp_path / "q").iterdir()} and verify(tmp_path / "q") == []
    assert (tmp_path / "q").stat().st_mode & 0o777 == 0o777 & ~current_umask()
    assert tree(tmp_path / "model") == model


def test_compress_decompress_overwrite_replace_whole(work):
    tmp_path, _ = work
    model = tree(tmp_path / "model")
    for name, src, out in [("compress", "model", "z"), ("decompress", "z", "d")]:
        for overwrite in ([], ["--overwrite"]):
            r = run(name, tmp_path / src, "-o", tmp_path / out, *overwrite)
            assert r.exit_code == 0, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "model", "notes.txt", "z"]
    assert verify(tmp_path / "z") == [] and verify(tmp_path / "d") == []
    assert tree(tmp_path / "model") == model

"""`make demo` on a clone with nothing beside it: the bundled texts it falls back to, and the Makefile's choice.

The Makefile is run for real with BIN pointing at a stand-in `bitsmith` that records its arguments, so the
recipe's checks and the command lines are exercised without quantizing a model.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import subprocess
from importlib.resources import files
from pathlib import Path

import pytest
from tests_support import needs_smollm2

from bitsmith.calibration import data

ROOT = Path(__file__).resolve().parents[1]
TEXTS = files("bitsmith.calibration") / "texts"
CALIB = "bitsmith/calibration/texts/calib_milton.txt"
EVAL = "bitsmith/calibration/texts/eval_eb1911_shakespeare.txt"
STAND_IN = '#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done > "$0.$1.args"\n'

needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def bundled(name: str) -> str:
    """A bundled text as installed with the package."""
    return (TEXTS / name).read_bytes().decode("utf-8")       # strict: a stray byte fails here


def long_lines(body: str) -> set[str]:
    """Lines long enough that sharing one would mean sharing text, not a stock phrase."""
    return {line.strip() for line in body.splitlines() if len(line.strip()) >= 40}


def make_demo(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """`make demo` with the stand-in bitsmith; the virtual environment is neither checked nor built."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "bitsmith"
    stub.write_text(STAND_IN)
    stub.chmod(stub.stat().st_mode | stat.S_IXUSR)
    env = {k: v for k, v in os.environ.items()
           if k not in {"MAKEFLAGS", "MFLAGS", "MAKELEVEL", "SHARED", "DEMO_CALIB", "DEMO_DATA", "DEMO_OUT"}}
    return subprocess.run(["make", "--no-print-directory", "-o", f"{bin_dir}/.installed", "demo",
                           f"BIN={bin_dir}", f"DEMO_OUT={tmp_path / 'out'}", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, check=False)


def recorded(tmp_path: Path, command: str) -> list[str]:
    """The arguments the stand-in bitsmith got for `command`, one per element."""
    return (tmp_path / "bin" / f"bitsmith.{command}.args").read_text().splitlines()


def expected_quantize(tmp_path: Path, calib: str) -> list[str]:
    return ["quantize", "smollm2-135m", "-o", str(tmp_path / "out"), "--method", "gptq", "--bits", "4",
            "--group-size", "128", "--calib", calib, "--nsamples", "128", "--seqlen", "512", "--seed", "0",
            "--overwrite"]


def expected_eval(tmp_path: Path, text: str) -> list[str]:
    return ["eval", str(tmp_path / "out"), "--data", text, "--seqlen", "2048", "--max-tokens", "16384",
            "--base", "smollm2-135m"]


@needs_make
@pytest.mark.parametrize("present", [(), ("c4_calib.txt",), ("wikitext2_test.txt",)])
def test_demo_without_shared_texts_uses_the_bundled_ones(tmp_path, present):
    shared = tmp_path / "shared"
    shared.mkdir()
    for name in present:                       # one of the two is not enough: both texts come from one place
        (shared / name).write_text("text\n")
    run = make_demo(tmp_path, f"SHARED={shared}")
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[0] == (f"demo: {shared} not found: using the bundled public-domain texts; "
                                          f"calibration text {CALIB}, evaluation text {EVAL}")
    assert recorded(tmp_path, "quantize") == expected_quantize(tmp_path, CALIB)
    assert recorded(tmp_path, "eval") == expected_eval(tmp_path, EVAL)
    assert (ROOT / CALIB).is_file() and (ROOT / EVAL).is_file()
    assert sorted(p.name for p in (tmp_path / "bin").iterdir()) == [
        "bitsmith", "bitsmith.eval.args", "bitsmith.quantize.args"]


@needs_make
def test_demo_prefers_the_shared_texts(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    for name in ("c4_calib.txt", "wikitext2_test.txt"):
        (shared / name).write_text("text\n")
    run = make_demo(tmp_path, f"SHARED={shared}")
    assert run.returncode == 0, run.stderr
    calib, text = str(shared / "c4_calib.txt"), str(shared / "wikitext2_test.txt")
    assert run.stdout.splitlines()[0] == f"demo: calibration text {calib}, evaluation text {text}"
    assert recorded(tmp_path, "quantize") == expected_quantize(tmp_path, calib)
    assert recorded(tmp_path, "eval") == expected_eval(tmp_path, text)


@needs_make
def test_demo_calibrates_on_model_samples_when_asked(tmp_path):
    run = make_demo(tmp_path, f"SHARED={tmp_path / 'none'}", "DEMO_CALIB=self")
    assert run.returncode == 0, run.stderr
    assert recorded(tmp_path, "quantize") == expected_quantize(tmp_path, "self")


@needs_make
@pytest.mark.parametrize("variable, what", [("DEMO_DATA", "evaluation"), ("DEMO_CALIB", "calibration")])
def test_demo_stops_on_a_missing_text(tmp_path, variable, what):
    missing = tmp_path / "missing.txt"
    run = make_demo(tmp_path, f"SHARED={tmp_path / 'none'}", f"{variable}={missing}")
    assert run.returncode == 2
    hint = "FILE (or self)" if variable == "DEMO_CALIB" else "FILE"
    assert run.stdout.splitlines() == [f"demo: {what} text {missing} not found; set {variable}={hint}"]
    assert sorted(p.name for p in (tmp_path / "bin").iterdir()) == ["bitsmith"]      # nothing ran


def test_bundled_texts_match_their_note_and_share_no_line():
    note = (TEXTS / "README.md").read_text(encoding="utf-8")
    calib, text = bundled("calib_milton.txt"), bundled("eval_eb1911_shakespeare.txt")
    for name, body in (("calib_milton.txt", calib), ("eval_eb1911_shakespeare.txt", text)):
        assert "\r" not in body and body.endswith("\n")
        digest = hashlib.sha256(body.encode("utf-8")).hexdigest()
        assert re.search(rf"^{digest}  {re.escape(name)}$", note, flags=re.MULTILINE), f"{name}: sha256 not in README.md"
    assert long_lines(calib) & long_lines(text) == set()


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    """Loaded once: building it from the GGUF takes seconds."""
    from bitsmith.formats.source import open_source
    return open_source("smollm2-135m").tokenizer()


@needs_smollm2
def test_bundled_texts_fill_the_demo_windows(smollm2_tokenizer):
    calib = data.tokenize(smollm2_tokenizer, bundled("calib_milton.txt"))
    text = data.tokenize(smollm2_tokenizer, bundled("eval_eb1911_shakespeare.txt"))
    assert (calib.numel(), text.numel()) == (49185, 20013)
    assert data.random_windows(calib, 128, 512, seed=0).shape == (128, 512)      # --nsamples 128 --seqlen 512
    assert data.eval_windows(text, 2048, max_tokens=16384).shape == (8, 2048)   # --seqlen 2048 --max-tokens 16384

"""What people expect of a command line: --version, `python -m bitsmith`, help text on every option, `quantize
--help` in sections, `--json -` on stdout, shell completion, and a README whose command reference names exactly the
options `--help` shows."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import bitsmith
from bitsmith.cli.main import QUANTIZE_SECTIONS, main

README = Path(__file__).resolve().parents[2] / "README.md"
LONG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def run(*args, **kwargs):
    return CliRunner().invoke(main, [str(a) for a in args], **kwargs)


def commands():
    """(words after `bitsmith`, click command) for the group itself and every command."""
    return [((), main)] + [((name,), cmd) for name, cmd in sorted(main.commands.items())]


def help_options(words) -> set[str]:
    """The long option names the --help text of `bitsmith WORDS` shows in its option lists."""
    out = run(*words, "--help")
    assert out.exit_code == 0, out.output
    names = set()
    for line in out.stdout.splitlines():
        term = line.strip().split("  ")[0]
        if line.startswith("  -") and term.startswith("-"):
            names.update(LONG.findall(term))
    return names


def declared_options(cmd) -> set[str]:
    names = {"--help"}
    for p in cmd.params:
        if isinstance(p, click.Option):
            names.update(o for o in p.opts + p.secondary_opts if o.startswith("--"))
    return names


def test_version():
    r = run("--version")
    assert r.exit_code == 0 and r.stdout == f"bitsmith {bitsmith.__version__}\n"


def python_m_bitsmith(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bitsmith", *args], capture_output=True, text=True, timeout=120,
                          check=False)


def test_python_m_bitsmith():
    r = python_m_bitsmith("--version")
    assert r.returncode == 0 and r.stdout == f"bitsmith {bitsmith.__version__}\n", r.stderr
    r = python_m_bitsmith("verify", "--help")
    assert r.returncode == 0 and r.stdout.startswith("Usage: bitsmith verify [OPTIONS] PATH")


@pytest.mark.parametrize("words,cmd", commands(), ids=lambda v: " ".join(v) if isinstance(v, tuple) else None)
def test_every_option_has_help_and_shows_in_help(words, cmd):
    for p in cmd.params:
        if isinstance(p, click.Option):
            assert p.help and p.help.strip(), f"bitsmith {' '.join(words)} {p.opts[-1]}: no help text"
    assert help_options(words) == declared_options(cmd)


def test_quantize_help_is_in_sections():
    text = run("quantize", "--help").stdout
    titles = re.findall(r"^(\w[\w ]*):$", text, re.MULTILINE)
    assert titles == [*QUANTIZE_SECTIONS, "Other options"]
    sections = dict(zip(titles, re.split(r"^\w[\w ]*:$", text, flags=re.MULTILINE)[1:]))
    params = {p.name: p for p in main.commands["quantize"].params if isinstance(p, click.Option)}
    for title, names in QUANTIZE_SECTIONS.items():
        assert set(LONG.findall(sections[title])) >= {o for n in names for o in params[n].opts if o.startswith("--")}
    assert LONG.findall(sections["Other options"]) == ["--help"]
    assert set(params) == {n for names in QUANTIZE_SECTIONS.values() for n in names}


def test_eval_help_promises_no_default_text():
    text = " ".join(run("eval", "--help").stdout.split())
    assert "--data PATH Evaluation text file: perplexity (give --data, --tasks or both)." in text
    assert "default: WikiText" not in text
    r = run("eval", "smollm2-135m")
    assert r.exit_code == 2 and r.stderr == ("error: give --data FILE (perplexity on a text), --tasks LIST (lm-eval "
                                             "tasks), or both\n")


def test_shell_completion():
    env = {"_BITSMITH_COMPLETE": "bash_complete", "COMP_WORDS": "bitsmith quantize --lossl", "COMP_CWORD": "2"}
    r = CliRunner().invoke(main, [], env=env, prog_name="bitsmith")
    assert r.exit_code == 0 and r.stdout == "plain,--lossless-rest\n"
    r = CliRunner().invoke(main, [], env={"_BITSMITH_COMPLETE": "bash_source"}, prog_name="bitsmith")
    assert "_bitsmith_completion()" in r.stdout
    assert "_BITSMITH_COMPLETE=bash_source bitsmith" in README.read_text()


def command_reference() -> str:
    text = README.read_text()
    return text.split("## Command line", 1)[1].split("\n## ", 1)[0]


def test_readme_command_reference_matches_help():
    reference = command_reference()
    shown = set().union(*(help_options(words) for words, _ in commands()))
    missing = sorted(o for o in shown if not re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", reference))
    assert not missing, f"options --help shows that README.md's command reference leaves out: {missing}"
    unknown = sorted(set(LONG.findall(reference)) - shown)
    assert not unknown, f"options README.md's command reference names that no --help shows: {unknown}"


def test_json_to_stdout_from_quantize_and_inspect(stories_path, tmp_path):
    out = tmp_path / "q"
    r = run("quantize", stories_path, "-o", out, "--method", "rtn", "--group-size", "32", "--json", "-")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["quantized_linears"] == 35 and "calibration" in summary
    r = run("inspect", out, "--json", "-")
    assert r.exit_code == 0, r.output
    table = json.loads(r.stdout)
    assert len(table["layers"]) == 35 and all(row["loss"] is None for row in table["layers"])   # RTN measures none
    lines = run("inspect", out).stdout.splitlines()
    header = lines[0].split()
    assert header[:2] == ["layer", "shape"] and "loss" in header
    assert {line.split()[header.index("loss")] for line in lines[1:36]} == {"-"}


def test_a_reader_that_leaves_early_stops_the_output_quietly(stories_path, tmp_path):
    """`bitsmith inspect OUT | head`: once the reader has gone, no traceback and no "internal error", exit 141 as
    git and coreutils do."""
    out = tmp_path / "q"
    assert run("quantize", stories_path, "-o", out, "--method", "rtn", "--group-size", "32").exit_code == 0
    read, write = os.pipe()
    os.close(read)                                                    # a reader that left before the first line
    with os.fdopen(write, "wb") as stdout:
        done = subprocess.run([sys.executable, "-m", "bitsmith", "inspect", str(out)], stdout=stdout,
                              stderr=subprocess.PIPE, text=True, timeout=120, check=False)
    assert (done.returncode, done.stderr) == (141, "")

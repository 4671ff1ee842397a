"""`bitsmith inspect --plot`: the plan as a PNG for a mixed-precision and a uniform checkpoint of stories260K; a
one-line refusal, and nothing written, without matplotlib or without the folder; `--json -` beside it."""
from __future__ import annotations

import json
import sys

import pytest
from click.testing import CliRunner

from bitsmith.cli.main import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, stories_path, text_dir):
    """A --target-bpw checkpoint, quantized with its summary as JSON on stdout."""
    out = tmp_path_factory.mktemp("plot") / "mixed"
    r = run("quantize", stories_path, "-o", out, "--target-bpw", "3.5", "--calib", text_dir / "tinystories_calib.txt",
            "--nsamples", "8", "--seqlen", "64", "--fisher-samples", "2", "--json", "-")
    assert r.exit_code == 0, r.output
    return out, json.loads(r.stdout)


@pytest.fixture(scope="module")
def uniform(tmp_path_factory, stories_path):
    out = tmp_path_factory.mktemp("plot") / "uniform"
    r = run("quantize", stories_path, "-o", out, "--method", "rtn", "--bits", "4", "--group-size", "32",
            "--seqlen", "64")
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture
def no_matplotlib(monkeypatch):
    """matplotlib, and every part of it already imported, made unimportable."""
    for name in [n for n in sys.modules if n == "matplotlib" or n.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)


def assert_figure(path):
    """A PNG that decodes, of a real figure's size, with more than a few colours."""
    pytest.importorskip("PIL")
    from PIL import Image
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 20_000
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
        assert width >= 500 and height >= 500
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 100


@pytest.mark.slow
def test_quantize_json_to_stdout_is_the_summary_alone(mixed):
    _, summary = mixed
    assert summary["target_bits_per_weight"] == 3.5 and summary["quantized_linears"] == 35
    assert 3.0 < summary["bits_per_weight"] <= 3.5 and summary["predicted_error"] > 0


@pytest.mark.slow
def test_plot_of_a_mixed_plan(mixed, tmp_path):
    pytest.importorskip("matplotlib")
    out, summary = mixed
    r = run("inspect", out, "--plot", tmp_path / "plan.png", "--json", "-")
    assert r.exit_code == 0, r.output
    table = json.loads(r.stdout)
    assert len({row["bits"] for row in table["layers"]}) > 1, "the plan is not mixed"
    assert table["totals"]["bpw"] == pytest.approx(summary["bits_per_weight"])
    assert_figure(tmp_path / "plan.png")


@pytest.mark.slow
def test_plot_of_a_uniform_plan(uniform, tmp_path):
    pytest.importorskip("matplotlib")
    r = run("inspect", uniform, "--plot", tmp_path / "plan.png")
    assert r.exit_code == 0, r.output
    assert "model.layers.4.self_attn.q_proj" in r.stdout
    assert_figure(tmp_path / "plan.png")


@pytest.mark.slow
def test_plot_without_matplotlib_is_one_line_and_writes_nothing(uniform, tmp_path, no_matplotlib):
    r = run("inspect", uniform, "--plot", tmp_path / "plan.png", "--json", tmp_path / "table.json")
    assert r.exit_code == 2
    assert r.output.count("\n") == 1 and "pip install 'bitsmith[plot]'" in r.stderr and r.stdout == ""
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("name, message", [("missing/plan.png", "no such folder"), ("plan.pdf", "name it *.png")])
def test_plot_path_that_cannot_be_written_is_refused(uniform, tmp_path, name, message):
    r = run("inspect", uniform, "--plot", tmp_path / name, "--json", tmp_path / "table.json")
    assert r.exit_code == 2 and r.stdout == "" and r.output.count("\n") == 1 and message in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_plot_of_a_folder_without_quantized_linears_is_refused(stories_path, tmp_path):
    assert run("compress", stories_path, "-o", tmp_path / "z").exit_code == 0
    r = run("inspect", tmp_path / "z", "--plot", tmp_path / "plan.png")
    assert r.exit_code == 2 and r.stdout == "" and "no quantized linears to draw" in r.stderr
    assert not (tmp_path / "plan.png").exists()

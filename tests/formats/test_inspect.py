"""The plan figure's pieces: linears laid out by kind (in the family's order) and block, cell labels, which error
is drawn, the title, the checks made before any work, and the PNG itself."""
from __future__ import annotations

import sys

import pytest

from bitsmith.calibration.adapter import LLAMA
from bitsmith.formats.errors import InputError
from bitsmith.formats.inspect import (
    OUTSIDE_BLOCKS,
    Grid,
    block_grid,
    cell_label,
    check_plot_path,
    error_measure,
    plan_title,
    plot_plan,
)


def row(name, bits=4, group_size=128, sym=False, predicted_error=None, loss=1.0):
    return {"name": name, "bits": bits, "group_size": group_size, "sym": sym, "predicted_error": predicted_error,
            "loss": loss}


def llama_rows(blocks, predicted=True):
    """Rows in the order a manifest lists them (sorted by name), with distinct errors."""
    names = sorted(f"model.layers.{i}.{kind}" for i in range(blocks) for kind in LLAMA.linears)
    return [row(n, bits=2 + k % 3, predicted_error=(k + 1) * 1e-3 if predicted else None, loss=k / 10)
            for k, n in enumerate(names)]


def test_kinds_follow_the_family_and_blocks_are_numeric():
    rows = llama_rows(12)
    grid = block_grid(rows, LLAMA.block_prefix, LLAMA.linears)
    assert grid.kinds == list(LLAMA.linears)
    assert grid.labels() == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert grid.blocks == [str(i) for i in range(12)]
    assert len(grid.cells) == len(rows)
    assert grid.cells[0, 10]["name"] == "model.layers.10.self_attn.q_proj"
    assert grid.cells[6, 2]["name"] == "model.layers.2.mlp.down_proj"


def test_linears_outside_blocks_and_unknown_kinds():
    rows = [row("model.layers.1.mlp.extra_proj"), row("model.layers.0.self_attn.q_proj"), row("lm_head")]
    grid = block_grid(rows, LLAMA.block_prefix, LLAMA.linears)
    assert grid.kinds == ["self_attn.q_proj", "mlp.extra_proj", "lm_head"]
    assert grid.blocks == ["0", "1", OUTSIDE_BLOCKS]
    assert grid.cells[2, 2]["name"] == "lm_head" and (1, 0) not in grid.cells


def test_labels_stay_whole_where_their_last_part_is_shared():
    grid = Grid(["attn.out_proj", "cross.out_proj", "mlp.fc1"], ["0"])
    assert grid.labels() == ["attn.out_proj", "cross.out_proj", "fc1"]


@pytest.mark.parametrize("bits, group_size, sym, label", [
    (3, 64, False, "3/g64"), (4, 128, True, "4/g128s"), (2, -1, False, "2/ch"), (8, -1, True, "8/chs")])
def test_cell_label(bits, group_size, sym, label):
    assert cell_label(row("x", bits, group_size, sym)) == label


@pytest.mark.parametrize("outliers, label", [(0.01, "3/g128+1%"), (0.005, "3/g128+0.5%"), (0.0, "3/g128")])
def test_cell_label_with_outliers(outliers, label):
    assert cell_label({**row("x", 3, 128), "outliers": outliers}) == label


def test_error_measure_falls_back_to_the_loss():
    assert error_measure(llama_rows(1))[0] == "predicted_error"
    key, caption = error_measure(llama_rows(1, predicted=False))
    assert key == "loss" and "no predicted errors" in caption
    partly = llama_rows(1)
    partly[3]["predicted_error"] = None
    assert error_measure(partly)[0] == "loss"


def test_title():
    totals = {"model": "../assets/models/stories260K", "target_bpw": 3.5, "bpw": 3.4966}
    assert plan_title(totals, "out") == "stories260K: target 3.5 bpw, achieved 3.497 bpw all-in"
    assert plan_title({**totals, "model": None, "target_bpw": None}, "/tmp/q") == \
        "q: no target, achieved 3.497 bpw all-in"


def test_plot_path_checks(tmp_path, monkeypatch):
    with pytest.raises(InputError, match="no such folder"):
        check_plot_path(tmp_path / "missing" / "plan.png")
    with pytest.raises(InputError, match=r"name it \*\.png"):
        check_plot_path(tmp_path / "plan.svg")
    for name in [n for n in sys.modules if n.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(InputError, match=r"pip install 'bitsmith\[plot\]'"):
        check_plot_path(tmp_path / "plan.png")


@pytest.mark.parametrize("predicted, loss", [(True, "measured"), (False, "measured"), (False, 0.0), (False, None)])
def test_plot_writes_a_png(tmp_path, predicted, loss):
    pytest.importorskip("matplotlib")
    rows = llama_rows(3, predicted)
    if loss != "measured":                           # all zero, or None where the method measures none (RTN)
        rows = [{**r, "loss": loss} for r in rows]
    grid = block_grid(rows, LLAMA.block_prefix, LLAMA.linears)
    plot_plan(grid, "title", *error_measure(rows), tmp_path / "plan.png")
    data = (tmp_path / "plan.png").read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
    assert [p.name for p in tmp_path.iterdir()] == ["plan.png"]

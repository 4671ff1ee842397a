"""End to end on stories260K with a hand-written plan: quantize under it (perplexity measured on the way), then
load, evaluate, verify and inspect the result (the layout tests of lookup tables and per-input-channel grids)."""
from __future__ import annotations

import json

from click.testing import CliRunner

import bitsmith
from bitsmith.calibration import data
from bitsmith.calibration.adapter import BlockRunner
from bitsmith.calibration.perplexity import evaluate
from bitsmith.cli.main import main
from bitsmith.formats.source import open_source
from bitsmith.kernels.linear import QuantizedLinear
from bitsmith.pipeline import linear_shapes

CALIB = ["--nsamples", "16", "--seqlen", "128", "--seed", "0"]
EVAL_TOKENS = 4096
STORIES_WEIGHTS = 5 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 172 * 64)      # stories260K's decoder linears


def nbits(tensors) -> int:
    return sum(8 * t.numel() * t.element_size() for t in tensors.values())


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def linear_names(stories_path) -> list[str]:
    return list(linear_shapes(BlockRunner(open_source(str(stories_path)).config)))


def quantize_planned(tmp_path, stories_path, stories_split, entry_of) -> tuple:
    """Quantize under the plan whose entry for each linear is `entry_of(name)`; (folder, quantize summary)."""
    calib, held = stories_split
    plan = {"layers": {name: entry_of(name) for name in linear_names(stories_path)}}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    out = tmp_path / "planned"
    r = cli("quantize", stories_path, "-o", out, "--plan", tmp_path / "plan.json", "--calib", calib, *CALIB,
            "--eval-data", held, "--eval-seqlen", "128", "--eval-max-tokens", EVAL_TOKENS,
            "--json", tmp_path / "summary.json")
    assert r.exit_code == 0, r.output
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "bitsmith"
    return out, json.loads((tmp_path / "summary.json").read_text())


def check_loaded_and_inspected(tmp_path, out, summary, held, special: set[str], module_type, flag: str,
                               label: str) -> None:
    """The `special` linears load as `module_type`, the rest as QuantizedLinear; the loaded model gives the
    quantize-time perplexity again; the folder verifies; inspect flags them (`flag`) and labels them `label`."""
    names = list(json.loads((out / "plan.json").read_text())["layers"])
    model = bitsmith.load(str(out))
    assert {n for n in names if isinstance(model.get_submodule(n), module_type)} == special
    assert all(isinstance(model.get_submodule(n), QuantizedLinear) for n in names if n not in special)
    ids = data.tokenize(open_source(str(out)).tokenizer(), held.read_text())
    loaded = evaluate(model, data.eval_windows(ids, 128, EVAL_TOKENS), progress=False)
    assert loaded["perplexity"] == summary["eval"]["perplexity"]

    assert cli("verify", out).exit_code == 0
    r = cli("inspect", out, "--json", tmp_path / "inspect.json")
    assert r.exit_code == 0, r.output
    rows = {row["name"]: row for row in json.loads((tmp_path / "inspect.json").read_text())["layers"]}
    assert {n for n, row in rows.items() if row[flag]} == special
    line = next(li for li in r.output.splitlines() if li.startswith(min(special)))
    assert line.split()[3] == label


def written_bits(out, parts: tuple[str, ...]) -> int:
    """Bits of the tensors of `out`'s model.safetensors whose names end in one of `parts`."""
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        return sum(8 * f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys()
                   if k.rsplit(".", 1)[-1] in parts)


def check_module_reproduces(qw, layer, module_type, seed: int) -> None:
    """The runtime module of `layer`'s layout, loaded with qw's tensors, is `module_type` and computes x Q^T:
    within bf16 rounding for a few rows (the CPU decode path's bf16 copy), exactly for more rows (dequantized for
    the call) and from its dense copy."""
    import torch

    from bitsmith.kernels.dispatch import CPU_INT4_MAX_M
    from bitsmith.layouts import layout_of
    out_features, in_features = qw.Q.shape
    module = layout_of(layer).module(in_features, out_features, layer, bias=False)
    module.load_state_dict(layout_of(layer).tensors(qw), strict=True)
    assert isinstance(module, module_type) and torch.equal(module.dequantize(), qw.Q)
    gen = torch.Generator().manual_seed(seed)
    for rows in (1, 3, 8, CPU_INT4_MAX_M):                  # decode: the bf16 copy
        x = torch.randn(rows, in_features, generator=gen)
        decode, want = module(x), x @ qw.Q.t()
        assert ((decode - want).norm() / want.norm()).item() < 2 ** -7
    long = torch.randn(CPU_INT4_MAX_M + 1, in_features, generator=gen)
    assert torch.equal(module(long), long @ qw.Q.t())
    module.cache_dequantized()
    assert torch.equal(module(x), x @ qw.Q.t())

"""--device and --offload-activations: the device-agnostic path on CPU, and what a machine without CUDA refuses."""
from __future__ import annotations

import pytest
import torch
from hostile_support import refused, run, tree

from bitsmith.calibration.adapter import BlockRunner
from bitsmith.formats.source import open_source

CALIB_ARGS = ["--bits", "3", "--nsamples", "16", "--seqlen", "64"]
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible here")


@pytest.fixture
def calib(text_dir):
    return ["--calib", str(text_dir / "tinystories_calib.txt")]


def test_offloaded_activations_give_the_same_bytes(stories_path, calib, tmp_path):
    plain, offloaded = tmp_path / "plain", tmp_path / "offloaded"
    for out, extra in ((plain, []), (offloaded, ["--offload-activations"])):
        r = run("quantize", stories_path, "-o", out, *calib, *CALIB_ARGS, "--device", "cpu", *extra)
        assert r.exit_code == 0, r.output
    weights = lambda out: {k: v for k, v in tree(out).items() if k.endswith(".safetensors")}
    assert weights(plain) and weights(plain) == weights(offloaded)      # the options (in plan.json) say which


def test_auto_is_cpu_without_cuda_and_gives_the_cpu_bytes(stories_path, calib, tmp_path):
    for device in ("auto", "cpu"):
        r = run("quantize", stories_path, "-o", tmp_path / device, *calib, *CALIB_ARGS, "--device", device,
                "--json", tmp_path / f"{device}.json")
        assert r.exit_code == 0, r.output
    if not torch.cuda.is_available():
        assert '"device": "cpu"' in (tmp_path / "auto.json").read_text()
        assert tree(tmp_path / "auto") == tree(tmp_path / "cpu")


@no_cuda
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_a_visible_device_is_refused_in_one_line(stories_path, calib, tmp_path, device):
    r = run("quantize", stories_path, "-o", tmp_path / "out", *calib, *CALIB_ARGS, "--device", device)
    refused(r, f"error: --device {device}: no CUDA device is visible to torch (torch {torch.__version__})")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "gpu"])
def test_an_unknown_device_is_refused_in_one_line(stories_path, calib, tmp_path, device):
    r = run("quantize", stories_path, "-o", tmp_path / "out", *calib, *CALIB_ARGS, "--device", device)
    refused(r, f"error: --device {device}: choose cpu, cuda or cuda:N")
    assert not (tmp_path / "out").exists()


def test_a_block_fed_from_another_device_answers_on_that_device(stories_path):
    """forward_block moves a batch to the runner's device and its output back (here both CPU: the same code)."""
    source = open_source(str(stories_path))
    runner = BlockRunner(source.config, "cpu")
    block = runner.build_block(0, {n: source.get(n) for n in runner.block_names(0)})
    hidden = torch.randn(2, 16, runner.config.hidden_size)
    out = runner.forward_block(block, hidden, runner.position_embeddings(hidden))
    assert out.device == hidden.device and out.shape == hidden.shape and torch.isfinite(out).all()

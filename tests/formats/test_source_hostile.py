"""A model folder someone handed over with a config.json that does not describe its weights, tokenizer files that
do not parse, or weights holding NaN or Inf: quantize and eval refuse it with one line and exit 2, before any
output exists, and never write a NaN."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from hostile_support import never_blocks, refused, run, said, tree
from safetensors.torch import load_file, save_file

from bitsmith.formats.errors import InputError
from bitsmith.formats.source import open_source

FAST = ["--method", "rtn", "--bits", "4", "--group-size", "32"]


@pytest.fixture
def work(tmp_path, stories_path, text_dir):
    """A writable copy of stories260K in `model`, and the text to calibrate and evaluate on."""
    shutil.copytree(stories_path, tmp_path / "model")
    for f in (tmp_path / "model").iterdir():
        f.chmod(0o644)
    return tmp_path, tmp_path / "model", text_dir / "tinystories_calib.txt"


def set_config(model, **changes) -> None:
    config = json.loads((model / "config.json").read_text())
    for key, value in changes.items():
        if value is DROP:
            config.pop(key)
        else:
            config[key] = value
    (model / "config.json").write_text(json.dumps(config))


DROP = object()


def refused_everywhere(tmp_path, model, text, message: str) -> None:
    """open_source, quantize and eval refuse `model` with `message`; nothing is written."""
    before = tree(tmp_path)
    with pytest.raises(InputError) as e:
        open_source(str(model))
    assert str(e.value) == message
    refused(run("quantize", model, "-o", tmp_path / "out", "--calib", text, *FAST), f"error: {message}")
    refused(run("eval", model, "--data", text, "--seqlen", "64", "--max-tokens", "256"), f"error: {message}")
    assert tree(tmp_path) == before


@pytest.mark.parametrize("changes, problem", [
    ({"hidden_size": DROP}, "no hidden_size (every decoder's config gives it)"),
    ({"vocab_size": DROP}, "no vocab_size (every decoder's config gives it)"),
    ({"hidden_size": -64}, "hidden_size = -64, expected a positive integer"),
    ({"num_attention_heads": 0}, "num_attention_heads = 0, expected a positive integer"),
    ({"intermediate_size": 172.0}, "intermediate_size = 172.0, expected a positive integer"),
    ({"vocab_size": "512"}, "vocab_size = '512', expected a positive integer"),
    ({"num_hidden_layers": True}, "num_hidden_layers = True, expected a positive integer"),
    ({"max_position_embeddings": 0}, "max_position_embeddings = 0, expected a positive integer"),
    ({"num_attention_heads": 7}, "hidden_size 64 is not divisible by num_attention_heads 7"),
    ({"num_key_value_heads": 3}, "num_attention_heads 8 is not divisible by num_key_value_heads 3"),
    ({"num_hidden_layers": 3}, "num_hidden_layers 3, but the weights hold blocks model.layers.0 to model.layers.4"),
    ({"num_hidden_layers": 10**6}, ("num_hidden_layers 1000000, but the weights hold blocks model.layers.0 to "
                                    "model.layers.4")),
])
def test_config_sizes_that_do_not_fit_together_are_refused(work, changes, problem):
    tmp_path, model, text = work
    set_config(model, **changes)
    refused_everywhere(tmp_path, model, text, f"{model / 'config.json'}: {problem}")


@pytest.mark.parametrize("raw, problem", [
    (b"[64, 8]", "holds a JSON list, not an object"),
    (b'{"model_type": "llama",', ("not valid JSON (Expecting property name enclosed in double quotes: line 1 column "
                                 "24 (char 23))")),
    (b"\x80{}", "not valid JSON ('utf-8' codec can't decode byte 0x80 in position 0: invalid start byte)"),
])
def test_a_config_that_is_not_a_json_object_is_refused(work, raw, problem):
    tmp_path, model, text = work
    (model / "config.json").write_bytes(raw)
    refused_everywhere(tmp_path, model, text, f"{model / 'config.json'}: {problem}")


@pytest.mark.parametrize("changes, problem", [
    ({"rope_theta": "fast"}, "TypeError: unsupported operand type(s) for ** or pow(): 'str' and 'Tensor'"),
    ({"hidden_act": "nope"}, "KeyError: 'nope'"),
    ({"rms_norm_eps": "x"}, ("StrictDataclassFieldValidationError: Validation error for field 'rms_norm_eps': "
                             "TypeError: Field 'rms_norm_eps' expected float, got str (value: 'x')")),
])
def test_config_values_transformers_cannot_build_from_are_refused(work, changes, problem):
    tmp_path, model, text = work
    set_config(model, **changes)
    before = tree(tmp_path)
    message = f"error: model config: cannot build the model from it ({problem})"
    refused(run("quantize", model, "-o", tmp_path / "out", "--calib", text, *FAST), message)
    refused(run("eval", model, "--data", text, "--seqlen", "64", "--max-tokens", "256"), message)
    assert tree(tmp_path) == before


@pytest.mark.parametrize("changes, problem", [
    ({"hidden_size": 32}, "tensor model.embed_tokens.weight is [512, 64], its config implies [512, 32]"),
    ({"intermediate_size": 100}, ("tensor model.layers.0.mlp.gate_proj.weight is [172, 64], its config implies "
                                 "[100, 64]")),
    ({"vocab_size": 1000}, "tensor model.embed_tokens.weight is [512, 64], its config implies [1000, 64]"),
    ({"num_key_value_heads": 8}, ("tensor model.layers.0.self_attn.k_proj.weight is [32, 64], its config implies "
                                 "[64, 64]")),
])
def test_quantize_refuses_weights_that_do_not_fit_the_config_before_any_work(work, changes, problem):
    tmp_path, model, text = work
    set_config(model, **changes)
    before = tree(tmp_path)
    refused(run("quantize", model, "-o", tmp_path / "out", "--calib", text, *FAST), f"error: {model}: {problem}")
    assert tree(tmp_path) == before


# tokenizer files


@pytest.mark.parametrize("name, raw", [
    ("tokenizer.json", b'{"version": "1.0", "model": {"type": "BPE", "vocab": 5}}'),
    ("tokenizer.json", b"\x00\x01 not json"),
    ("tokenizer_config.json", b"[1, 2, 3]"),
])
def test_tokenizer_files_that_do_not_parse_are_refused(work, name, raw):
    tmp_path, model, text = work
    (model / name).write_bytes(raw)
    before = tree(tmp_path)
    r = run("eval", model, "--data", text, "--seqlen", "64", "--max-tokens", "256")
    assert r.exit_code == 2 and said_one(r).startswith(f"error: {model}: no usable tokenizer files (")
    r = run("quantize", model, "-o", tmp_path / "out", "--calib", text, "--method", "gptq", "--group-size", "32",
            "--nsamples", "2", "--seqlen", "32")
    assert r.exit_code == 2 and said_one(r).startswith(f"error: {model}: no usable tokenizer files (")
    assert tree(tmp_path) == before                   # the unfinished output is gone, its lock too


def said_one(r) -> str:
    """The one line the command printed (on stderr, stdout empty)."""
    lines = said(r.stderr)
    assert len(lines) == 1 and r.stdout == "", r.output
    return lines[0]


# model files that are not what their name says


def test_a_gguf_that_is_not_one_is_refused(tmp_path, text_dir):
    (tmp_path / "m.gguf").write_bytes(b"GGUF" + bytes(60))
    r = run("quantize", tmp_path / "m.gguf", "-o", tmp_path / "out", *FAST)
    assert r.exit_code == 2 and said_one(r).startswith(f"error: {tmp_path / 'm.gguf'}: not a readable GGUF file (")
    assert sorted(os.listdir(tmp_path)) == ["m.gguf"]


@pytest.mark.parametrize("name", ["m.gguf", "m.safetensors"])
def test_a_fifo_as_the_model_is_refused_unread(tmp_path, text_dir, name):
    os.mkfifo(tmp_path / name)
    message = (f"error: {tmp_path / name} is a FIFO (named pipe), not a regular file" if name.endswith(".gguf") else
               f"error: {tmp_path / name}: unsupported file type (expected a model folder or a .gguf file)")
    with never_blocks():
        refused(run("quantize", tmp_path / name, "-o", tmp_path / "out", *FAST), message)
        refused(run("eval", tmp_path / name, "--data", text_dir / "tinystories_calib.txt"), message)
    assert os.listdir(tmp_path) == [name]


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "model.safetensors"])
def test_a_fifo_inside_the_model_folder_is_refused_unread(work, name):
    tmp_path, model, text = work
    (model / name).unlink()
    os.mkfifo(model / name)
    message = f"{model}: {name!r} is a FIFO (named pipe), not a regular file"
    with never_blocks():
        refused_everywhere(tmp_path, model, text, message)


# NaN and Inf in the weights


@pytest.mark.parametrize("tensor, value, method", [
    ("model.embed_tokens.weight", float("nan"), "rtn"),
    ("model.norm.weight", float("inf"), "rtn"),
    ("model.layers.3.post_attention_layernorm.weight", float("-inf"), "rtn"),
    ("model.embed_tokens.weight", float("inf"), "gptq"),
    ("model.layers.1.mlp.up_proj.weight", float("nan"), "gptq"),
])
def test_weights_holding_nan_or_inf_are_never_quantized(work, tensor, value, method):
    tmp_path, model, text = work
    tensors = load_file(str(model / "model.safetensors"))
    tensors[tensor].view(-1)[5] = value
    save_file(tensors, str(model / "model.safetensors"))
    before = tree(tmp_path)
    r = run("quantize", model, "-o", tmp_path / "out", "--calib", text, "--method", method, "--group-size", "32",
            "--nsamples", "2", "--seqlen", "32")
    numel = tensors[tensor].numel()
    refused(r, f"error: {model}: tensor {tensor} holds NaN or Inf (1 of {numel} values); its quantized model "
               "would be broken")
    assert tree(tmp_path) == before


def test_eval_reports_no_nan_perplexity(work):
    tmp_path, model, text = work
    tensors = load_file(str(model / "model.safetensors"))
    tensors["model.norm.weight"][0] = float("nan")
    save_file(tensors, str(model / "model.safetensors"))
    before = tree(tmp_path)
    refused(run("eval", model, "--data", text, "--seqlen", "64", "--max-tokens", "128"),
            "error: the model gives NaN or Inf log-likelihoods on this text (its weights hold NaN or Inf, or overflow)")
    assert tree(tmp_path) == before


def test_finite_weights_pass_the_check(stories_path):
    source = open_source(str(stories_path), finite=True)
    assert torch.isfinite(source.get("model.norm.weight")).all()

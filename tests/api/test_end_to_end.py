"""quantize -> pack -> load -> eval on real models, against the unquantized model in the same test."""
import json

import pytest
import torch
from tests_support import ASSETS, needs_smollm2

import bitsmith
from bitsmith import pipeline
from bitsmith.calibration import data
from bitsmith.calibration.perplexity import evaluate
from bitsmith.formats.checkpoint import verify
from bitsmith.formats.source import open_source
from bitsmith.kernels.linear import QuantizedLinear
from bitsmith.plan import QuantizeOptions


@pytest.fixture(scope="module")
def stories_w4(tmp_path_factory, stories_path, stories_split):
    calib, held = stories_split
    out = tmp_path_factory.mktemp("q") / "stories-w4"
    summary = bitsmith.quantize(str(stories_path), str(out), method="gptq", bits=4, group_size=128,
                                calib=[str(calib)], nsamples=32, seqlen=256, seed=0, eval_data=str(held),
                                eval_seqlen=256, progress=False)
    return out, summary


def test_quantized_perplexity_close_to_base(stories_w4, stories_path, stories_split):
    out, _summary = stories_w4
    held = stories_split[1]
    windows = data.eval_windows(data.tokenize(open_source(str(stories_path)).tokenizer(), held.read_text()), 256)
    base = evaluate(bitsmith.load(str(stories_path)), windows, progress=False)
    quant = evaluate(bitsmith.load(str(out)), windows, base=bitsmith.load(str(stories_path)), progress=False)
    # W4 g128 GPTQ costs stories260K about 12 % perplexity in the reference (8.79 -> 9.86); allow 25 %
    assert base["perplexity"] < quant["perplexity"] < 1.25 * base["perplexity"]
    assert 0 < quant["kl"] < 0.5 and quant["top1_agreement"] > 0.7


def test_loaded_model_reproduces_the_perplexity_measured_while_quantizing(stories_w4, stories_path, stories_split):
    out, summary = stories_w4
    windows = data.eval_windows(data.tokenize(open_source(str(out)).tokenizer(), stories_split[1].read_text()), 256)
    loaded = evaluate(bitsmith.load(str(out)), windows, progress=False)
    assert loaded["tokens"] == summary["eval"]["tokens"]
    assert loaded["perplexity"] == summary["eval"]["perplexity"]


def test_checkpoint_layout_and_generate(stories_w4):
    out, summary = stories_w4
    assert verify(out) == []
    config = json.loads((out / "config.json").read_text())
    q = config["quantization_config"]
    assert (q["quant_method"], q["bits"], q["group_size"], q["checkpoint_format"]) == ("gptq", 4, 128, "gptq")
    assert (out / "tokenizer.json").exists()
    model = bitsmith.load(str(out))
    linears = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(linears) == 35 == summary["quantized_linears"]
    tok = open_source(str(out)).tokenizer()
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    gen = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert gen.shape[1] == ids.shape[1] + 12
    assert len(tok.decode(gen[0, ids.shape[1]:]).strip()) > 0


def test_same_inputs_same_bytes(tmp_path, stories_path, stories_split):
    outs = []
    for name in ("a", "b"):
        bitsmith.quantize(str(stories_path), str(tmp_path / name), method="gptq", bits=3, group_size=32,
                          calib=[str(stories_split[0])], nsamples=8, seqlen=128, progress=False)
        outs.append((tmp_path / name / "model.safetensors").read_bytes())
    assert outs[0] == outs[1]


@needs_smollm2
def test_smollm2_short_windows(tmp_path, text_dir):
    """The bundled 135M model end to end with short calibration windows (all 210 linears)."""
    out = tmp_path / "smol"
    summary = bitsmith.quantize("smollm2-135m", str(out), method="gptq", bits=4, group_size=128,
                                calib=[str(text_dir / "c4_calib.txt")], nsamples=8, seqlen=128, progress=False)
    assert summary["quantized_linears"] == 210
    assert 4.1 < summary["bits_per_weight"] < 4.3
    ids = data.tokenize(open_source(str(out)).tokenizer(), (ASSETS / "text" / "wikitext2_test.txt").read_text()[:40000])
    windows = data.eval_windows(ids, 256, 4 * 256)
    base = bitsmith.load("smollm2-135m")
    quant = evaluate(bitsmith.load(str(out)), windows, base=base, progress=False)
    base_ppl = evaluate(base, windows, progress=False)["perplexity"]
    assert base_ppl < 100          # the GGUF's rotary rows un-permuted right: a wrong layout gives thousands
    # 4-bit g128 costs SmolLM2 about 30 % perplexity with RTN (21.8 -> 30.0); GPTQ with tiny calibration
    # must stay clearly under RTN's loss, so allow 40 %
    assert base_ppl < quant["perplexity"] < 1.4 * base_ppl
    assert quant["top1_agreement"] > 0.6          # measured 0.70 with this calibration


def test_self_calibration_needs_no_text(tmp_path, stories_path):
    out = tmp_path / "self"
    summary = bitsmith.quantize(str(stories_path), str(out), method="gptq", bits=4, group_size=-1, calib=["self"],
                                nsamples=4, seqlen=32, progress=False)
    assert summary["calibration"].startswith("self: 4 x 32 tokens sampled from the model")
    manifest = json.loads((out / "bitsmith_manifest.json").read_text())
    assert manifest["calibration"]["description"] == summary["calibration"]
    assert verify(out) == []


def test_self_next_to_a_file_gives_half_the_windows_interleaved(stories_path, stories_split):
    source = open_source(str(stories_path))
    opts = QuantizeOptions(calib=[str(stories_split[0]), "self"], nsamples=5, seqlen=24, seed=3)
    windows, description = pipeline.calibration_windows(source, source.tokenizer(), opts, progress=False)
    assert windows.shape == (5, 24)
    text = data.tokenize(source.tokenizer(), data.read_text([str(stories_split[0])]))
    drawn = data.random_windows(text, 3, 24, 3)
    assert torch.equal(windows[0::2], drawn)              # the file's windows at even rows, the model's at odd
    model = bitsmith.load(str(stories_path))
    own = data.self_windows(model, 2, 24, 3, model.config.vocab_size)
    assert torch.equal(windows[1::2], own)
    assert description == (f"{stories_split[0]}: 3 x 24 tokens (seed 3), interleaved with 2 x 24 tokens sampled "
                           "from the model (seed 3)")


def test_w4a8_checkpoint_round_trip(tmp_path, stories_path, stories_split):
    """--method qoq: W4A8 layers written, loaded as W4A8Linear, and close to the base model."""
    from bitsmith.kernels.w4a8_linear import W4A8Linear
    out = tmp_path / "w4a8"
    bitsmith.quantize(str(stories_path), str(out), method="qoq", bits=4, group_size=-1,
                      calib=[str(stories_split[0])], nsamples=16, seqlen=256, progress=False)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (config["quant_method"], config["layer_format"]) == ("bitsmith", "w4a8-qoq")
    model = bitsmith.load(str(out))
    assert sum(isinstance(m, W4A8Linear) for m in model.modules()) == 35
    windows = data.eval_windows(data.tokenize(open_source(str(out)).tokenizer(), stories_split[1].read_text()), 256)
    base = evaluate(bitsmith.load(str(stories_path)), windows, progress=False)["perplexity"]
    quant = evaluate(model, windows, progress=False)["perplexity"]
    # measured here: base 7.74, W4A8 per-channel 8.65 (+12 %), GPTQ W4 per-channel 8.56, RTN 8.76; allow 25 %
    assert base < quant < 1.25 * base


def test_true_sequential_takes_later_hessians_after_earlier_groups(tmp_path, stories_path, stories_split):
    """q/k/v see the same inputs either way; o_proj's inputs pass through the quantized q/k/v only when
    true-sequential, so its codes change while block 0's q_proj codes stay identical."""
    from safetensors.torch import load_file
    stored = {}
    for mode in (False, True):
        out = tmp_path / str(mode)
        bitsmith.quantize(str(stories_path), str(out), method="gptq", bits=3, group_size=32, true_sequential=mode,
                          calib=[str(stories_split[0])], nsamples=8, seqlen=128, progress=False)
        stored[mode] = load_file(out / "model.safetensors")
        assert json.loads((out / "config.json").read_text())["quantization_config"]["true_sequential"] is mode
    layer = "model.layers.0.self_attn."
    assert torch.equal(stored[False][layer + "q_proj.qweight"], stored[True][layer + "q_proj.qweight"])
    assert not torch.equal(stored[False][layer + "o_proj.qweight"], stored[True][layer + "o_proj.qweight"])

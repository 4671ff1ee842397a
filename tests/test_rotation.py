"""bitsmith/rotation.py: the rotation matrices are orthogonal, a rotated model computes what the original does (tied
head or not, with or without biases, hidden widths that are not powers of two), and `quantize --rotate` writes an
ordinary checkpoint that loads with no extra operation and records how it was rotated."""
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import bitsmith
from bitsmith.formats.source import open_source
from bitsmith.loader import load_model
from bitsmith.rotation import RotatedSource, hadamard, hadamard_factors, paley, paley_type, randomized_hadamard


def _is_hadamard(h: torch.Tensor) -> bool:
    n = h.shape[0]
    return (torch.allclose(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
            and torch.allclose(h.abs(), torch.full((n, n), n ** -0.5, dtype=torch.float64)))


@pytest.mark.parametrize("n", [1, 2, 4, 64, 256, 12, 576, 960, 896, 1536])
def test_hadamard_is_orthonormal_with_entries_of_one_magnitude(n):
    assert _is_hadamard(hadamard(n))


@pytest.mark.parametrize("n, kind", [(4, 1), (12, 1), (20, 1), (44, 1), (28, 2), (36, 2), (60, 1), (76, 2)])
def test_paley_makes_hadamard_matrices_of_both_types(n, kind):
    assert paley_type(n) == kind and _is_hadamard(paley(n))


@pytest.mark.parametrize("n, factors", [(576, (12, 12, 4)), (960, (12, 20, 4)), (896, (28, 32)), (2048, (2048,)),
                                        (1, ())])
def test_hadamard_factors_take_the_smallest_paley_orders_then_a_power_of_two(n, factors):
    assert hadamard_factors(n) == factors


@pytest.mark.parametrize("n", [0, 3, 6, 90, 188])
def test_hadamard_refuses_orders_it_cannot_make(n):
    assert hadamard_factors(n) is None
    with pytest.raises(ValueError, match="no Hadamard matrix of order"):
        hadamard(n)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 200), st.integers(0, 2**31 - 1))
def test_randomized_hadamard_is_orthogonal_at_every_width(n, seed):
    q = randomized_hadamard(n, torch.Generator().manual_seed(seed))
    assert q.shape == (n, n)
    assert torch.allclose(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-10)


@pytest.mark.parametrize("i", [0, 5, 575])
def test_randomized_hadamard_spreads_a_spike_evenly_over_every_coordinate(i):
    """Incoherence at SmolLM2's width (576 = 12 x 12 x 4): a one-hot vector comes out with every coordinate 1/24."""
    q = randomized_hadamard(576, torch.Generator().manual_seed(0))
    out = torch.eye(576, dtype=torch.float64)[i] @ q
    assert torch.allclose(out.abs(), torch.full((576,), 1 / 24, dtype=torch.float64))


def test_randomized_hadamard_falls_back_to_a_random_orthogonal_factor_where_no_hadamard_matrix_is_made():
    """188 = 47 x 4: orthogonal(47) kron hadamard(4); a spike spreads over at least the 4 of the Sylvester factor."""
    q = randomized_hadamard(188, torch.Generator().manual_seed(0))
    out = torch.eye(188, dtype=torch.float64)[0] @ q
    assert torch.allclose(q @ q.T, torch.eye(188, dtype=torch.float64), atol=1e-10)
    assert (out.abs() > 1e-12).sum() >= 4 and out.abs().max() <= 0.5 + 1e-12


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_the_rotated_stories260k_computes_the_same_logits(stories_path):
    source = open_source(str(stories_path))
    rotated = RotatedSource(source, seed=0)
    assert source.config["tie_word_embeddings"] and not rotated.config["tie_word_embeddings"]
    assert "lm_head.weight" in rotated and rotated.shape("lm_head.weight") == source.shape("model.embed_tokens.weight")
    assert torch.equal(rotated.get("model.layers.2.input_layernorm.weight"), torch.ones(64))
    q = "model.layers.0.self_attn.q_proj.weight"
    assert (rotated.get(q) - source.get(q)).abs().max() > 0.1              # not the identity
    ids = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(1))
    plain, turned = _logits(load_model(source), ids), _logits(load_model(rotated), ids)
    assert (turned - plain).abs().max() < 1e-4 * plain.abs().max()


@pytest.mark.parametrize("hidden, heads, kv_heads", [(96, 6, 2), (90, 3, 1)])
def test_a_model_with_biases_and_an_odd_width_keeps_its_function(tmp_path, hidden, heads, kv_heads):
    """Llama with attention and MLP biases (o_proj's and down_proj's biases are added to the residual, v_proj's are
    mixed by attention), an lm_head of its own, hidden width 96 = 12 x 8 (a Paley-Sylvester Hadamard matrix) or 90
    = 3 heads of 30 (no Hadamard matrix of either order: the random orthogonal factor on the residual and the heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=160, num_hidden_layers=2, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, vocab_size=128, max_position_embeddings=64, attention_bias=True,
                         mlp_bias=True, tie_word_embeddings=False)
    net = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(1 + 0.5 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(config.to_json_string())
    source = open_source(str(tmp_path))
    rotated = RotatedSource(source, seed=3)
    assert (rotated.get("model.layers.1.self_attn.o_proj.bias") - source.get("model.layers.1.self_attn.o_proj.bias")
            ).abs().max() > 0.01
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(2))
    plain, turned = _logits(load_model(source), ids), _logits(load_model(rotated), ids)
    assert (turned - plain).abs().max() < 1e-4 * plain.abs().max()


def test_the_fingerprint_names_the_rotation(stories_path):
    source = open_source(str(stories_path))
    prints = {source.fingerprint(), RotatedSource(source, 0).fingerprint(), RotatedSource(source, 1).fingerprint()}
    assert len(prints) == 3 and RotatedSource(source, 1).fingerprint() == RotatedSource(source, 1).fingerprint()


def test_quantize_rotate_writes_an_ordinary_checkpoint_of_the_same_model(tmp_path, stories_path, stories_split):
    """8-bit grids on the rotated model: the loaded checkpoint is the original model to within 8-bit rounding (KL
    to the unrotated original), its config a GPTQ one with an lm_head of its own, and the rotation recorded."""
    calib, held = stories_split
    out = tmp_path / "rotated"
    summary = bitsmith.quantize(str(stories_path), str(out), bits=8, group_size=32, calib=[str(calib)], nsamples=8,
                                seqlen=128, rotate=True, progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["quantization_config"]["quant_method"] == "gptq"
    manifest = json.loads((out / "bitsmith_manifest.json").read_text())
    assert manifest["rotation"]["seed"] == 0 and manifest["rotation"]["untied_lm_head"] is True
    assert manifest["source"]["fingerprint"] == open_source(str(stories_path)).fingerprint()
    assert summary["source_bf16_bytes"] == 2 * sum(open_source(str(stories_path)).numel(n)
                                                   for n in open_source(str(stories_path)))
    from bitsmith.calibration import data
    from bitsmith.calibration.perplexity import evaluate
    ids = data.tokenize(open_source(str(stories_path)).tokenizer(), held.read_text())
    windows = data.eval_windows(ids, 128)[:8]
    close = evaluate(bitsmith.load(str(out)), windows, base=bitsmith.load(str(stories_path)), progress=False)
    assert close["kl"] < 2e-3 and close["top1_agreement"] > 0.97
    from click.testing import CliRunner

    from bitsmith.cli.main import main
    shown = CliRunner().invoke(main, ["inspect", str(out)])
    assert shown.exit_code == 0
    assert "rotated (seed 0): residual stream by signs x hadamard(64)" in shown.output
    assert "lm_head untied from the embedding" in shown.output


def test_a_config_whose_widths_the_weights_do_not_have_is_refused_before_any_rotation_is_built(tmp_path, stories_path,
                                                                                             stories_split):
    """hidden_size 2**20 (a 2^20 x 2^20 rotation, 8 TiB) in a config over stories260K's 64-wide weights: one clear
    error from the shape check, nothing allocated, nothing written."""
    import shutil

    from bitsmith.formats.errors import InputError
    folder = tmp_path / "lying"
    shutil.copytree(stories_path, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "hidden_size": 2 ** 20}))
    with pytest.raises(InputError, match="its config implies"):
        bitsmith.quantize(str(folder), str(tmp_path / "out"), bits=4, group_size=32, calib=[str(stories_split[0])],
                          nsamples=4, seqlen=64, rotate=True, progress=False)
    assert not (tmp_path / "out").exists()

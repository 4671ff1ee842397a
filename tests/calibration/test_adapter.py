"""Block-by-block execution through transformers' own modules reproduces the whole model's forward."""
import pytest
import torch
import torch.nn.functional as F

from bitsmith.calibration.adapter import AttentionCache, BlockRunner, family_of
from bitsmith.formats.errors import InputError
from bitsmith.formats.source import open_source

TINY = {"vocab_size": 96, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 128}


def blockwise_logits(runner, weights, ids, tied):
    h = F.embedding(ids, weights["model.embed_tokens.weight"])
    pos = runner.position_embeddings(h)
    for i in range(runner.n_blocks):
        block = runner.build_block(i, {n: weights[n] for n in runner.block_names(i)})
        h = runner.forward_block(block, h, pos)
        runner.release_block(i)
    norm = runner.model.model.norm.to_empty(device="cpu")
    norm.weight.data = weights["model.norm.weight"]
    head = weights["model.embed_tokens.weight" if tied else "lm_head.weight"]
    return norm(h) @ head.t()


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
def test_tiny_random_families(model_type):
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **TINY)
    model = AutoModelForCausalLM.from_config(config).eval()
    weights = {k: v.detach() for k, v in model.state_dict().items()}
    runner = BlockRunner({**config.to_dict(), "model_type": model_type})
    ids = torch.randint(0, 96, (2, 40))
    with torch.no_grad():
        expected = model(ids).logits
        got = blockwise_logits(runner, weights, ids, config.tie_word_embeddings)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("autocast", [False, True])
def test_a_block_from_its_attention_output_is_the_whole_forward_bit_for_bit(model_type, autocast):
    """forward_after_attention(x, a), a the attention output a whole forward of x computed (o_proj's input), is
    that forward's output to the bit, in float32 and under bf16 autocast; an AttentionCache keeps a once q/k/v are
    final and gives the same outputs from it, and keeps nothing before; folded into the stream (x + o_proj(a)), the
    MLP half alone gives them too."""
    from transformers import AutoConfig
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **TINY)
    runner = BlockRunner({**config.to_dict(), "model_type": model_type})
    weights = {n: torch.randn(runner.model.model.layers[1].state_dict()[n[len("model.layers.1."):]].shape) * 0.2
               for n in runner.block_names(1)}
    block = runner.build_block(1, weights)
    x = torch.randn(6, 40, TINY["hidden_size"])
    pos = runner.position_embeddings(x)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        whole = runner.forward_block(block, x, pos)
        early = AttentionCache("cpu")
        assert torch.equal(early.forward(runner, block, x[:4], pos, slice(0, 4)), whole[:4]) and not early.kept
        cache = AttentionCache("cpu", final=True)
        first = [cache.forward(runner, block, x[s:s + 4], pos, slice(s, s + 4)) for s in (0, 4)]
        assert sorted(cache.kept) == [0, 4]
        assert cache.kept[0].dtype == (torch.bfloat16 if autocast else torch.float32)
        again = [cache.forward(runner, block, x[s:s + 4], pos, slice(s, s + 4)) for s in (0, 4)]
        direct = runner.forward_after_attention(block, x, torch.cat([cache.kept[0], cache.kept[4]]))
        stream = x.clone()
        cache.fold(runner, block, stream, slice(4, 8))       # one batch, then the rest
        cache.fold(runner, block, stream)
        folded = [cache.forward(runner, block, stream[s:s + 4], pos, slice(s, s + 4)) for s in (0, 4)]
    assert torch.equal(torch.cat(first), whole) and torch.equal(torch.cat(again), whole)
    assert torch.equal(direct, whole) and torch.equal(torch.cat(folded), whole)
    assert not cache.kept and cache.folded == {0, 4}


def test_stories260k_blockwise_equals_full_model(stories_path):
    from transformers import AutoModelForCausalLM
    source = open_source(str(stories_path))
    full = AutoModelForCausalLM.from_pretrained(str(stories_path), dtype=torch.float32).eval()
    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    weights = {n: source.get(n).float() for n in source}
    with torch.no_grad():
        assert torch.equal(blockwise_logits(BlockRunner(source.config), weights, ids, True), full(ids).logits)


def test_unknown_architecture_named():
    with pytest.raises(InputError, match="unsupported architecture 'gpt2'"):
        family_of({"model_type": "gpt2"})

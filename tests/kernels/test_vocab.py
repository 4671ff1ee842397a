"""The vocabulary matrix held in bf16 in a float32 model (bitsmith/kernels/vocab.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bitsmith
from bitsmith.kernels import vocab
from bitsmith.kernels.dispatch import CPU_INT4_MAX_M
from bitsmith.kernels.vocab import HeldEmbedding, HeldProjection


def matrix(V: int, K: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(V, K, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def test_lookup_is_the_float32_embedding_bit_for_bit():
    W = matrix(300, 24)
    ids = torch.randint(0, 300, (3, 17), generator=torch.Generator().manual_seed(1))
    out = HeldEmbedding(W, torch.float32, padding_idx=0)(ids)
    assert out.dtype == torch.float32
    assert torch.equal(out, F.embedding(ids, W.float()))


@pytest.mark.parametrize("M", [1, 3, CPU_INT4_MAX_M, CPU_INT4_MAX_M + 1, 130])
def test_projection_few_rows_in_bf16_many_rows_exact(monkeypatch, M):
    monkeypatch.setattr(vocab, "SLICE", 64)               # slices end inside the vocabulary and at a ragged end
    W, bias = matrix(64 * 3 + 5, 40), torch.randn(64 * 3 + 5)
    x = torch.randn(2, M, 40, generator=torch.Generator().manual_seed(M))
    y = HeldProjection(W, bias)(x)
    exact = F.linear(x, W.float(), bias)
    assert y.shape == exact.shape and y.dtype == torch.float32
    if 2 * M <= CPU_INT4_MAX_M:     # rows of both batch entries together
        assert torch.equal(y, F.linear(x.to(torch.bfloat16), W).float() + bias)
        torch.testing.assert_close(y, exact, rtol=0, atol=2 ** -8 * x.abs().max().item() * W.float().abs().sum(1).max().item())
    else:
        torch.testing.assert_close(y, exact, rtol=1e-5, atol=1e-5)


@pytest.fixture
def quantized_bf16(tmp_path, stories_bf16):
    out = tmp_path / "w4"
    bitsmith.quantize(str(stories_bf16), str(out), method="rtn", bits=4, group_size=32, progress=False)
    return out


def upcast_vocabulary(net) -> None:
    """The model as loaded before the vocabulary was held: float32 embedding and tied projection."""
    W = net.get_input_embeddings().weight.float()
    embedding = nn.Embedding.from_pretrained(W, freeze=True)
    net.set_input_embeddings(embedding)
    projection = nn.Linear(W.shape[1], W.shape[0], bias=False)
    projection.weight = embedding.weight
    net.set_output_embeddings(projection)


def test_load_holds_a_bf16_vocabulary_once_and_computes_in_float32(quantized_bf16):
    net = bitsmith.load(str(quantized_bf16))
    embedding, projection = net.get_input_embeddings(), net.get_output_embeddings()
    assert isinstance(embedding, HeldEmbedding) and isinstance(projection, HeldProjection)
    assert embedding.weight.dtype == torch.bfloat16
    assert projection.weight.data_ptr() == embedding.weight.data_ptr()       # tied: one matrix
    assert (embedding.num_embeddings, embedding.embedding_dim) == (projection.out_features, projection.in_features)
    assert (embedding.num_embeddings, embedding.embedding_dim) == (512, 64)
    assert net.dtype == torch.float32
    reference = bitsmith.load(str(quantized_bf16))
    upcast_vocabulary(reference)
    ids = torch.randint(3, 512, (1, 100), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(net(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)
        few, exact = net(ids[:, :8]).logits, reference(ids[:, :8]).logits
    assert (few - exact).abs().max() < 0.02 * exact.abs().max()              # bf16 activations at decode
    prompt = ids[:, :4]
    out = net.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert out.shape == (1, 10) and torch.equal(out[:, :4], prompt)


def test_other_dtypes_cast_as_before(quantized_bf16, stories_path):
    net = bitsmith.load(str(quantized_bf16), dtype=torch.bfloat16)
    assert type(net.get_input_embeddings()) is nn.Embedding
    assert net.get_input_embeddings().weight.dtype == torch.bfloat16
    net = bitsmith.load(str(stories_path))                               # stored in float32: nothing to hold
    assert type(net.get_input_embeddings()) is nn.Embedding
    assert net.get_input_embeddings().weight.dtype == torch.float32
    assert net.get_output_embeddings().weight is net.get_input_embeddings().weight


def test_dequantized_load_multiplies_by_the_float32_vocabulary_at_every_length(quantized_bf16):
    net = bitsmith.load(str(quantized_bf16), dequantized=True)
    projection = net.get_output_embeddings()
    assert isinstance(projection, HeldProjection) and projection._dense.dtype == torch.float32
    x = torch.randn(1, 3, 64)
    assert torch.equal(projection(x), F.linear(x, projection.weight.float()))

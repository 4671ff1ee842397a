"""The vocabulary matrix held as stored: a token embedding (and the output projection, tied to it or not) that the
checkpoint stores in bfloat16, in a model that computes in float32.

Upcast at load, the vocabulary matrix is the largest float32 tensor of a small quantized model (SmolLM2-135M:
49,152 x 576, 113 MB, against 53 MB for all its 4-bit linears) and the output projection reads all of it for every
decoded token. Held in bfloat16 it is half of that, and nothing is lost in the weights (bf16 -> fp32 is exact):
  - the lookup upcasts the rows it reads: bitwise the float32 embedding;
  - a projection of a few rows (decode, M <= dispatch.CPU_INT4_MAX_M) multiplies bf16 x by the bf16 matrix with
    float32 accumulation: x is rounded to bf16 (about 2^-9 relative), as every quantized linear's cpu_int4 path
    already does at decode;
  - a longer one (prefill, evaluation) upcasts the matrix a slice of SLICE rows at a time and multiplies in
    float32: the float32 product, each logit's dot product over the same K;
  - `cache_dequantized` (`bitsmith.load(dequantized=True)`, evaluation) keeps a float32 copy for every length.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .cpu import bf16_product
from .dispatch import CPU_INT4_MAX_M

SLICE = 4096          # vocabulary rows upcast at once for a long projection: 9.4 MB of float32 at K = 576


class HeldEmbedding(nn.Module):
    """nn.Embedding over a bf16 matrix, rows returned in `dtype`."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype, padding_idx: int | None = None):
        super().__init__()
        self.register_buffer("weight", weight)      # a buffer: the model's dtype stays that of its parameters
        self.compute_dtype, self.padding_idx = dtype, padding_idx

    @property
    def num_embeddings(self) -> int:
        return self.weight.shape[0]

    @property
    def embedding_dim(self) -> int:
        return self.weight.shape[1]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight, self.padding_idx).to(self.compute_dtype)


class HeldProjection(nn.Module):
    """nn.Linear onto the vocabulary over a bf16 matrix [V, K] (module docstring)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self._dense = None

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def cache_dequantized(self, dtype: torch.dtype = torch.float32) -> None:
        """Keep the matrix in `dtype` too and multiply by it at every length (`bitsmith.load(dequantized=True)`,
        evaluation): exact, at the float32 model's memory."""
        self._dense = self.weight.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._dense is not None:
            return F.linear(x, self._dense.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        rows = x.reshape(-1, x.shape[-1])
        if len(rows) <= CPU_INT4_MAX_M:
            y = bf16_product(rows, self.weight)
        else:
            y = torch.empty(len(rows), len(self.weight), dtype=x.dtype, device=x.device)
            for start in range(0, len(self.weight), SLICE):
                part = self.weight[start:start + SLICE]
                y[:, start:start + len(part)] = rows @ part.to(x.dtype).t()
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], len(self.weight))


def hold_vocabulary(net: nn.Module, dtype: torch.dtype) -> None:
    """Give `net` its input and output embeddings in `dtype` (their tensors still as stored): a plain embedding or
    projection over a bf16 matrix in a float32 model becomes a held module, a tied pair keeping one matrix; every
    other one is cast to `dtype`."""
    embedding, projection = net.get_input_embeddings(), net.get_output_embeddings()
    held = dtype == torch.float32
    if held and type(embedding) is nn.Embedding and embedding.weight.dtype == torch.bfloat16:
        net.set_input_embeddings(HeldEmbedding(embedding.weight.data, dtype, embedding.padding_idx))
    elif embedding is not None:
        _cast(embedding, dtype)
    if held and type(projection) is nn.Linear and projection.weight.dtype == torch.bfloat16:
        bias = None if projection.bias is None else projection.bias.data.to(dtype)
        net.set_output_embeddings(HeldProjection(projection.weight.data, bias))
    elif projection is not None:
        _cast(projection, dtype)


def _cast(module: nn.Module, dtype: torch.dtype) -> None:
    for p in module.parameters(recurse=False):
        p.data = p.data.to(dtype)

"""BF16 bit patterns shared by the tests of the lossless codec and its decoders."""
from __future__ import annotations

import numpy as np
import torch
from hypothesis import strategies as st

SPECIAL = [0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC0, 0xFFC1, 0x7F81, 0x0001, 0x807F, 0x3F80, 0x7F7F]  # +-0, +-inf,
# NaNs with payloads, subnormals, 1.0, the largest finite value


def bf16(bits) -> torch.Tensor:
    return torch.from_numpy(np.asarray(bits, dtype=np.uint16).view(np.int16)).view(torch.bfloat16)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.cpu().view(torch.int16), b.cpu().view(torch.int16))


def weights_like(n: int, seed: int = 0, scale: float = 0.02) -> torch.Tensor:
    return (torch.randn(n, generator=torch.Generator().manual_seed(seed)) * scale).to(torch.bfloat16)


def bit_patterns(max_size: int = 700) -> st.SearchStrategy[list[int]]:
    """Any bits, special values only, one distinct value, weight-like values of odd sizes."""
    return st.one_of(
        st.lists(st.integers(0, 0xFFFF), max_size=max_size),
        st.lists(st.sampled_from(SPECIAL), max_size=max_size * 3 // 7),
        st.builds(lambda n, v: [v] * n, st.integers(1, max_size * 5 // 7), st.integers(0, 0xFFFF)),
        st.builds(lambda n, seed: weights_like(n, seed).view(torch.int16).numpy().view(np.uint16).tolist(),
                  st.integers(0, max_size * 30 // 7), st.integers(0, 99)),
    )


def one_bit_code_weights(n: int, seed: int) -> torch.Tensor:
    """Most values share one exponent (a 1-bit codeword), so a byte can end up to eight codewords."""
    rng = np.random.default_rng(seed)
    exponent = np.where(rng.random(n) < 0.9, 120, rng.integers(100, 127, n)).astype(np.uint16)
    return bf16((exponent << 7) | (rng.integers(0, 1 << 16, n).astype(np.uint16) & 0x807F))

"""Bit packing of b-bit integer codes into int32 words (GPTQ convention).

Codes are laid out as one little-endian bit stream along the packed dimension: value i of a run of 32
occupies bits [i*b, (i+1)*b) of the stream, and word j holds stream bits [32j, 32j+32). For b in {2, 4, 8}
this is the familiar "32/b values per int32, low bits first"; for b = 3 values straddle word boundaries
exactly as AutoGPTQ/GPTQModel pack 3-bit weights (32 values in 3 words), and b = 5, 6 and 7 straddle the same way
(32 values in b words; the GPTQ convention stops at 2, 3, 4 and 8 bits, `GPTQ_BITS`). Grids take the widths of
`SUPPORTED_BITS`; any width of `PACKED_BITS` packs (the 5- and 7-bit indices of codebooks of pairs).

A packed run of n codes is ceil(n * b / 32) words, the words its bit stream touches: the shape GPTQModel gives
qweight [ceil(in * b / 32), out] and qzeros [G, ceil(out * b / 32)] (nn_modules/qlinear/__init__.py,
`_register_gptq_buffers`), which loaders check tensor shapes against. The last word is zero-padded. Earlier
versions padded every run to whole blocks of 32 codes (b words); `unpack` reads those too.
"""
from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
GPTQ_BITS = (2, 3, 4, 8)           # the widths GPTQ loaders and their kernels read
PACKED_BITS = (2, 3, 4, 5, 6, 7, 8)   # every width `pack` and `unpack` take


def packed_length(n: int, bits: int) -> int:
    """Number of int32 words holding n codes of `bits` bits: ceil(n * bits / 32)."""
    return -(-n * bits // 32)


def earlier_length(n: int, bits: int) -> int:
    """Words an earlier version packed n codes into: whole runs of 32 codes."""
    return -(-n // 32) * bits


def trim_earlier_padding(packed: torch.Tensor, n: int, bits: int, dim: int) -> torch.Tensor:
    """`packed` (n codes along `dim`) as `pack` writes it now: an earlier version's trailing words, which hold
    only zero padding, are dropped; any other tensor is returned as it is (the caller checks its shape)."""
    have, want = packed.shape[dim], packed_length(n, bits)
    if have != want and have == earlier_length(n, bits) and not packed.narrow(dim, want, have - want).any():
        return packed.narrow(dim, 0, want).contiguous()
    return packed


def pack(q: torch.Tensor, bits: int, dim: int = 0) -> torch.Tensor:
    """Pack unsigned codes `q` (values in [0, 2**bits)) along `dim` into int32 words."""
    _check_bits(bits)
    if q.numel() and (int(q.min()) < 0 or int(q.max()) >= 1 << bits):
        raise ValueError(f"codes out of range for {bits}-bit packing")
    q = q.movedim(dim, 0).to(torch.int64)
    n, rest = q.shape[0], q.shape[1:]
    pad = (-n) % 32
    if pad:
        q = torch.cat([q, q.new_zeros((pad, *rest))])
    runs = q.reshape(-1, 32, *rest)                                   # [R, 32, ...]
    words = torch.zeros((runs.shape[0], bits, *rest), dtype=torch.int64, device=q.device)
    for i in range(32):
        start = i * bits
        w, shift = divmod(start, 32)
        words[:, w] |= (runs[:, i] << shift) & 0xFFFFFFFF
        if shift + bits > 32:                                          # straddles into the next word
            words[:, w + 1] |= runs[:, i] >> (32 - shift)
    words = words.reshape(-1, *rest)[:packed_length(n, bits)]           # the words the stream touches
    words = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
    return words.movedim(0, dim).contiguous()


def unpack(packed: torch.Tensor, bits: int, n: int, dim: int = 0) -> torch.Tensor:
    """Inverse of `pack`: the first `n` codes along `dim`, as uint8 (bits <= 8). Words past the first
    `packed_length(n, bits)` (an earlier version's padding) are ignored."""
    _check_bits(bits)
    words = packed.movedim(dim, 0).to(torch.int64) & 0xFFFFFFFF
    rest = words.shape[1:]
    if words.shape[0] < packed_length(n, bits):
        raise ValueError(f"asked for {n} codes but only {words.shape[0]} words are packed")
    words = words[:packed_length(n, bits)]
    pad = (-words.shape[0]) % bits                                   # whole runs of 32 codes (bits words)
    if pad:
        words = torch.cat([words, words.new_zeros((pad, *rest))])
    words = words.reshape(-1, bits, *rest)
    mask = (1 << bits) - 1
    out = torch.empty((words.shape[0], 32, *rest), dtype=torch.int64, device=words.device)
    for i in range(32):
        start = i * bits
        w, shift = divmod(start, 32)
        v = words[:, w] >> shift
        if shift + bits > 32:
            v = v | (words[:, w + 1] << (32 - shift))
        out[:, i] = v & mask
    out = out.reshape(-1, *rest)
    return out[:n].to(torch.uint8).movedim(0, dim).contiguous()


def _check_bits(bits: int) -> None:
    if bits not in PACKED_BITS:
        raise ValueError(f"unsupported bit width {bits}; choose one of {PACKED_BITS}")

"""Triton decoder of lossless BF16 tensors (formats/dfloat/codec.py): one lane per window, count then write.

Every window of the exponent stream starts on a codeword boundary, so lanes start without side
information. Pass 1 decodes each window and counts its codewords; an exclusive prefix sum over the counts
gives every window its first output position; pass 2 decodes again and writes each value, the exponent
merged with its sign/mantissa byte (the two-phase scheme of DFloat11, arXiv 2504.11651 section 3.3).
A codeword's length is found by comparing 16 peeked bits with the canonical limits of each length and
its exponent read from a table of at most 256 entries (huffman.canonical_limits): the tables stay in
cache, the data is read once per pass.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..formats import dfloat, huffman
from ..formats.errors import InputError

LMAX = dfloat.MAX_CODE_LENGTH


@triton.jit
def _decode_windows(words, n_words, stream_bits, window_bits, n_windows,
                    limit, first, offset, symbols, sign_mantissa, out, start, count, n_values, steps,
                    WRITE: tl.constexpr, LMAX: tl.constexpr, BLOCK: tl.constexpr):
    lane = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = lane < n_windows
    pos = lane.to(tl.int64) * window_bits
    stop = tl.minimum(pos + window_bits, stream_bits)
    n = tl.zeros([BLOCK], dtype=tl.int64)
    at = tl.zeros([BLOCK], dtype=tl.int64)
    if WRITE:
        at = tl.load(start + lane, mask=live, other=0)
    for _ in range(steps):
        w = pos >> 5
        hi = tl.load(words + w, mask=live & (w < n_words), other=-1).to(tl.int64) & 0xFFFFFFFF
        lo = tl.load(words + w + 1, mask=live & (w + 1 < n_words), other=-1).to(tl.int64) & 0xFFFFFFFF
        v = (((hi << 32) | lo) >> (48 - (pos & 31))) & 0xFFFF           # the next 16 bits, MSB first
        length = tl.full([BLOCK], 1, tl.int64)
        for l in tl.static_range(1, LMAX + 1):                          # shortest l with v < limit[l]
            length += (v >= tl.load(limit + l)).to(tl.int64)
        fits = live & (length <= LMAX) & (pos + length <= stop)
        if WRITE:
            row = tl.minimum(length, LMAX)
            index = tl.load(offset + row) + (v >> (LMAX - row)) - tl.load(first + row)
            to = at + n
            keep = fits & (to < n_values)
            e = tl.load(symbols + index, mask=keep, other=0).to(tl.int32)
            sm = tl.load(sign_mantissa + to, mask=keep, other=0).to(tl.int32)
            bits = ((sm & 0x80) << 8) | (e << 7) | (sm & 0x7F)
            tl.store(out + to, tl.where(bits >= 32768, bits - 65536, bits).to(tl.int16), mask=keep)
        n += fits.to(tl.int64)
        pos += tl.where(fits, length, 0)
        live = fits
    if not WRITE:
        tl.store(count + lane, n, mask=lane < n_windows)


def decode(coded: dfloat.Coded, device: str | torch.device = "cuda", name: str = "tensor") -> torch.Tensor:
    """The BF16 tensor of `coded`, decoded on `device` (a CUDA device; CPU under TRITON_INTERPRET=1)."""
    dfloat.check_structure(coded, name)
    device = torch.device(device)
    n = coded.numel
    if n == 0:
        return torch.empty(coded.shape, dtype=torch.bfloat16, device=device)
    lengths = coded.lengths()
    limit, first, offset, symbols = (torch.as_tensor(a, dtype=torch.int64, device=device)
                                     for a in huffman.canonical_limits(lengths, LMAX))
    words = torch.from_numpy(coded.stream).to(device).view(torch.int32)
    sign_mantissa = torch.from_numpy(coded.sign_mantissa).to(device)
    n_windows = -(-coded.stream_bits // coded.window_bits)
    steps = coded.window_bits // int(lengths[lengths > 0].min())     # at most this many codewords per window
    block = 16 if os.environ.get("TRITON_INTERPRET") == "1" else 128
    grid = (triton.cdiv(n_windows, block),)
    count = torch.empty(n_windows, dtype=torch.int64, device=device)
    out = torch.empty(n, dtype=torch.int16, device=device)
    args = (words, words.numel(), coded.stream_bits, coded.window_bits, n_windows,
            limit, first, offset, symbols, sign_mantissa, out)
    _decode_windows[grid](*args, count, count, n, steps, WRITE=False, LMAX=LMAX, BLOCK=block)
    total = int(count.sum())
    if total != n:
        raise InputError(f"{name}: coded stream holds {total} values, expected {n} (corrupted stream or code table)")
    start = torch.cumsum(count, 0) - count
    _decode_windows[grid](*args, start, count, n, steps, WRITE=True, LMAX=LMAX, BLOCK=block)
    return out.view(torch.bfloat16).reshape(coded.shape)

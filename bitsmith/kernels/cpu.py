"""CPU forms of a GPTQ-layout linear (kernels/reference.py) and the products W4A16Runtime runs on them.

Int4Weights (path cpu_int4, a few rows: decode). torch's CPU int4 GEMM, `_weight_int4pack_mm_for_cpu`, reads the
packed codes and dequantizes inside the product. Its vectorized kernel takes bfloat16 activations only (float32 or
float16 ones run a scalar loop, 35x slower on one AVX-512 core with torch 2.13), so x is rounded to bf16, the kernel
accumulates in fp32 and y comes back through bf16: these calls carry bf16 rounding (about 2^-9 relative) whatever
the model's dtype.
Every GPTQ layout is brought to the kernel's form once, when the form is built:
  - codes of 2, 3 and 4 bits are int4 codes once moved to the middle of 0..15: with c = 2^(bits-1),
    q' = q + 8 - c and m = s (c - zero), w = (q' - 8) s + m = s (q - zero) exactly, and neither term is larger
    than the weights (the cast to bf16 rounds each relative to its own size);
  - codes of 5, 6 and 8 bits are split into nibbles, q = 16 hi + lo, laid one after the other along K (x is
    read twice), the high one centred as above (c = 2^(bits-5): 8 at 8 bits, 1 at 5, so that m stays the size of
    the weights): hi' = hi + 8 - c and w = (hi' - 8) 16s + (lo - 8) s + s (16c + 8 - zero); at 8 bits
    w = (hi - 8) 16s + (lo - 8) s + s (136 - zero). Measured on one core at SmolLM2 shapes, this beats torch's
    int8 GEMM (`_weight_int8pack_mm`, per channel only) up to 4 rows (0.11 against 0.16 ms, 576 x 1536, M = 1)
    and trails it by 1.3x at 8; one int8 GEMM per group is slower at every M;
  - the kernel takes one group size, 32, 64, 128 or 256: each stored group (act-order groups sorted first) is
    padded with channels where x is 0 to a multiple of it, the size that pads least, so no kernel group
    straddles two stored groups (a per-channel grid is one group of K; a group of 128 where K = 576 becomes
    groups of 64);
  - N is padded to a multiple of 16.
One gather of x per call (`src`) does the act-order sort, the padding and the 8-bit repeat.

dense_linear (path cpu_dense, many rows: prefill, evaluation). W^T in float32, written into one buffer that every
layer of the thread reuses, then a float32 matmul: bitwise the reference's W, its dequantization amortized over
the M rows, no per-layer dense copy held.
"""
from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

KERNEL_GROUPS = (256, 128, 64, 32)   # group sizes torch's int4 GEMM takes; on a tie in padding the larger wins
N_ALIGN = 16                         # its packing takes N in multiples of 16
NEUTRAL = 8                          # the code the kernel reads as w = m
CHUNK_CODES = 1 << 21                # codes unpacked at once: bounds the temporaries of `unpack_codes`

_dense = threading.local()           # cpu_dense's W^T buffer, one per thread


def unpack_codes(qweight: torch.Tensor, bits: int, K: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Codes [K, N] of qweight [words, N] (formats/packing.py's bit stream along K: code i of a run of 32 starts at
    bit i * bits of the run's `bits` words), written into `out` (any dtype that holds 0..255) or a new uint8
    tensor. Reads the first ceil(K * bits / 32) words, so whole-run padding of earlier versions is ignored. Works
    on int32, a bounded number of runs at a time (CHUNK_CODES codes)."""
    N = qweight.shape[1]
    out = torch.empty(K, N, dtype=torch.uint8) if out is None else out
    words = qweight[:-(-K * bits // 32)]
    runs = F.pad(words, (0, 0, 0, -len(words) % bits)).reshape(-1, bits, N)
    step = max(1, CHUNK_CODES // (32 * N))
    codes = torch.empty(min(step, len(runs)), 32, N, dtype=torch.int32)
    for r in range(0, len(runs), step):
        chunk = runs[r:r + step]
        _unpack_runs(chunk, bits, codes[:len(chunk)])
        rows = out[32 * r:32 * (r + len(chunk))]
        rows.copy_(codes[:len(chunk)].reshape(-1, N)[:len(rows)])
    return out


def _unpack_runs(runs: torch.Tensor, bits: int, codes: torch.Tensor) -> None:
    """codes [R, 32, N] of runs [R, bits, N]: code i from word i*bits // 32 at shift i*bits % 32, its high bits from
    the next word when it straddles (3 bits). The int32 shifts are arithmetic; the masks drop the sign bits."""
    mask = (1 << bits) - 1
    if 32 % bits == 0:                              # no code straddles: every word's codes in one broadcast shift
        shifts = torch.arange(0, 32, bits, dtype=torch.int32)[:, None]
        torch.bitwise_and(runs[:, :, None] >> shifts, mask, out=codes.view(len(runs), bits, 32 // bits, -1))
        return
    for i in range(32):
        w, shift = divmod(i * bits, 32)
        v = runs[:, w] >> shift
        if shift + bits > 32:
            v = (v & ((1 << (32 - shift)) - 1)) | (runs[:, w + 1] << (32 - shift))
        torch.bitwise_and(v, mask, out=codes[:, i])


def zero_points(qzeros: torch.Tensor, bits: int, N: int) -> torch.Tensor:
    """True zero points [G, N] in float32, as `reference.unpack_zeros` gives them (stored zero - 1)."""
    stored = unpack_codes(qzeros.t(), bits, N).t().to(torch.int32)
    return ((stored + 1) & ((1 << bits) - 1)).to(torch.float32)


# ---------------------------------------------------------------------------------------------------
# cpu_int4

def kernel_grouping(g_idx: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Where the input channels sit along the kernel's K: (g, src, group). g: the kernel group size; src [K']: the
    input channel at each kernel position, K for padding (x is 0 there, whatever the code); group [K' / g]: the
    stored group of each kernel group."""
    g_idx = g_idx.long().cpu()
    K = len(g_idx)
    sizes = torch.bincount(g_idx)                            # channels of each stored group
    g = min(KERNEL_GROUPS, key=lambda g: (int(torch.div(sizes + g - 1, g, rounding_mode="floor").sum()) * g, -g))
    blocks = torch.div(sizes + g - 1, g, rounding_mode="floor")   # kernel groups of each stored group
    order = torch.argsort(g_idx, stable=True)
    first = torch.cumsum(sizes, 0) - sizes                   # a stored group's first place in `order`
    slot = torch.cumsum(blocks, 0) - blocks                  # and its first kernel group
    groups = g_idx[order]
    src = torch.full((int(blocks.sum()) * g,), K, dtype=torch.long)
    src[slot[groups] * g + torch.arange(K) - first[groups]] = order
    return g, src, torch.repeat_interleave(torch.arange(len(sizes)), blocks)


def int4_operands(qweight, scales, qzeros, g_idx, bits: int, K: int):
    """What the int4 kernel multiplies by, before packing and the cast to bf16: (codes int32 [N', K'], scale and
    m float32 [K' / g, N'], g, src), w = (codes - 8) scale + m per kernel group: exactly the reference W at every
    (n, k) with n < N and src[k] < K (the two 8-bit halves summed), and 0 in the N padding."""
    N = scales.shape[1]
    g, src, group = kernel_grouping(g_idx)
    q = torch.cat([unpack_codes(qweight, bits, K), torch.zeros(1, N, dtype=torch.uint8)])[src]    # [K', N]
    s = scales.to(torch.float32)[group]
    z = zero_points(qzeros, bits, N)[group]
    if bits <= 4:
        center = 1 << (bits - 1)                    # moved to 8: (code - 8) s and m no larger than w (docstring)
        codes, scale, m = q + (NEUTRAL - center), s, s * (center - z)
    else:
        top = 1 << (bits - 5)                       # the high nibble's centre, moved to 8 as above
        codes = torch.cat([(q >> 4) + (NEUTRAL - top), q & 15])
        scale = torch.cat([16 * s, s])
        m = torch.cat([s * (16 * top + NEUTRAL - z), torch.zeros_like(s)])
        src = torch.cat([src, src])
    pad = -N % N_ALIGN                              # extra outputs, w = 0: scale 0, m 0
    codes = F.pad(codes.t().to(torch.int32), (0, 0, 0, pad), value=NEUTRAL)
    return codes.contiguous(), F.pad(scale, (0, pad)), F.pad(m, (0, pad)), g, src


class Int4Weights:
    """A GPTQ-layout linear in torch's CPU int4 form (module docstring); calling it gives x W^T in x.dtype."""

    def __init__(self, qweight, scales, qzeros, g_idx, bits: int, in_features: int):
        codes, scale, m, self.group_size, src = int4_operands(qweight, scales, qzeros, g_idx, bits, in_features)
        self.N = scales.shape[1]
        self.src = None if torch.equal(src, torch.arange(in_features)) else src
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
        self.scales_zeros = torch.stack([scale, m], dim=-1).to(torch.bfloat16).contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        xb = x.to(torch.bfloat16)
        if self.src is not None:
            xb = F.pad(xb, (0, 1))[:, self.src]                 # the appended 0 feeds the padding
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb.contiguous(), self.packed, self.group_size,
                                                       self.scales_zeros)
        return y[:, :self.N].to(x.dtype)


class PerICWeights:
    """A per-input-channel linear (kernels/per_ic_linear.py: W[o, j] = S[G, j] (Q[o, j] - Z[G, j]) for the group G of
    `rows` output rows holding o) in a weight-only CPU form of torch, one product per group of rows:

        y[:, G] = (x * S[G]) (Q_G - c)^T - x (S[G] (Z[G] - c))^T,   c = 2^(bits-1)

    2-4 bits: the int4 GEMM holds each group's codes as int4 codes Q + 8 - c with kernel scale 1 and m = 0, so it
    reads them as Q - c (centred, so that neither term is much larger than y); K is padded to a multiple of the kernel
    group with channels where x is 0, each group's rows to a multiple of N_ALIGN with code 8 (w = 0). Half a byte per
    weight. 8 bits: the int8 GEMM on Q - 128 with scale 1, a byte per weight. In both the activations scaled per input
    channel are rounded to bf16 and the kernel's output comes back through bf16, as in Int4Weights; the codes are
    held exactly, where a bf16 copy of W (two bytes) would round every weight."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, rows: int):
        N, K = codes.shape
        self.center = 1 << (bits - 1)
        self.N, self.rows, self.int8 = N, rows, bits > 4
        self.pad_k = 0 if self.int8 else -K % KERNEL_GROUPS[-1]
        self.group_size = None if self.int8 else next(g for g in KERNEL_GROUPS if (K + self.pad_k) % g == 0)
        self.scales = scales.to(torch.float32)                                                 # [G, K]
        self.offset = (self.scales * (zeros.to(torch.float32) - self.center)).t().contiguous()  # [K, G]
        self.groups = [self._form(codes[start:start + rows].to(torch.int32)) for start in range(0, N, rows)]

    def _form(self, q: torch.Tensor):
        if self.int8:
            return (q - self.center).to(torch.int8).contiguous(), torch.ones(len(q), dtype=torch.bfloat16)
        q = F.pad(q + (NEUTRAL - self.center), (0, self.pad_k, 0, -len(q) % N_ALIGN), value=NEUTRAL)
        unit = torch.zeros(q.shape[1] // self.group_size, len(q), 2, dtype=torch.bfloat16)
        unit[..., 0] = 1                                                                      # kernel scale 1, m 0
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 2), unit

    def _product(self, xs: torch.Tensor, packed: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
        if self.int8:
            return torch.ops.aten._weight_int8pack_mm(xs, packed, unit)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(xs, packed, self.group_size, unit)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.to(torch.float32)
        scaled = F.pad(x32[None] * self.scales[:, None], (0, self.pad_k)).to(torch.bfloat16)   # [G, M, K']
        y = torch.empty(len(x), self.N, dtype=torch.float32)
        for G, (packed, unit) in enumerate(self.groups):
            part = self._product(scaled[G], packed, unit)
            y[:, G * self.rows:(G + 1) * self.rows] = part[:, :min(self.rows, self.N - G * self.rows)]
        y -= (x32 @ self.offset).repeat_interleave(self.rows, dim=1)[:, :self.N]
        return y.to(x.dtype)


class TableWeights:
    """A lookup-table linear (kernels/lut_linear.py: W[o, j] = T[o, code[o, j]], 2^bits fp16 values per row) in
    torch's CPU int8 weight-only form. Each row's table is put on a grid of 255 levels centred on its range:

        T[o, c] ~ m_o + s_o t[o, c],   t in -127..127,   m_o = (max_o + min_o) / 2,   s_o = bf16(range_o / 253)

    (s_o >= range_o / 254 after the bf16 rounding, so every level fits), within s_o / 2 of the stored value: about
    range / 508, where a bf16 copy of W would round each weight to 2^-9 of itself, at a byte per weight instead of two.
    y = bf16(x) (t s)^T, the kernel accumulating in fp32 with a bf16 output, plus sum(x) m in float32."""

    def __init__(self, codes: torch.Tensor, table: torch.Tensor):
        T = table.to(torch.float32)
        hi, lo = T.amax(1), T.amin(1)
        self.middle = (hi + lo) / 2
        scale = ((hi - lo) / 253).to(torch.bfloat16)
        self.scale = torch.where(scale > 0, scale, torch.ones_like(scale))        # a constant row: t = 0
        levels = torch.round((T - self.middle[:, None]) / self.scale.float()[:, None]).clamp(-127, 127)
        self.levels = levels.to(torch.int8).gather(1, codes.long()).contiguous()  # [N, K]

    def weight(self) -> torch.Tensor:
        """The W [N, K] this form multiplies by, in float32."""
        return self.levels.float() * self.scale.float()[:, None] + self.middle[:, None]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16).contiguous(), self.levels, self.scale)
        return (y.float() + x.to(torch.float32).sum(1, keepdim=True) * self.middle).to(x.dtype)


def bf16_product(x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """x [M, K] W^T for a bf16 W [N, K]: x rounded to bf16, fp32 accumulation, the result through bf16 and back in
    x.dtype. One row goes through torch.mv, whose GEMV reads W faster than the GEMM's M = 1 path (one core,
    49,152 x 576: 4.7 against 6.6 CPU ms) and gives the same bits."""
    xb = x.to(torch.bfloat16)
    y = torch.mv(W, xb[0])[None] if len(xb) == 1 else F.linear(xb, W)
    return y.to(x.dtype)


# ---------------------------------------------------------------------------------------------------
# cpu_dense

def buffer(K: int, N: int, x: torch.Tensor) -> torch.Tensor:
    """A float32 [K, N] for W^T: a view of one buffer reused by every layer of this thread (it is overwritten by the
    next call), unless autograd records the product with x, which keeps W^T for the backward."""
    if torch.is_grad_enabled() and x.requires_grad:
        return torch.empty(K, N)
    if getattr(_dense, "buffer", None) is None or _dense.buffer.numel() < K * N:
        _dense.buffer = torch.empty(K * N)
    return _dense.buffer[:K * N].view(K, N)


def dequantize_t(out: torch.Tensor, qweight, scales, qzeros, g_idx, bits: int, in_features: int) -> torch.Tensor:
    """W^T [K, N] in float32 written into `out`: scale * (q - zero) per input channel's group, the same operations
    as `reference.dequantize` (bitwise equal)."""
    g = g_idx.long()
    unpack_codes(qweight, bits, in_features, out)
    out.sub_(zero_points(qzeros, bits, scales.shape[1]).index_select(0, g))
    return out.mul_(scales.to(torch.float32).index_select(0, g))


def dense_linear(x: torch.Tensor, layout: tuple, outliers: tuple | None = None) -> torch.Tensor:
    """x [M, K] W^T in x.dtype, accumulated in float32, W dequantized once into the shared buffer; `layout` is
    (qweight, scales, qzeros, g_idx, bits, in_features); `outliers` (values, cols, rows), when given, are written
    over W first (dense-and-sparse: their codes dequantize to 0)."""
    K, N = layout[-1], layout[1].shape[1]
    Wt = dequantize_t(buffer(K, N, x), *layout)
    if outliers is not None:
        values, cols, rows = outliers
        Wt[cols, rows] = values.to(torch.float32)
    return (x.to(torch.float32) @ Wt).to(x.dtype)

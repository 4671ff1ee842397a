"""ColumnBitsLinear: an nn.Linear replacement for bits per group of columns (quantize/column_bits.py; BAQ's
allocation in EXL2's arrangement).

  qweight int32 [words, out]            the codes of group 0, then group 1, ..., each group's own columns in
                                        ascending order, packed along the input at the group's width (as GPTQ packs)
  scales  fp16  [G, out]                one scale per group and output row
  qzeros  int32 [G, packed(out, R+1)]   true zero points, packed along the output at R + 1 bits (the widest group)
  g_idx   int32 [in]                    the group of every input channel (act-order: not runs)
  widths  uint8 [G]                     each group's bits, R - 1, R or R + 1
W[o, j] = scales[g, o] * (code[o, j] - zero[g, o]), g = g_idx[j]. Decode on CPU runs torch's int4 GEMM (widths up to
4; two nibbles for 5 and 6) once per width on the input channels of that width's groups, repacked in GPTQ's layout
(kernels/cpu.py Int4Weights; `WidthForms`); otherwise the forward dequantizes W (kernels/dequantizing.py).
"""
from __future__ import annotations

import torch

from ..formats.errors import InputError
from ..formats.packing import SUPPORTED_BITS, pack, packed_length, unpack
from .cpu import Int4Weights
from .dequantizing import DequantizingLinear


def column_words(in_features: int, bits: int, group_size: int) -> int:
    """Packed words per output row of an [out, in] linear around `bits` bits: whole groups hold bits x group_size
    bits on average (as many groups above as below), a last shorter group is on `bits`."""
    full = in_features // group_size
    return full * group_size * bits // 32 + packed_length(in_features - full * group_size, bits)


def group_sizes(g_idx: torch.Tensor, groups: int) -> torch.Tensor:
    """Input channels of each group, [G]."""
    return torch.bincount(g_idx.long(), minlength=groups)


def pack_groups(codes: torch.Tensor, g_idx: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """qweight [words, out] of codes [out, in] (module docstring)."""
    g = g_idx.long()
    order = torch.argsort(g, stable=True)
    chunks = torch.split(codes[:, order], group_sizes(g, len(widths)).tolist(), dim=1)
    return torch.cat([pack(chunk.t(), int(w), dim=0) for chunk, w in zip(chunks, widths.tolist())])


def zeros_past_grid(zeros: torch.Tensor, widths: torch.Tensor) -> bool:
    """Whether a zero point [G, out] lies past its group's grid (0 .. 2^width - 1)."""
    return bool(zeros.numel()) and bool((zeros > (2 ** widths.long() - 1)[:, None]).any())


def check_groups(qweight: torch.Tensor, g_idx: torch.Tensor, widths: torch.Tensor, zeros: torch.Tensor, bits: int,
                 where: str) -> None:
    """That the stored groups fit: integer g_idx in [0, G), integer widths of at most bits + 1 that the packing
    stores, qweight of exactly the words they take, and every zero point [G, out] on its group's grid."""
    G = len(widths)
    if g_idx.dtype.is_floating_point or widths.dtype.is_floating_point:
        raise InputError(f"{where}: g_idx and widths must be integers (got {g_idx.dtype}, {widths.dtype})")
    if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= G):
        raise InputError(f"{where}: g_idx names groups outside 0..{G - 1}")
    if any(int(w) not in SUPPORTED_BITS or int(w) > bits + 1 for w in widths):
        raise InputError(f"{where}: widths {sorted(set(widths.tolist()))} around {bits} bits: each must be a stored "
                         f"width of at most {bits + 1}")
    words = sum(packed_length(int(n), int(w)) for n, w in zip(group_sizes(g_idx, G), widths))
    if words != qweight.shape[0]:
        raise InputError(f"{where}: qweight has {qweight.shape[0]} words a row, its groups' widths take {words}")
    if zeros_past_grid(zeros, widths):
        raise InputError(f"{where}: a zero point lies past its group's grid ({bits - 1} to {bits + 1} bits)")


def unpack_groups(qweight: torch.Tensor, g_idx: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """Codes [out, in] (uint8), in the input's order, of qweight [words, out] (module docstring)."""
    g = g_idx.long()
    sizes = group_sizes(g, len(widths)).tolist()
    chunks, at = [], 0
    for n, w in zip(sizes, widths.tolist()):
        words = packed_length(n, w)
        chunks.append(unpack(qweight[at:at + words], w, n, dim=0))
        at += words
    codes = torch.empty(qweight.shape[1], len(g), dtype=torch.uint8)
    codes[:, torch.argsort(g, stable=True)] = torch.cat(chunks).t()
    return codes


def column_bits_dequantize(qweight, scales, qzeros, g_idx, widths, bits: int) -> torch.Tensor:
    """W [out, in] in float32 from the stored tensors (module docstring)."""
    g = g_idx.long()
    zeros = unpack(qzeros, bits + 1, scales.shape[1], dim=1).float()               # [G, out]
    codes = unpack_groups(qweight, g_idx, widths).float()
    return scales.float()[g].t() * (codes - zeros[g].t())


class WidthForms:
    """The CPU decode form: the input channels of each width's groups as a GPTQ-layout linear of that width in
    torch's int4 form (cpu.Int4Weights), so that every group's codes are centred in the kernel's nibble as a plain
    grid of its width is; x W^T is the sum of their products on the input channels they hold."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor,
                 widths: torch.Tensor):
        g, self.parts = g_idx.long(), []
        for width in sorted(set(widths.tolist())):
            groups = (widths == width).nonzero().squeeze(1)
            local = torch.full((len(widths),), -1, dtype=torch.long)
            local[groups] = torch.arange(len(groups))
            cols = (local[g] >= 0).nonzero().squeeze(1)
            stored_zeros = (zeros[groups] - 1) & ((1 << width) - 1)             # GPTQ's v1 zero - 1
            self.parts.append((cols, Int4Weights(pack(codes[:, cols].t(), width, dim=0), scales[groups],
                                                 pack(stored_zeros, width, dim=1), local[g[cols]].to(torch.int32),
                                                 width, len(cols))))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return sum(form(x[:, cols]) for cols, form in self.parts)


class ColumnBitsLinear(DequantizingLinear):
    """y = x W^T + b with W of grids whose groups of columns have bits of their own (module docstring)."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool = False):
        super().__init__(in_features, out_features, bits, bias)
        self.group_size = group_size
        groups = -(-in_features // group_size)
        self.register_buffer("qweight", torch.zeros(column_words(in_features, bits, group_size), out_features,
                                                    dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=torch.float16))
        self.register_buffer("qzeros", torch.zeros(groups, packed_length(out_features, bits + 1), dtype=torch.int32))
        self.register_buffer("g_idx", torch.arange(in_features, dtype=torch.int32) // group_size)
        self.register_buffer("widths", torch.full((groups,), bits, dtype=torch.uint8))
        self.shapes = {name: buffer.shape for name, buffer in self.named_buffers() if buffer is not None}
        self._positions = None              # (key of the buffers, the Triton kernel's positions on their device)
        self.register_load_state_dict_post_hook(lambda module, keys: module.check())

    def check(self) -> None:
        """Refuse stored groups that do not fit (`check_groups`); a tensor of another shape is left to the loader,
        which names it (torch reports size mismatches after this hook)."""
        if all(getattr(self, name).shape == shape for name, shape in self.shapes.items()):
            check_groups(self.qweight, self.g_idx, self.widths, self.zeros(), self.bits,
                         f"a column_bits linear [{self.out_features}, {self.in_features}]")

    def zeros(self) -> torch.Tensor:
        """True zero points [G, out], int32."""
        return unpack(self.qzeros, self.bits + 1, self.out_features, dim=1).to(torch.int32)

    def decode(self, rows: torch.Tensor) -> torch.Tensor:
        """torch's int4 GEMM (or int8 on two nibbles past 4 bits) on each width's groups (`WidthForms`)."""
        return self.decode_form(lambda: WidthForms(unpack_groups(self.qweight, self.g_idx, self.widths),
                                                   self.scales, self.zeros(), self.g_idx, self.widths))(rows)

    def dequantize(self) -> torch.Tensor:
        return column_bits_dequantize(self.qweight, self.scales, self.qzeros, self.g_idx, self.widths, self.bits)

    def dequantize_cuda(self, dtype: torch.dtype) -> torch.Tensor:
        """Through the Triton kernel, its positions and the unpacked zeros made once for the stored tensors."""
        from .triton_dequant import column_bits_dequantize as triton_column_bits
        from .triton_dequant import column_positions
        key = tuple(b.data_ptr() for b in self.buffers())
        if self._positions is None or self._positions[0] != key:
            device = self.qweight.device
            self._positions = (key, tuple(t.to(device) for t in column_positions(self.g_idx, self.widths)),
                               self.zeros())
        _, positions, zeros = self._positions
        return triton_column_bits(self.qweight, self.scales, zeros, positions, self.in_features, dtype).t()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits} on average, "
                f"groups of {self.group_size} columns on {sorted(set(self.widths.tolist()))} bits")

"""Triton dequantization of lookup-table, per-input-channel, codebook-of-pairs and bits-per-group-of-columns weights
(kernels/triton_dequant.py) against the torch references, interpreted on CPU (conftest sets TRITON_INTERPRET=1):
every bit width, shapes that end in partial tiles, partial row groups, codebook blocks and column groups."""
import pytest
import torch

from bitsmith.formats.packing import pack, unpack
from bitsmith.kernels import triton_dequant
from bitsmith.kernels.column_bits_linear import ColumnBitsLinear, column_bits_dequantize
from bitsmith.kernels.lut_linear import lut_dequantize
from bitsmith.kernels.per_ic_linear import per_ic_dequantize
from bitsmith.kernels.vq_linear import vq_dequantize
from bitsmith.layouts import ColumnBitsLayout
from bitsmith.quantize.vq import entries, index_bits


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("K, N", [(64, 64), (100, 72), (33, 5)])
def test_lookup_tables(bits, K, N):
    g = torch.Generator().manual_seed(bits * K + N)
    codes = torch.randint(0, 2 ** bits, (N, K), generator=g, dtype=torch.uint8)
    lut = torch.randn(N, 2 ** bits, generator=g).half()
    qweight = pack(codes.t(), bits, dim=0)
    W = triton_dequant.lut_dequantize(qweight, lut, bits, K, torch.float32)
    assert torch.equal(W, lut_dequantize(qweight, lut, bits, K).t())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("K, N, rows", [(64, 64, 16), (100, 72, 32), (33, 70, 64), (40, 9, 9)])
def test_per_input_channel_grids(bits, K, N, rows):
    g = torch.Generator().manual_seed(bits * K + N + rows)
    groups = -(-N // rows)
    codes = torch.randint(0, 2 ** bits, (N, K), generator=g, dtype=torch.uint8)
    scales = (torch.rand(groups, K, generator=g) + 0.01).half()
    zeros = torch.randint(0, 2 ** bits, (groups, K), generator=g, dtype=torch.int32)
    qweight, qzeros = pack(codes.t(), bits, dim=0), pack(zeros, bits, dim=1)
    unpacked = unpack(qzeros, bits, K, dim=1).half()
    W = triton_dequant.per_ic_dequantize(qweight, scales, unpacked, bits, K, rows, torch.float32)
    assert torch.equal(W, per_ic_dequantize(qweight, scales, qzeros, bits, K, rows).t())


def vq_weights(bits, K, N, group_size, seed):
    """Random stored tensors of a VQLinear [N, K]: packed pair indices, codebooks, row scales."""
    g = torch.Generator().manual_seed(seed)
    blocks = -(-K // (K if group_size == -1 else group_size))
    index = torch.randint(0, entries(bits), (N, K // 2), generator=g, dtype=torch.uint8)
    codebooks = torch.randn(blocks, entries(bits), 2, generator=g).half()
    row_scales = (torch.rand(N, generator=g) + 0.01).half()
    return pack(index.t(), index_bits(bits), dim=0), codebooks, row_scales


@pytest.mark.parametrize("bits", [2, 2.5, 3, 3.5, 4])
@pytest.mark.parametrize("group_size", [128, 64, -1])
@pytest.mark.parametrize("K, N", [(64, 64), (200, 70), (136, 9), (70, 5)])
def test_codebooks_of_pairs(poisoned_outputs, bits, group_size, K, N):
    stored = vq_weights(bits, K, N, group_size, seed=int(2 * bits) * K + N + group_size)
    W = triton_dequant.vq_dequantize(*stored, bits, K, group_size, torch.float32)
    assert torch.equal(W, vq_dequantize(*stored, bits, K, group_size).t())


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_codebooks_of_pairs_round_once_to_the_dtype(poisoned_outputs, bits, dtype):
    stored = vq_weights(bits, 136, 70, 64, seed=bits)
    W = triton_dequant.vq_dequantize(*stored, bits, 136, 64, dtype)
    ref = vq_dequantize(*stored, bits, 136, 64).t()
    want = [ref.to(dtype)]
    if dtype == torch.bfloat16:       # Triton's interpreter casts float32 to bfloat16 toward zero, CUDA to nearest
        want.append((ref.view(torch.int32) & -(1 << 16)).view(torch.float32).to(dtype))
    assert W.dtype == dtype and any(torch.equal(W, w) for w in want)


@pytest.mark.parametrize("bits", [3, 4, 5])
@pytest.mark.parametrize("K, N, group", [(256, 64, 64), (300, 70, 32), (128, 9, 128), (100, 33, 32)])
def test_bits_per_group_of_columns(poisoned_outputs, bits, K, N, group):
    from test_layouts_column_bits import random_column_bits
    qw = random_column_bits(N, K, bits, group, pairs=K // group // 2, seed=bits * K + N)
    stored = ColumnBitsLayout.tensors(qw)
    positions = triton_dequant.column_positions(stored["g_idx"], stored["widths"])
    W = triton_dequant.column_bits_dequantize(stored["qweight"], stored["scales"], qw.zeros, positions, K,
                                              torch.float32)
    assert torch.equal(W, column_bits_dequantize(*(stored[p] for p in ColumnBitsLayout.parts), bits).t())
    assert torch.equal(W.t(), qw.Q)
    module = ColumnBitsLinear(K, N, bits, group)
    module.load_state_dict(stored)
    assert torch.equal(module.dequantize_cuda(torch.float32), qw.Q)           # its positions made once, reused
    assert torch.equal(module.dequantize_cuda(torch.float32), qw.Q)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the interpreter runs the kernels above)")
def test_modules_dequantize_on_cuda_as_on_the_cpu():
    from test_layouts_column_bits import random_column_bits

    from bitsmith.kernels.lut_linear import LUTLinear
    from bitsmith.kernels.per_ic_linear import PerICLinear
    from bitsmith.kernels.vq_linear import VQLinear
    g = torch.Generator().manual_seed(0)
    column_bits = ColumnBitsLinear(256, 80, 4, 64)
    column_bits.load_state_dict(ColumnBitsLayout.tensors(random_column_bits(80, 256, 4, 64, 2, 0)))
    x = torch.randn(5, 256, generator=g)
    assert torch.allclose(column_bits.cuda()(x.cuda()).cpu(), x @ column_bits.cpu().dequantize().t(), rtol=1e-4,
                          atol=1e-4)
    for module in (LUTLinear(96, 80, 3), PerICLinear(96, 80, 4, 32), VQLinear(96, 80, 3, 32)):
        for name, buf in module.named_buffers():
            if buf is not None:
                buf.copy_(torch.randint(0, 2 ** 31 - 1, buf.shape, generator=g).to(buf.dtype) if buf.dtype ==
                          torch.int32 else torch.rand(buf.shape, generator=g).to(buf.dtype))
        x = torch.randn(5, 96, generator=g)
        want = x @ module.dequantize().float().t()       # exact: the CPU decode path rounds through bf16
        assert torch.allclose(module.cuda()(x.cuda()).cpu(), want, rtol=1e-4, atol=1e-4)

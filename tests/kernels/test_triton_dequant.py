"""Triton dequantization of lookup-table and per-input-channel weights (kernels/triton_dequant.py) against the
torch references, interpreted on CPU (conftest sets TRITON_INTERPRET=1): every bit width, shapes that end in
partial tiles, partial row groups."""
import pytest
import torch

from bitsmith.formats.packing import pack, unpack
from bitsmith.kernels import triton_dequant
from bitsmith.kernels.lut_linear import lut_dequantize
from bitsmith.kernels.per_ic_linear import per_ic_dequantize


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the interpreter runs the kernels above)")
def test_modules_dequantize_on_cuda_as_on_the_cpu():
    from bitsmith.kernels.lut_linear import LUTLinear
    from bitsmith.kernels.per_ic_linear import PerICLinear
    g = torch.Generator().manual_seed(0)
    for module in (LUTLinear(96, 80, 3), PerICLinear(96, 80, 4, 32)):
        for name, buf in module.named_buffers():
            if buf is not None:
                buf.copy_(torch.randint(0, 2 ** 31 - 1, buf.shape, generator=g).to(buf.dtype) if buf.dtype ==
                          torch.int32 else torch.rand(buf.shape, generator=g).to(buf.dtype))
        x = torch.randn(5, 96, generator=g)
        want = x @ module.dequantize().float().t()       # exact: the CPU decode path rounds through bf16
        assert torch.allclose(module.cuda()(x.cuda()).cpu(), want, rtol=1e-4, atol=1e-4)

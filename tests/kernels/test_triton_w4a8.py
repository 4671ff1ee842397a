"""Triton W4A8 (QoQ) GEMM and per-token activation quantization, interpreted on CPU."""
import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: Triton kernels cannot be tested")

from bitsmith.formats.packing import pack
from bitsmith.kernels import reference, triton_actquant, triton_w4a8
from bitsmith.kernels.triton_w4a16 import Config

K, N, GROUP = 640, 320, 128


def qoq_operands(seed=0):
    """Random QoQ weights within the protective range: (qweight, s2, z, s1, W [K, N] float64)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (K, N), generator=gen, dtype=torch.uint8)
    s2 = torch.randint(1, 9, (K // GROUP, N), generator=gen, dtype=torch.int8)
    z = torch.randint(0, 16, (K // GROUP, N), generator=gen, dtype=torch.int8)
    s1 = (torch.rand(N, generator=gen) * 1e-3 + 1e-4).half()
    W = reference.qoq_dequantize(pack(q, 4, 0), s1, s2, z, K, GROUP).t().double()
    return pack(q, 4, 0), s2, z, s1, W


@pytest.mark.parametrize("M", [1, 3, 17, 64])
@pytest.mark.parametrize("splitk", [True, False])
def test_w4a8_gemm_matches_the_quantized_model(poisoned_outputs, M, splitk):
    qweight, s2, z, s1, W = qoq_operands(seed=M)
    x = torch.randn(M, K).half()
    x_q, s_tok = reference.quantize_per_token(x)
    config = triton_w4a8.w4a8_configs(M, N, K, GROUP, sms=132, splitk=splitk)[0]
    assert (config.SPLIT_K > 1) == splitk
    y = triton_w4a8.w4a8_gemm(x_q, s_tok, qweight, s2, z, s1, GROUP, torch.float16, config)
    ref = (x_q.double() * s_tok.double()[:, None]) @ W
    assert y.shape == (M, N) and y.dtype == torch.float16 and not torch.isnan(y).any()
    assert ((y.double() - ref).norm() / ref.norm()).item() <= 1e-3


def test_int32_accumulator_is_exact(poisoned_outputs):
    """Unit scales and fp32 output expose the raw accumulator; extreme operands (|x| = 127, |W8| = 120)."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randint(0, 16, (K, N), generator=gen, dtype=torch.uint8)
    q[:, :8] = 15
    s2 = torch.full((K // GROUP, N), 8, dtype=torch.int8)
    z = torch.randint(0, 16, (K // GROUP, N), generator=gen, dtype=torch.int8)
    z[:, :8] = 0
    x_q = torch.randint(-127, 128, (17, K), generator=gen, dtype=torch.int8)
    x_q[0] = 127
    W8 = reference.qoq_int8_weight(pack(q, 4, 0), s2, z, K, GROUP)
    ones_tok, ones_ch = torch.ones(17), torch.ones(N, dtype=torch.float16)
    y = triton_w4a8.w4a8_gemm(x_q, ones_tok, pack(q, 4, 0), s2, z, ones_ch, GROUP, torch.float32,
                              Config(BLOCK_N=64, BLOCK_K=128, SPLIT_K=1, BLOCK_M=32))
    exact = x_q.long() @ W8.long().t()
    assert exact.abs().max() >= 127 * 120 * K // 2
    assert torch.equal(y.long(), exact)


def test_int8_tiles_are_checked():
    qweight, s2, z, s1, _ = qoq_operands()
    x_q = torch.zeros(2, K, dtype=torch.int8)
    with pytest.raises(ValueError, match="int8 tl.dot"):
        triton_w4a8.w4a8_gemm(x_q, torch.ones(2), qweight, s2, z, s1, GROUP, torch.float16,
                              Config(BLOCK_N=64, BLOCK_K=16, BLOCK_M=16))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("M,Kx", [(1, 640), (3, 1500), (17, 96)])
def test_quantize_per_token_kernel_is_bit_exact(poisoned_outputs, dtype, M, Kx):
    x = (torch.randn(M, Kx) * torch.logspace(-3, 2, M)[:, None]).to(dtype)
    x[0, :4] = torch.tensor([127.0, 0.5, 1.5, -2.5]) * x[0].abs().max().float() / 127   # ties when exact
    if M > 2:
        x[2] = 0
    x_q, scale = triton_actquant.quantize_per_token(x)
    ref_q, ref_scale = reference.quantize_per_token(x)
    assert torch.equal(scale, ref_scale)
    assert torch.equal(x_q, ref_q)

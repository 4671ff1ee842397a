"""Triton W4A16 kernels (GEMV, split-K / tiled GEMM, dequantize) against a float64 product, interpreted on CPU."""
import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: Triton kernels cannot be tested")

from bitsmith.formats.packing import pack
from bitsmith.kernels import triton_w4a16 as tw

FP16_TOL = 1e-3


def quantized_weight(K, N, group_size, bits=4, sym=False, seed=0):
    """(qweight, scales, zeros, W): kernel operands and the dequantized W [K, N] in float64."""
    gen = torch.Generator().manual_seed(seed)
    G = -(-K // group_size)
    q = torch.randint(0, 1 << bits, (K, N), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(G, N, generator=gen) * 0.02 + 1e-3).half()
    zeros = (torch.full((G, N), 1 << (bits - 1)) if sym else
             torch.randint(0, 1 << bits, (G, N), generator=gen)).half()
    rows = torch.arange(K) // group_size
    W = scales.double()[rows] * (q.double() - zeros.double()[rows])
    return pack(q, bits, 0), scales, zeros, W


def rel_err(y, ref):
    assert not torch.isnan(y).any()
    return ((y.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("K,N,group_size,sym", [(384, 192, 128, False), (640, 320, 64, True),
                                                (384, 320, 32, False)])
@pytest.mark.parametrize("split", [1, 4])
@pytest.mark.parametrize("bits", [4, 3])
def test_gemv(poisoned_outputs, K, N, group_size, sym, split, bits):
    qweight, scales, zeros, W = quantized_weight(K, N, group_size, bits=bits, sym=sym)
    x = torch.randn(1, K).half()
    y = tw.gemv(x, qweight, scales, zeros, group_size, bits, tw.Config(BLOCK_N=128, BLOCK_K=128, SPLIT_K=split))
    assert y.shape == (1, N) and y.dtype == torch.float16
    assert rel_err(y, x.double() @ W) <= FP16_TOL


@pytest.mark.parametrize("M", [1, 3, 17, 64])
@pytest.mark.parametrize("splitk", [True, False])
@pytest.mark.parametrize("bits", [4, 3])
def test_gemm(poisoned_outputs, M, splitk, bits):
    K, N, group_size = 640, 320, 128
    qweight, scales, zeros, W = quantized_weight(K, N, group_size, bits=bits, seed=M)
    config = tw.gemm_configs(M, N, K, group_size, sms=132, splitk=splitk)[0]
    assert (config.SPLIT_K > 1) == splitk
    x = torch.randn(M, K).half()
    y = tw.gemm(x, qweight, scales, zeros, group_size, bits, config)
    assert y.shape == (M, N)
    assert rel_err(y, x.double() @ W) <= FP16_TOL


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_other_bit_widths(poisoned_outputs, bits):
    K, N, group_size = 384, 192, 64
    qweight, scales, zeros, W = quantized_weight(K, N, group_size, bits=bits, seed=bits)
    x = torch.randn(3, K).half()
    y1 = tw.gemv(x[:1], qweight, scales, zeros, group_size, bits, tw.Config(64, 64, 2))
    y3 = tw.gemm(x, qweight, scales, zeros, group_size, bits, tw.Config(64, 64, 2, BLOCK_M=16))
    assert rel_err(y1, x[:1].double() @ W) <= FP16_TOL
    assert rel_err(y3, x.double() @ W) <= FP16_TOL


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("K", [384, 376])                 # 376: the stream ends inside the last tile and word
def test_dequantize_is_the_weight_rounded_to_fp16(poisoned_outputs, bits, K):
    N, group_size = 192, 128
    qweight, scales, zeros, W = quantized_weight(K, N, group_size, bits=bits)
    Wd = tw.dequantize(qweight, scales, zeros, K, group_size, bits, torch.float16, tw.DEQUANTIZE_CONFIG)
    assert torch.equal(Wd, W.to(torch.float32).to(torch.float16))


@pytest.mark.parametrize("bits", [4, 3])
def test_k_ending_inside_a_tile(poisoned_outputs, bits):
    """K = 400 ends half-way into the last 128-tile, group and 3-bit run of 32 codes: every kernel masks the tail."""
    K, N, group_size = 400, 96, 128
    qweight, scales, zeros, W = quantized_weight(K, N, group_size, bits=bits, seed=bits)
    x = torch.randn(17, K).half()
    y1 = tw.gemv(x[:1], qweight, scales, zeros, group_size, bits, tw.Config(64, 128, 2))
    y_split = tw.gemm(x, qweight, scales, zeros, group_size, bits, tw.Config(32, 128, 2, BLOCK_M=16))
    y_tiled = tw.gemm(x, qweight, scales, zeros, group_size, bits, tw.Config(32, 64, 1, BLOCK_M=16))
    Wd = tw.dequantize(qweight, scales, zeros, K, group_size, bits, torch.float16, tw.Config(32, 64))
    assert rel_err(y1, x[:1].double() @ W) <= FP16_TOL
    assert rel_err(y_split, x.double() @ W) <= FP16_TOL
    assert rel_err(y_tiled, x.double() @ W) <= FP16_TOL
    assert torch.equal(Wd, W.to(torch.float32).to(torch.float16))


def test_tiles_must_fit_groups_and_tensor_cores():
    qweight, scales, zeros, _ = quantized_weight(384, 64, 128)
    x = torch.randn(2, 384).half()
    with pytest.raises(ValueError, match="16"):
        tw.gemm(x, qweight, scales, zeros, 128, 4, tw.Config(64, 64, 1, BLOCK_M=8))
    with pytest.raises(ValueError, match="power of two"):
        tw.tile_k(128, 96, 4)
    assert tw.tile_k(128, 32, 3) == 32                    # 3-bit tiles are whole runs of 32 codes in 3 words
    with pytest.raises(ValueError, match="3-bit words"):
        tw.tile_k(128, 16, 3)


def test_default_configs_fill_the_gpu():
    """The hand-picked default gives about four programs per SM on the benchmark's large shapes."""
    for K, N in [(4096, 4096), (8192, 28672), (28672, 8192)]:
        c = tw.gemv_configs(N, K, 128, sms=132)[0]
        programs = -(-N // c.BLOCK_N) * c.SPLIT_K
        assert programs >= 4 * 132 or c.SPLIT_K * c.BLOCK_K >= K
        g = tw.gemm_configs(16, N, K, 128, sms=132, splitk=True)[0]
        assert g.BLOCK_M == 16 and -(-N // g.BLOCK_N) * g.SPLIT_K >= 4 * 132

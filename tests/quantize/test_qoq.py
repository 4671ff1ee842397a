"""QoQ progressive group quantization (QServe section 4.1) with and without GPTQ compensation."""
import pytest
import torch

from bitsmith.formats.packing import unpack
from bitsmith.kernels import reference
from bitsmith.kernels.w4a8_linear import W4A8Linear
from bitsmith.quantize.qoq import PROTECTIVE_INT8, fit_group, qoq_quantize, to_uint4


def test_protective_range_keeps_every_level1_value_in_int8():
    """Brute force over every level-0 range [lo, hi] in the protective range: (q - z) * s2 fits int8."""
    lo, hi = torch.meshgrid(torch.arange(-PROTECTIVE_INT8, 1.0), torch.arange(0.0, PROTECTIVE_INT8 + 1),
                            indexing="ij")
    W8 = torch.stack([lo.flatten(), hi.flatten()], dim=1)                 # the extremes of each group
    s2, z = fit_group(W8)
    values = (to_uint4(W8, s2[:, None], z[:, None]) - z[:, None]) * s2[:, None]
    assert s2.min() >= 1 and s2.max() <= 16 and z.min() >= 0 and z.max() <= 15
    assert values.min() >= -128 and values.max() <= 127


@pytest.mark.parametrize("group_size", [64, 128, -1])
def test_layout_and_exact_dequantized_weight(group_size):
    torch.manual_seed(0)
    W = torch.randn(96, 256) * 0.05
    W[3] = 0                                                              # a dead output channel
    qoq = qoq_quantize(W, group_size=group_size)
    G = 1 if group_size == -1 else 256 // group_size
    t = qoq.tensors()
    assert t["qweight"].dtype == torch.int32 and t["qweight"].shape == (256 // 8, 96)
    assert t["channel_scale"].dtype == torch.float16 and t["channel_scale"].shape == (96,)
    for name in ("group_scale", "group_zero"):
        assert t[name].dtype == torch.int8 and t[name].shape == (G, 96)
    assert torch.equal(W4A8Linear.from_quantized(qoq).dequantize(), qoq.Q)
    assert not qoq.Q[3].any() and torch.isfinite(qoq.channel_scale.float()).all()
    assert unpack(qoq.qweight, 4, 256).max() <= 15
    rel = ((qoq.Q - W).norm() / W.norm()).item()
    assert rel < 0.12                                                     # 4-bit grid on Gaussian weights


def correlated_inputs(K, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(K, K, generator=gen) / K**0.5 + torch.eye(K)
    return mix @ torch.randn(K, n, generator=gen) * torch.linspace(0.2, 3, K)[:, None]


def test_gptq_compensation_lowers_the_output_error():
    torch.manual_seed(1)
    W = torch.randn(64, 256) * 0.05
    X = correlated_inputs(256, 2048)
    H = 2 * X @ X.t() / X.shape[1]
    rtn, gptq = qoq_quantize(W, group_size=64), qoq_quantize(W, H, group_size=64)
    err = lambda Q: ((Q - W) @ X).norm().item()
    assert err(gptq.Q) < 0.92 * err(rtn.Q)                               # measured ratio 0.88
    assert torch.equal(W4A8Linear.from_quantized(gptq).dequantize(), gptq.Q)
    W8 = reference.qoq_int8_weight(gptq.qweight, gptq.group_scale, gptq.group_zero, 256, 64)
    assert W8.abs().max() <= 127


def test_dead_inputs_and_bad_inputs():
    W = torch.randn(32, 128)
    H = torch.eye(128)
    H[5, 5] = 0
    assert not qoq_quantize(W, H, group_size=32).Q[:, 5].any()
    with pytest.raises(ValueError, match="multiple of the group size"):
        qoq_quantize(torch.randn(8, 100), group_size=64)
    W[0, 0] = float("nan")
    with pytest.raises(ValueError):
        qoq_quantize(W)

"""The torch reference ops (the ground truth of every kernel and the CPU inference path)."""
import torch

from bitsmith.formats.packing import pack
from bitsmith.kernels import reference


def rel_err(y, ref):
    return ((y.double() - ref).norm() / ref.norm()).item()


def test_weight_only_linear_is_x_times_dequantized_w_transposed():
    torch.manual_seed(0)
    K, N, g = 384, 192, 128
    q = torch.randint(0, 16, (K, N), dtype=torch.uint8)
    scales = (torch.rand(K // g, N) * 0.01 + 1e-3).half()
    zeros = torch.randint(0, 16, (K // g, N))
    qzeros = pack((zeros - 1) & 15, 4, dim=1)
    g_idx = reference.group_index(K, g)
    x = torch.randn(5, K)
    W = reference.dequantize(pack(q, 4, 0), scales, qzeros, g_idx, 4, K).double()
    y = reference.weight_only_linear(x, pack(q, 4, 0), scales, qzeros, g_idx, 4, K, bias=torch.ones(N).half())
    assert rel_err(y, x.double() @ W.t() + 1) < 1e-6
    assert y.dtype == x.dtype


def test_quantize_per_token_scale_range_and_rounding():
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -127.0],     # scale 1: ties round to even
                      [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],           # all-zero token keeps a finite scale
                      [1e-3, -2e-3, 3e-3, 0.0, 0.0, 0.0]])
    x_q, scale = reference.quantize_per_token(x)
    assert x_q.dtype == torch.int8 and scale.dtype == torch.float32
    assert x_q[0].tolist() == [127, 0, 2, 2, 0, -127]
    assert x_q[1].abs().max() == 0 and scale[1] == reference.ACT_MIN_SCALE
    assert x_q[2].abs().max() == reference.ACT_QMAX
    assert torch.allclose(scale[2], torch.tensor(3e-3 / 127))


def test_int8_matmul_is_exact_at_the_extremes():
    a = torch.full((3, 640), 127, dtype=torch.int8)
    a[1] = -127
    b = torch.full((640, 48), -127, dtype=torch.int8)
    assert torch.equal(reference.int8_matmul(a, b).long(), a.long() @ b.long())


def test_qoq_dequantize_and_w4a8_linear():
    torch.manual_seed(1)
    K, N, g = 256, 64, 64
    q = torch.randint(0, 16, (K, N), dtype=torch.uint8)
    s2 = torch.randint(1, 9, (K // g, N), dtype=torch.int8)
    z = torch.randint(0, 16, (K // g, N), dtype=torch.int8)
    s1 = (torch.rand(N) * 1e-3 + 1e-4).half()
    W8 = reference.qoq_int8_weight(pack(q, 4, 0), s2, z, K, g)
    rows = torch.arange(K) // g
    expected = ((q.int() - z[rows].int()) * s2[rows].int()).t()
    assert W8.dtype == torch.int8 and torch.equal(W8.int(), expected)
    W = reference.qoq_dequantize(pack(q, 4, 0), s1, s2, z, K, g)
    assert torch.equal(W, s1.float()[:, None] * expected.float())
    x = torch.randn(2, 3, K).half()
    y = reference.w4a8_linear(x, W8, s1)
    x_q, s_tok = reference.quantize_per_token(x.reshape(-1, K))
    ref = (x_q.double() * s_tok.double()[:, None]) @ W.double().t()
    assert y.shape == (2, 3, N) and y.dtype == torch.float16
    assert rel_err(y.reshape(-1, N), ref) < 1e-3


def test_csr_add_and_dense_sparse_dequantize():
    from bitsmith.formats.csr import to_csr
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(6, 50, generator=g) < 0.1
    S = torch.randn(6, 50, generator=g)
    csr = to_csr(mask, S)
    dense = torch.where(mask, S.half().float(), 0.0)
    x, y = torch.randn(4, 50, generator=g), torch.randn(4, 6, generator=g)
    before = y.clone()
    out = reference.csr_add(y, x, csr.values, csr.cols, csr.row_ptr)
    assert torch.equal(y, before) and out.dtype == y.dtype                   # a new tensor; y is left alone
    assert rel_err(out, y.double() + x.double() @ dense.double().t()) < 1e-6
    assert torch.equal(reference.csr_rows(csr.row_ptr), mask.nonzero()[:, 0])
    q = torch.full((50, 6), 8, dtype=torch.uint8)                           # every code at the zero point: W = S
    W = reference.dense_sparse_dequantize(pack(q, 4, 0), torch.ones(1, 6).half(), pack(torch.full((1, 6), 7), 4, 1),
                                          torch.zeros(50, dtype=torch.int32), 4, 50, csr.values, csr.cols, csr.row_ptr)
    assert torch.equal(W, dense)

"""CPU paths (kernels/cpu.py): every layout in torch's int4 form holds exactly the reference W, both CPU paths
compute the layer, and the dispatcher picks cpu_int4 for few rows and cpu_dense for many."""
from functools import cache

import pytest
import torch
import torch.nn.functional as F

from bitsmith.formats.packing import pack, unpack
from bitsmith.kernels import cpu, dispatch, reference
from bitsmith.kernels.linear import DenseSparseLinear, QuantizedLinear

K, N = 400, 40          # neither a multiple of 32 (K padding) nor of 16 (N padding)
BF16_TOL = 2 ** -7      # cpu_int4: activations, scales, m and outputs rounded to bf16, fp32 accumulation
FP32_TOL = 1e-6         # cpu_dense: the reference's W, one fp32 product
BITS, GROUPS, ROWS = (2, 3, 4, 5, 6, 8), (32, 128, -1), (1, 3, 8, 64)


def rel_err(y, ref):
    assert not torch.isnan(y).any()
    return ((y.double() - ref).norm() / ref.norm()).item()


@cache
def layer(bits: int, group_size: int, act_order: bool, outliers: int = 0, in_features: int = K) -> QuantizedLinear:
    """A linear with random codes and asymmetric grids (act-order: equal groups over a permutation of the inputs);
    with `outliers` per row, a DenseSparseLinear whose codes there are the zero point."""
    gen = torch.Generator().manual_seed(1000 * bits + group_size + act_order)
    G = 1 if group_size == -1 else -(-in_features // group_size)
    q = torch.randint(0, 1 << bits, (in_features, N), generator=gen, dtype=torch.uint8)
    zeros = torch.randint(0, 1 << bits, (G, N), generator=gen)
    g_idx = reference.group_index(in_features, group_size)
    if act_order:
        g_idx = g_idx[torch.randperm(in_features, generator=gen)]
    state = {"qweight": pack(q, bits, 0), "scales": (torch.rand(G, N, generator=gen) * 0.02 + 1e-3).half(),
             "qzeros": pack((zeros - 1) & ((1 << bits) - 1), bits, 1), "g_idx": g_idx}
    if not outliers:
        module = QuantizedLinear(in_features, N, bits, group_size, has_g_idx=True)
    else:
        module = DenseSparseLinear(in_features, N, bits, group_size, N * outliers, has_g_idx=True)
        cols = torch.sort(torch.rand(N, in_features, generator=gen).argsort(dim=1)[:, :outliers], dim=1).values
        rows = torch.arange(N).repeat_interleave(outliers)
        q[cols.reshape(-1), rows] = zeros[g_idx.long()[cols.reshape(-1)], rows].to(torch.uint8)
        state.update(qweight=pack(q, bits, 0), outlier_values=(torch.randn(N * outliers, generator=gen) * 0.5).half(),
                     outlier_cols=cols.reshape(-1).to(torch.int16),
                     outlier_row_ptr=(torch.arange(N + 1) * outliers).int())
    module.load_state_dict(state)
    return module


def int4_weight(codes, scale, m, g, src, in_features) -> torch.Tensor:
    """The W [N', K] the int4 operands stand for, in float64: (codes - 8) scale + m per kernel group, every
    kernel column added into the input channel it reads (padding into a dropped column K)."""
    w = (codes.double() - 8).unflatten(1, (-1, g)) * scale.t().double()[:, :, None] + m.t().double()[:, :, None]
    return torch.zeros(len(codes), in_features + 1, dtype=torch.float64).index_add_(1, src, w.flatten(1))[:, :-1]


@pytest.mark.parametrize("group_size", (*GROUPS, 16, 48))
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("act_order", [False, True])
def test_int4_operands_hold_the_reference_weights_exactly(bits, group_size, act_order):
    module = layer(bits, group_size, act_order)
    codes, scale, m, g, src = cpu.int4_operands(*module.runtime().layout)
    assert codes.dtype == torch.int32 and 0 <= codes.min() and codes.max() <= 15
    assert g in cpu.KERNEL_GROUPS and codes.shape[1] % g == 0 and len(codes) % cpu.N_ALIGN == 0
    W = int4_weight(codes, scale, m, g, src, K)
    assert torch.equal(W[:N], module.dequantize().double())
    assert not W[N:].any()                                   # the N padding multiplies to 0


@pytest.mark.parametrize("M", ROWS)
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("act_order", [False, True], ids=["natural", "act-order"])
def test_cpu_paths_compute_the_layer(bits, group_size, act_order, M):
    rt = layer(bits, group_size, act_order).runtime()
    W = reference.dequantize(*rt.layout).double()
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M))
    ref = x.double() @ W.t()
    assert rel_err(rt(x, "cpu_dense"), ref) < FP32_TOL
    y = rt(x, "cpu_int4")
    assert y.dtype == torch.float32 and y.shape == (M, N)
    assert rel_err(y, ref) < BF16_TOL


@pytest.mark.parametrize("M", ROWS)
@pytest.mark.parametrize("bits,group_size,act_order", [(4, 128, False), (3, 32, True), (2, -1, True), (8, 128, True)])
def test_dense_sparse_cpu_paths_compute_the_layer(bits, group_size, act_order, M):
    module = layer(bits, group_size, act_order, outliers=3)
    rt = module.runtime()
    W = module.dequantize().double()
    assert not torch.equal(W, QuantizedLinear.dequantize(module).double())       # the outliers are written over
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M))
    ref = x.double() @ W.t()
    assert rel_err(rt(x, "cpu_dense"), ref) < FP32_TOL                          # outliers written into W
    assert rel_err(rt(x, "cpu_int4"), ref) < BF16_TOL                           # int4 GEMM, then the CSR add
    assert rel_err(rt(x, "reference"), ref) < FP32_TOL


def test_forward_takes_cpu_int4_for_few_rows_and_cpu_dense_for_many():
    module = layer(4, 128, True)
    rt = module.runtime()
    assert [rt.path(M, "cpu") for M in (0, 1, 3, 8, 64, 65, 2048)] == ["cpu_int4"] * 5 + ["cpu_dense"] * 2
    assert [rt.path(M, torch.device("cpu")) for M in (64, 65)] == ["cpu_int4", "cpu_dense"]
    assert [rt.path(M, "cuda") for M in (1, 8, 65, 256)] == ["gemv", "dense", "dense", "dense"]   # unchanged
    W = module.dequantize().double()
    for rows, tol in ((dispatch.CPU_INT4_MAX_M, BF16_TOL), (dispatch.CPU_INT4_MAX_M + 1, FP32_TOL)):
        x = torch.randn(1, rows, K)
        assert rel_err(module(x), x.double() @ W.t()) < tol


@pytest.mark.parametrize("make", [lambda: layer(3, 16, False), lambda: layer(8, -1, True),
                                  lambda: layer(2, 128, False, outliers=2)], ids=["3bit-g16", "8bit-act", "sparse"])
def test_every_layout_decodes_on_cpu_int4(make):
    rt = make().runtime()
    assert rt.path(1, "cpu") == "cpu_int4" and getattr(rt, "dense", rt).cpu_int4 is not None
    assert rt.path(dispatch.CPU_INT4_MAX_M + 1, "cpu") == "cpu_dense"


@pytest.mark.parametrize("in_features,group_size,act_order,g,gathers", [
    (576, 128, False, 64, False),        # groups of 128 and a last one of 64: kernel groups of 64, no padding
    (1536, -1, False, 256, False),       # one group of K: the largest kernel group dividing it
    (400, 16, False, 32, True),          # groups of 16: each padded to 32
    (512, 128, True, 128, True),         # act-order: sorted by group, no padding
])
def test_kernel_grouping(in_features, group_size, act_order, g, gathers):
    g_idx = reference.group_index(in_features, group_size)
    if act_order:
        g_idx = g_idx[torch.randperm(in_features, generator=torch.Generator().manual_seed(0))]
    got, src, group = cpu.kernel_grouping(g_idx)
    assert got == g and len(src) == len(group) * g
    assert (not torch.equal(src, torch.arange(in_features))) == gathers
    real = src < in_features
    assert torch.equal(torch.sort(src[real]).values, torch.arange(in_features))     # every channel exactly once
    assert torch.equal(g_idx[src[real]].long(), group.repeat_interleave(g)[real])   # inside its own group


@pytest.mark.parametrize("bits", BITS)
def test_unpack_codes_reads_current_and_whole_run_packing(bits):
    q = torch.randint(0, 1 << bits, (K, 24), generator=torch.Generator().manual_seed(bits), dtype=torch.uint8)
    packed = pack(q, bits, 0)
    whole_runs = F.pad(packed, (0, 0, 0, -(-K // 32) * bits - len(packed)))        # earlier versions' padding
    for words in (packed, whole_runs):
        assert torch.equal(cpu.unpack_codes(words, bits, K), unpack(words, bits, K, dim=0))
    out = torch.empty(K, 24)
    assert torch.equal(cpu.unpack_codes(packed, bits, K, out), q.float())


def test_activation_dtypes_and_empty_input():
    rt = layer(4, 32, False).runtime()
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.randn(3, K).to(dtype)
        for path in ("cpu_int4", "cpu_dense"):
            assert rt(x, path).dtype == dtype
    assert rt(torch.randn(0, K), "cpu_int4").shape == (0, N)


def test_dense_buffer_is_shared_and_autograd_gets_its_own():
    a, b = layer(4, 128, False).runtime(), layer(3, 32, True).runtime()
    shared = cpu.buffer(K, N, torch.randn(1, K))
    assert cpu.buffer(K // 2, N, torch.randn(1, K)).data_ptr() == shared.data_ptr()
    x = torch.randn(70, K, requires_grad=True)
    assert cpu.buffer(K, N, x).data_ptr() != shared.data_ptr()
    y = a(x, "cpu_dense")
    b(torch.randn(70, K), "cpu_dense")                        # overwrites the shared buffer, not a's W
    y.sum().backward()
    W = reference.dequantize(*a.layout)
    assert torch.allclose(x.grad, W.sum(0).expand(70, K), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("M", [0, 1, 2, 7])
def test_bf16_product_is_the_bf16_gemm_bit_for_bit(M):
    gen = torch.Generator().manual_seed(M)
    W, x = torch.randn(300, 72, generator=gen).to(torch.bfloat16), torch.randn(M, 72, generator=gen)
    y = cpu.bf16_product(x, W)
    assert y.dtype == torch.float32 and y.shape == (M, 300)
    assert torch.equal(y, F.linear(x.to(torch.bfloat16), W).float())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("in_features,out_features,rows", [(400, 40, 16), (576, 192, 128), (64, 100, 100), (96, 37, 8)])
@pytest.mark.parametrize("M", ROWS)
def test_per_input_channel_decode_computes_the_layer_from_codes(bits, in_features, out_features, rows, M):
    """cpu.PerICWeights: the int4 (int8 at 8 bits) GEMM per group of output rows minus the zero-point term, within
    bf16 rounding of the reference W (K and the row groups padded: neither is a multiple of what the int4 kernel
    takes)."""
    from bitsmith.quantize.per_ic import PerICWeight
    gen = torch.Generator().manual_seed(bits * in_features + out_features + rows)
    G = -(-out_features // rows)
    codes = torch.randint(0, 1 << bits, (out_features, in_features), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(G, in_features, generator=gen) * 0.02 + 1e-3).half()
    zeros = torch.randint(0, 1 << bits, (G, in_features), generator=gen, dtype=torch.int32)
    W = PerICWeight.dequantize(codes, scales, zeros, rows).double()
    form = cpu.PerICWeights(codes, scales, zeros, bits, rows)
    x = torch.randn(M, in_features, generator=gen)
    assert rel_err(form(x), x.double() @ W.t()) < BF16_TOL
    held = sum(p.numel() * p.element_size() for p, _ in form.groups)
    assert held <= (out_features * in_features if bits == 8 else out_features * (in_features + 32) // 2 + 16 * in_features)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("in_features,out_features", [(400, 40), (96, 37), (64, 1)])
@pytest.mark.parametrize("M", ROWS)
def test_lookup_table_decode_holds_each_table_on_an_8_bit_grid(bits, in_features, out_features, M):
    """cpu.TableWeights: every weight within half a level (a level at most range / 252) of its table value, one byte
    per weight, and
    the product that of the form's weights up to bf16 rounding; a constant row is held exactly."""
    gen = torch.Generator().manual_seed(bits * in_features + out_features)
    codes = torch.randint(0, 1 << bits, (out_features, in_features), generator=gen, dtype=torch.uint8)
    table = (torch.randn(out_features, 1 << bits, generator=gen) * 0.05 + 0.01).half()
    table[0] = 0.0125
    W = table.float().gather(1, codes.long())
    form = cpu.TableWeights(codes, table)
    span = table.float().amax(1) - table.float().amin(1)
    level = form.scale.float()[:, None]
    assert (level[1:] <= span[1:, None] / 252).all()
    assert ((form.weight() - W).abs() <= level / 2 * (1 + 1e-5)).all()
    assert torch.equal(form.weight()[0], W[0])
    assert form.levels.dtype == torch.int8 and form.levels.shape == (out_features, in_features)
    x = torch.randn(M, in_features, generator=gen)
    y = form(x)
    assert rel_err(y, x.double() @ form.weight().double().t()) < BF16_TOL
    assert rel_err(y, x.double() @ W.double().t()) < 2 * BF16_TOL


def test_modules_without_a_fused_kernel_decode_from_codes():
    """A PerICLinear decodes through the int4 form up to 4 bits and the int8 form above, a LUTLinear through its
    8-bit levels: no bf16 copy of W is made; a new state dict makes the form again."""
    from bitsmith.kernels.lut_linear import LUTLinear
    from bitsmith.kernels.per_ic_linear import PerICLinear
    for bits in (2, 4, 5, 8):
        module = PerICLinear(96, 40, bits, 16)
        module.qweight.random_(generator=torch.Generator().manual_seed(bits))
        module.scales.fill_(0.01)
        module(torch.randn(1, 96))
        assert isinstance(module._decode[1], cpu.PerICWeights) and module._decode[1].int8 == (bits > 4)
    module = LUTLinear(96, 40, 3)
    module.lut.copy_(torch.linspace(-1, 1, 8).expand(40, 8))
    x = torch.randn(2, 96, generator=torch.Generator().manual_seed(0))
    assert rel_err(module(x), x.double() @ module.dequantize().double().t()) < 2 * BF16_TOL
    assert isinstance(module._decode[1], cpu.TableWeights)
    state = module.state_dict()
    state["lut"] = state["lut"] * 2
    module.load_state_dict(state)
    assert rel_err(module(x), x.double() @ module.dequantize().double().t()) < 2 * BF16_TOL

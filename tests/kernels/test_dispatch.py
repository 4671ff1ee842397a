"""Dispatch: which path a call takes by device and M, and that every path computes the same layer."""
import importlib.util

import pytest
import torch

from bitsmith.formats.packing import pack, unpack
from bitsmith.kernels import dispatch, reference
from bitsmith.kernels.linear import DenseSparseLinear, QuantizedLinear
from bitsmith.kernels.w4a8_linear import W4A8Linear
from bitsmith.layouts import DQLayout
from bitsmith.plan import LayerPlan
from bitsmith.quantize.gptq import gptq_quantize
from bitsmith.quantize.qoq import qoq_quantize

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="triton is not installed: Triton paths cannot run")
K, N = 384, 192
BF16_TOL = 2 ** -7    # cpu_int4 rounds activations, scales and outputs to bf16 (kernels/cpu.py)


def gptq_layer(bits=4, group_size=128, g_idx=None, sym=False, bias=False, seed=0, in_features=K):
    """A QuantizedLinear filled with random codes in the GPTQ layout."""
    gen = torch.Generator().manual_seed(seed)
    layer = QuantizedLinear(in_features, N, bits, group_size, bias=bias, has_g_idx=g_idx is not None)
    G = layer.scales.shape[0]
    q = torch.randint(0, 1 << bits, (in_features, N), generator=gen, dtype=torch.uint8)
    zeros = torch.full((G, N), 1 << (bits - 1)) if sym else torch.randint(0, 1 << bits, (G, N), generator=gen)
    layer.qweight.copy_(pack(q, bits, 0))
    layer.scales.copy_(torch.rand(G, N, generator=gen) * 0.02 + 1e-3)
    layer.qzeros.copy_(pack((zeros - 1) & ((1 << bits) - 1), bits, 1))
    if g_idx is not None:
        layer.g_idx.copy_(g_idx)
    if bias:
        layer.bias.copy_(torch.randn(N, generator=gen))
    return layer


def act_order_g_idx(group_size=128, seed=0, in_features=K):
    """g_idx as GPTQ act-order writes it: equal-size groups over a permutation of the input channels."""
    perm = torch.randperm(in_features, generator=torch.Generator().manual_seed(seed))
    return (torch.argsort(perm) // group_size).int()


def rel_err(y, ref):
    assert not torch.isnan(y).any()
    return ((y.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("M,large,small,cpu_path", [(1, "gemv", "gemv", "cpu_int4"), (3, "splitk", "dense", "cpu_int4"),
                                                    (64, "splitk", "dense", "cpu_int4"), (65, "dense", "dense", "cpu_dense"),
                                                    (256, "dense", "dense", "cpu_dense")])
def test_w4a16_path_by_device_m_and_layer_size(M, large, small, cpu_path, monkeypatch):
    """Split-K for few rows on large layers, dequantize-then-matmul otherwise (the H200 measurements in dispatch.py)."""
    rt = gptq_layer().runtime()
    assert rt.path(M, "cuda") == small and rt.path(M, "cpu") == cpu_path
    monkeypatch.setattr(dispatch, "SPLITK_MIN_WEIGHTS", rt.K * rt.N)     # this layer as large as the cut-off
    assert rt.path(M, "cuda") == large and rt.path(M, "cpu") == cpu_path


@pytest.mark.parametrize("layer,reason", [
    (lambda: gptq_layer(bits=3, group_size=16), "a 3-bit group of 16 codes is half a run of 32"),
    (lambda: gptq_layer(g_idx=torch.randint(0, 3, (K,), generator=torch.Generator().manual_seed(0)).int()),
     "groups of unequal size"),
])
def test_layouts_the_triton_kernels_do_not_cover_fall_back_to_the_reference(layer, reason):
    rt = layer().runtime()
    assert rt.path(1, "cuda") == "reference", reason
    assert rt.path(1, "cpu") == "cpu_int4"                     # the CPU form pads groups instead


def test_3bit_layers_take_the_triton_paths():
    for case in ({"bits": 3}, {"bits": 3, "group_size": -1}, {"bits": 3, "g_idx": act_order_g_idx()}):
        rt = gptq_layer(**case).runtime()
        assert [rt.path(M, "cuda") for M in (1, 3, 65, 256)] == ["gemv", "dense", "dense", "dense"], case
        assert rt.path(1, "cpu") == "cpu_int4"


@needs_triton
@pytest.mark.parametrize("case", [{"bits": 5}, {"bits": 6, "group_size": 32}, {"bits": 5, "group_size": -1},
                                  {"bits": 6, "g_idx": act_order_g_idx()}], ids=["5bit", "6bit-g32", "5bit-per-channel",
                                                                                "6bit-act-order"])
def test_5_and_6_bit_layers_dequantize_with_triton_then_multiply(poisoned_outputs, case):
    """The GEMM kernels unroll GPTQ's widths only; 5 and 6 bits take the dequantize kernel at every M on CUDA
    (checked here through the Triton interpreter against the reference)."""
    rt = gptq_layer(**case, seed=5).runtime()
    assert [rt.path(M, "cuda") for M in (1, 3, 65)] == ["dense"] * 3 and rt.path(1, "cpu") == "cpu_int4"
    W = reference.dequantize(*rt.layout).double()
    x = torch.randn(3, rt.K, generator=torch.Generator().manual_seed(0)).half()
    assert rel_err(rt(x, "dense"), x.double() @ W.t()) <= 1e-3


def test_w4a8_path_by_device_and_m():
    rt = W4A8Linear.from_quantized(qoq_quantize(torch.randn(N, K), group_size=128)).runtime()
    assert [rt.path(M, "cuda") for M in (1, 64, 65, 4096)] == ["splitk", "splitk", "tiled", "tiled"]
    assert rt.path(1, "cpu") == "reference"


W4A16_CASES = [{}, {"sym": True}, {"group_size": 64}, {"group_size": -1},
               {"g_idx": act_order_g_idx()}, {"bits": 8, "group_size": 32},
               {"bits": 3, "group_size": 32}, {"bits": 3, "group_size": -1}, {"bits": 3, "g_idx": act_order_g_idx()},
               {"bits": 3, "in_features": 400, "g_idx": act_order_g_idx(in_features=400)}]


@needs_triton
@pytest.mark.parametrize("case", W4A16_CASES, ids=["asym", "sym", "g64", "per-channel", "act-order", "8bit-g32",
                                                   "3bit-g32", "3bit-per-channel", "3bit-act-order",
                                                   "3bit-act-order-k400"])
@pytest.mark.parametrize("M,path", [(1, "gemv"), (3, "splitk"), (17, "splitk"), (64, "splitk"), (17, "tiled"),
                                    (17, "dense")])
def test_every_w4a16_path_computes_the_layer(poisoned_outputs, case, M, path):
    rt = gptq_layer(**case, seed=M).runtime()
    W = reference.dequantize(*rt.layout).double()
    x = torch.randn(M, rt.K).half()
    assert rel_err(rt(x, path), x.double() @ W.t()) <= 1e-3


@needs_triton
@pytest.mark.parametrize("M,path", [(1, "gemv"), (17, "splitk"), (17, "tiled")])
def test_a_linear_with_double_quantized_scales_takes_the_w4a16_paths(poisoned_outputs, M, path):
    """DQLinear (layouts.py DQLayout) runs GPTQ's kernels on the scales it expands at load, its g_idx stored as uint8."""
    gen = torch.Generator().manual_seed(M)
    X = torch.randn(768, K, generator=gen) * torch.logspace(0, 1.5, K)
    qw = gptq_quantize(0.05 * torch.randn(N, K, generator=gen), 2 * X.t() @ X / 768, 4, 64, act_order=True, dq=True)
    module = DQLayout.module(K, N, LayerPlan(4, 64, False, dq=True), bias=False)
    module.load_state_dict(DQLayout.tensors(qw), assign=True)
    assert module.g_idx.dtype == torch.uint8
    x = torch.randn(M, K).half()
    assert rel_err(module.runtime()(x, path), x.double() @ qw.Q.double().t()) <= 1e-3


@needs_triton
@pytest.mark.parametrize("M,path", [(1, "splitk"), (3, "splitk"), (17, "splitk"), (64, "splitk"), (17, "tiled")])
def test_every_w4a8_path_computes_the_layer(poisoned_outputs, M, path):
    qoq = qoq_quantize(torch.randn(N, K) * 0.02, group_size=128)
    rt = W4A8Linear.from_quantized(qoq).runtime()
    x = torch.randn(M, K).half()
    x_q, s_tok = reference.quantize_per_token(x)
    ref = (x_q.double() * s_tok.double()[:, None]) @ qoq.Q.double().t()
    assert rel_err(rt(x, path), ref) <= 1e-3
    assert rel_err(rt(x, "reference"), ref) <= 1e-3


def test_cpu_forward_matches_the_reference_on_every_cpu_path():
    layer = gptq_layer(g_idx=act_order_g_idx(), bias=True)
    W = layer.dequantize().double()
    for M, tol in ((1, BF16_TOL), (dispatch.CPU_INT4_MAX_M // 2, BF16_TOL), (dispatch.CPU_INT4_MAX_M // 2 + 1, 1e-5)):
        x = torch.randn(2, M, K)                                  # 2 * M rows: cpu_int4, cpu_int4, cpu_dense
        y = layer(x)
        assert y.shape == (2, M, N) and y.dtype == torch.float32
        assert rel_err(y, x.double() @ W.t() + layer.bias.double()) < tol


def test_runtime_follows_new_weights():
    layer = gptq_layer(seed=0)
    x = torch.randn(1, K, generator=torch.Generator().manual_seed(0))
    layer(x)
    layer.load_state_dict(gptq_layer(seed=1).state_dict())
    assert rel_err(layer(x), x.double() @ layer.dequantize().double().t()) < BF16_TOL
    layer.qweight = gptq_layer(seed=2).qweight.clone()                    # a new tensor object (all-zero codes
    assert rel_err(layer(x), x.double() @ layer.dequantize().double().t()) < BF16_TOL   # cancel: ill-conditioned)


def test_w4a8_linear_cpu_forward_and_state_dict_round_trip():
    qoq = qoq_quantize(torch.randn(N, K) * 0.02, group_size=64)
    layer = W4A8Linear.from_quantized(qoq, bias=torch.randn(N))
    assert torch.equal(layer.dequantize(), qoq.Q)
    clone = W4A8Linear(K, N, group_size=64, bias=True)
    clone.load_state_dict(layer.state_dict())
    x = torch.randn(4, K)
    x_q, s_tok = reference.quantize_per_token(x)
    ref = (x_q.double() * s_tok.double()[:, None]) @ qoq.Q.double().t() + layer.bias.double()
    assert rel_err(clone(x), ref) < 1e-5
    assert set(layer.state_dict()) == {"qweight", "channel_scale", "group_scale", "group_zero", "bias"}


def dense_sparse_layer(per_row=3, seed=0, **case):
    """A DenseSparseLinear: random GPTQ codes with `per_row` outliers in every row, their codes the zero point."""
    dense = gptq_layer(seed=seed, **case)
    gen = torch.Generator().manual_seed(seed + 1)
    K_ = dense.in_features
    layer = DenseSparseLinear(K_, N, dense.bits, dense.group_size, N * per_row, bias=dense.bias is not None,
                              has_g_idx=dense.g_idx is not None)
    cols = torch.sort(torch.rand(N, K_, generator=gen).argsort(dim=1)[:, :per_row], dim=1).values
    zeros = reference.unpack_zeros(dense.qzeros, dense.bits, N)[dense.group_index().long()]      # [K, N]
    q = unpack(dense.qweight, dense.bits, K_, dim=0)
    q[cols.t().reshape(-1), torch.arange(N).repeat(per_row)] = zeros[cols.t().reshape(-1),
                                                                   torch.arange(N).repeat(per_row)].to(q.dtype)
    state = {**dense.state_dict(), "qweight": pack(q, dense.bits, 0),
             "outlier_values": (torch.randn(N * per_row, generator=gen) * 0.5).half(),
             "outlier_cols": cols.reshape(-1).to(torch.int16),
             "outlier_row_ptr": (torch.arange(N + 1) * per_row).int()}
    layer.load_state_dict(state)
    return layer


@pytest.mark.parametrize("case", [{}, {"g_idx": act_order_g_idx()}, {"bits": 3, "group_size": 32}])
def test_dense_sparse_cpu_paths_compute_the_layer(case):
    layer = dense_sparse_layer(**case)
    W = layer.dequantize().double()
    assert not torch.equal(W, QuantizedLinear.dequantize(layer).double())      # the outliers are written over
    rt = layer.runtime()
    assert isinstance(rt, dispatch.DenseSparseRuntime) and rt.path(1, "cuda") == rt.dense.path(1, "cuda")
    x = torch.randn(dispatch.CPU_INT4_MAX_M + 1, K)
    assert rt.path(len(x), "cpu") == "cpu_dense"
    assert rel_err(layer(x), x.double() @ W.t()) < 1e-6                     # the whole W at once, outliers in
    assert torch.equal(rt(x, "reference"), x @ W.float().t())
    x = torch.randn(1, K)
    assert rt.path(1, "cpu") == "cpu_int4"
    assert rel_err(layer(x), x.double() @ W.t()) < BF16_TOL                 # int4 GEMM + the sparse add


@needs_triton
@pytest.mark.parametrize("M,path", [(1, "gemv"), (17, "splitk"), (17, "tiled"), (17, "dense")])
def test_dense_sparse_triton_dense_part_plus_sparse_add(poisoned_outputs, M, path):
    from bitsmith.kernels import triton_csr
    layer = dense_sparse_layer(g_idx=act_order_g_idx(), seed=M)
    rt = layer.runtime()
    x = torch.randn(M, K).half()
    y = triton_csr.csr_add_(rt.dense(x, path), x, rt.values, rt.cols, rt.row_ptr)   # what CUDA runs
    assert rel_err(y, x.double() @ layer.dequantize().double().t()) <= 1e-3


def test_tuning_leaves_out_configurations_that_do_not_fit_the_gpu(monkeypatch):
    """A candidate tile that needs more shared memory than the GPU has raises OutOfResources when launched: the
    tuner times the others and picks the fastest of them; when none fits it says so."""
    import triton.testing
    from triton.runtime.errors import OutOfResources
    monkeypatch.setattr(dispatch, "interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: fn())
    times = {"big": None, "slow": 3.0, "fast": 1.0}

    def run(c):
        if times[c] is None:
            raise OutOfResources(344064, 232448, "shared memory")
        return times[c]
    assert dispatch.pick_config(("test-fit",), lambda: ["big", "slow", "fast"], run) == "fast"
    assert dispatch.pick_config(("test-fit",), lambda: 1 / 0, run) == "fast"          # tuned: no list made
    with pytest.raises(RuntimeError, match="no launch configuration of test-none fits"):
        dispatch.pick_config(("test-none",), lambda: ["big", "big"], run)
    dispatch._TUNED.pop(("test-fit",))

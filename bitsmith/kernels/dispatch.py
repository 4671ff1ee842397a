"""Dispatch: the load-time form of a quantized layer, and the choice of kernel by device, shape and M.

A runtime object is built once per layer and device from the checkpoint tensors (the canonical layout
of kernels/reference.py); `path(M, device)` names the computation a call with M rows takes, and calling
the object runs it.

W4A16 paths                                            W4A8 paths
  reference  torch dequantize + matmul (any layout)      reference  torch int8 GEMM (CPU)
  cpu_int4   CPU, M <= CPU_INT4_MAX_M: torch's int4       splitk     Triton int8 GEMM, split-K, M <= 64
             GEMM on packed codes, in bf16 (any layout)  tiled      Triton int8 GEMM, M > 64
  cpu_dense  CPU, larger M: W dequantized once into a
             shared buffer, fp32 matmul (any layout)
  gemv       Triton, M = 1
  splitk     Triton tl.dot, split-K, M <= 64 on layers of
             at least SPLITK_MIN_WEIGHTS weights
  dense      Triton dequantize once, then torch.matmul:
             every other M
  tiled      Triton tl.dot (asked for by name only)

kernels/cpu.py describes the CPU forms: every bit width, group size, act-order and N fits cpu_int4, whose
activations and outputs go through bf16 (torch's kernel is vectorized for bf16 only), while cpu_dense is exact in
float32. A dense-and-sparse linear (DenseSparseRuntime) takes the W4A16 path of its codes, then adds its CSR
outliers (kernels/triton_csr.py on CUDA, torch elsewhere); its reference and cpu_dense paths multiply by the
whole W, outliers written in.
"""
from __future__ import annotations

import math
import os

import torch

from ..formats.packing import GPTQ_BITS, pack, unpack
from . import cpu, reference

# W4A16 cut-offs from bench/results/kernels-h200.md (H200, 2026-12-04, the paths side by side): split-K is ahead of
# dequantize-then-cuBLAS for 2 <= M <= 64 on 8192 x 28672 and 28672 x 8192 (165 vs 317 us at M = 4, 291 vs 320 at
# M = 64) and behind it from M = 256 (924 vs 376), and on 4096 x 4096 ... 11008 x 4096 behind it at every M
# (185 vs 73 us at M = 4 on 4096 x 11008); the tiled GEMM was ahead of both once, by 2 % (M = 64 on 8192 x 28672).
SPLITK_MAX_M = 64
SPLITK_MIN_WEIGHTS = 100_000_000     # between 11008 x 4096 (45 M, dense ahead) and 8192 x 28672 (235 M, split-K)
CPU_INT4_MAX_M = 64   # one core, SmolLM2 shapes (bench/cpu_runtime.py's per-layer table): cpu_int4 is ahead of
                      # cpu_dense to M = 256 at 2 and 4 bits and level with it at M = 64 at 8 bits; kept at 64
                      # because cpu_int4 rounds through bf16 and cpu_dense is exact
NOMINAL_SMS = 132     # H100 SXM; only shapes the default split-K when no GPU is present

_TUNED: dict[tuple, object] = {}


def interpreting() -> bool:
    """Triton runs through its CPU interpreter (tests): no timing, fixed launch configurations."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def forget_runtime(module, incompatible_keys=None) -> None:
    """load_state_dict post-hook: weights copied in place make a module's cached runtime form stale."""
    module._runtime = None


def device_kind(device: torch.device | str) -> str:
    """'cpu', 'cuda', ... of a device or its name (a torch.device is read as it is: decode calls this per layer)."""
    return device.type if isinstance(device, torch.device) else torch.device(device).type


def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return NOMINAL_SMS


def pick_config(key: tuple, candidates, run) -> object:
    """The first (hand-picked) candidate off-GPU; on a GPU the fastest of those that fit it (a tile that needs more
    shared memory than this GPU has is left out), timed once per key and cached. `candidates()` makes the list, only
    when a key is new: a tuned call costs a dictionary lookup."""
    if key in _TUNED:
        return _TUNED[key]
    candidates = candidates()
    if interpreting() or not torch.cuda.is_available() or len(candidates) == 1:
        return candidates[0]
    from triton.runtime.errors import OutOfResources
    from triton.testing import do_bench

    def time(c) -> float:
        try:
            return do_bench(lambda: run(c), warmup=5, rep=20, return_mode="median")
        except OutOfResources:
            return float("inf")
    times = [time(c) for c in candidates]
    if min(times) == float("inf"):
        raise RuntimeError(f"no launch configuration of {key[0]} fits this GPU's resources")
    _TUNED[key] = candidates[times.index(min(times))]
    return _TUNED[key]


def m_bucket(M: int) -> int:
    """Tuning key for M: the next power of two."""
    return 1 << max(M - 1, 0).bit_length()


def kernel_group(group_size: int, K: int, smallest: int) -> int | None:
    """Group size the Triton kernels run with: a power of two >= `smallest`; a per-channel grid (-1) is
    run as its largest power-of-two divisor of K up to 128. None when the kernels do not apply."""
    if group_size == -1:
        return next((g for g in (128, 64, 32, 16) if g >= smallest and K % g == 0), None)
    if group_size >= smallest and group_size & (group_size - 1) == 0:
        return group_size
    return None


def _expand_groups(t: torch.Tensor, group_size: int, g: int, K: int) -> torch.Tensor:
    """Per-channel metadata [1, N] repeated for every kernel group of size g."""
    return t.expand(-(-K // g), -1).contiguous() if group_size == -1 else t.contiguous()


class W4A16Runtime:
    """Load-time form of a GPTQ-layout linear. The form each path reads is built on its first call: the Triton form
    (act-order channels sorted by group, zeros unpacked) for CUDA, torch's int4 form (kernels/cpu.py) for CPU
    decode, so a CPU model holds no Triton copy of its codes and a GPU model no CPU one."""

    def __init__(self, qweight, scales, qzeros, g_idx, bits: int, in_features: int, group_size: int):
        K, N = in_features, scales.shape[1]
        if g_idx is None:
            g_idx = reference.group_index(K, group_size).to(qweight.device)
        self.layout = (qweight, scales, qzeros, g_idx, bits, in_features)
        self.bits, self.K, self.N = bits, K, N
        self.stored_group_size = group_size
        self.perm = None
        smallest = max(16, 32 // math.gcd(32, bits))      # a K-tile is whole words: 32 codes at 3 and 5 bits
        g = kernel_group(group_size, K, smallest)
        order = torch.argsort(g_idx.long().cpu(), stable=True)
        natural = reference.group_index(K, group_size).long()
        if g is not None and not torch.equal(g_idx.cpu()[order].long(), natural):
            g = None                                      # groups of unequal size: the Triton kernels do not apply
        if g is not None and not torch.equal(order, torch.arange(K)):
            self.perm = order.to(qweight.device)          # sort input channels by group once (act-order)
        self.group_size = g
        self._triton = None
        self._cpu_int4 = None

    def triton_form(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(qweight, scales, zeros) as the Triton kernels read them: codes sorted by group (act-order), per-channel
        metadata repeated for every kernel group, zeros unpacked to fp16."""
        if self._triton is None:
            qweight, scales, qzeros, _, bits, K = self.layout
            if self.perm is not None:
                qweight = pack(unpack(qweight, bits, K, dim=0)[self.perm], bits, dim=0)
            zeros = reference.unpack_zeros(qzeros, bits, self.N).to(torch.float16)
            self._triton = (qweight.contiguous(), _expand_groups(scales, self.stored_group_size, self.group_size, K),
                            _expand_groups(zeros, self.stored_group_size, self.group_size, K))
        return self._triton

    @property
    def cpu_int4(self) -> cpu.Int4Weights | None:
        """torch's CPU int4 form of the weights (kernels/cpu.py); None when they are not on the CPU."""
        if self._cpu_int4 is None and self.layout[0].device.type == "cpu":
            self._cpu_int4 = cpu.Int4Weights(*self.layout)
        return self._cpu_int4

    def path(self, M: int, device: torch.device | str) -> str:
        device_type = device_kind(device)
        if device_type == "cpu":
            return "cpu_int4" if M <= CPU_INT4_MAX_M else "cpu_dense"
        if device_type != "cuda" or self.group_size is None:
            return "reference"
        if self.bits not in GPTQ_BITS:                    # 5 and 6 bits: the dequantize kernel only
            return "dense"
        if M == 1:
            return "gemv"
        return "splitk" if M <= SPLITK_MAX_M and self.K * self.N >= SPLITK_MIN_WEIGHTS else "dense"

    def __call__(self, x: torch.Tensor, path: str | None = None) -> torch.Tensor:
        """y [M, N] = x [M, K] W^T in x.dtype."""
        M = x.shape[0]
        path = path or self.path(M, x.device)
        if path == "reference":
            return reference.weight_only_linear(x, *self.layout)
        if path == "cpu_int4":
            return self.cpu_int4(x)
        if path == "cpu_dense":
            return cpu.dense_linear(x, self.layout)
        from . import triton_w4a16 as tw
        if self.perm is not None:
            x = x[:, self.perm]
        x = x.contiguous()
        args = (*self.triton_form(), self.group_size, self.bits)
        key = (path, m_bucket(M), self.K, self.N, self.group_size, self.bits, x.dtype)
        if path == "gemv":
            config = pick_config(key, lambda: tw.gemv_configs(self.N, self.K, self.group_size, sm_count(x.device)),
                                 lambda c: tw.gemv(x, *args, c))
            return tw.gemv(x, *args, config)
        if path in ("splitk", "tiled"):
            candidates = lambda: tw.gemm_configs(m_bucket(M), self.N, self.K, self.group_size, sm_count(x.device),
                                                 path == "splitk")
            config = pick_config(key, candidates, lambda c: tw.gemm(x, *args, c))
            return tw.gemm(x, *args, config)
        if path == "dense":
            qweight, scales, zeros = self.triton_form()
            W = tw.dequantize(qweight, scales, zeros, self.K, self.group_size, self.bits, x.dtype,
                              tw.DEQUANTIZE_CONFIG)
            return torch.matmul(x, W)
        raise ValueError(f"unknown W4A16 path {path!r}")


class DenseSparseRuntime:
    """Load-time form of a dense-and-sparse linear (kernels/reference.py): the W4A16 runtime of its codes, whose
    zero codes leave the outliers out of the dense product, then the CSR outliers added: by a Triton kernel on
    CUDA, in torch elsewhere. The cpu_dense path writes the outliers into the dequantized W and multiplies once,
    as the reference path does with its whole dequantized W."""

    def __init__(self, dense: W4A16Runtime, values, cols, row_ptr):
        self.dense = dense
        self.values, self.cols, self.row_ptr = values.contiguous(), cols.to(torch.int32).contiguous(), \
            row_ptr.contiguous()

    def path(self, M: int, device: torch.device | str) -> str:
        return self.dense.path(M, device)

    def __call__(self, x: torch.Tensor, path: str | None = None) -> torch.Tensor:
        """y [M, N] = x [M, K] W^T in x.dtype."""
        path = path or self.path(x.shape[0], x.device)
        if path == "reference":
            return reference.dense_sparse_linear(x, *self.dense.layout, self.values, self.cols, self.row_ptr)
        if path == "cpu_dense":
            outliers = (self.values, self.cols.long(), reference.csr_rows(self.row_ptr))
            return cpu.dense_linear(x, self.dense.layout, outliers)
        y = self.dense(x, path)
        if x.device.type == "cuda":
            from . import triton_csr
            return triton_csr.csr_add_(y, x.contiguous(), self.values, self.cols, self.row_ptr)
        return reference.csr_add(y, x, self.values, self.cols, self.row_ptr)


class W4A8Runtime:
    """Load-time form of a QoQ W4A8 linear (layout in kernels/reference.py)."""

    def __init__(self, qweight, channel_scale, group_scale, group_zero, in_features: int, group_size: int):
        self.K, self.N = in_features, channel_scale.shape[0]
        self.layout = (qweight, channel_scale, group_scale, group_zero, group_size)
        g = kernel_group(group_size, in_features, smallest=32)
        self.group_size = g if g is not None and in_features % g == 0 else None
        if self.group_size is not None:
            self.qweight = qweight.contiguous()
            self.group_scale = _expand_groups(group_scale, group_size, g, in_features)
            self.group_zero = _expand_groups(group_zero, group_size, g, in_features)
        self.channel_scale = channel_scale.contiguous()
        self._W8 = None

    def int8_weight(self) -> torch.Tensor:
        """W8 [N, K] int8 for the torch path, built on first use."""
        if self._W8 is None:
            qweight, _, group_scale, group_zero, group_size = self.layout
            self._W8 = reference.qoq_int8_weight(qweight, group_scale, group_zero, self.K, group_size)
        return self._W8

    def path(self, M: int, device: torch.device | str) -> str:
        if torch.device(device).type != "cuda" or self.group_size is None:
            return "reference"
        return "splitk" if M <= SPLITK_MAX_M else "tiled"

    def __call__(self, x: torch.Tensor, path: str | None = None) -> torch.Tensor:
        """y [M, N] = dynamic per-token int8 x [M, K] times the QoQ weight, in x.dtype."""
        M = x.shape[0]
        path = path or self.path(M, x.device)
        if path == "reference":
            return reference.w4a8_linear(x, self.int8_weight(), self.channel_scale)
        if path not in ("splitk", "tiled"):
            raise ValueError(f"unknown W4A8 path {path!r}")
        from . import triton_actquant, triton_w4a8
        x_q, token_scale = triton_actquant.quantize_per_token(x.contiguous())
        args = (x_q, token_scale, self.qweight, self.group_scale, self.group_zero, self.channel_scale,
                self.group_size, x.dtype)
        key = (path, m_bucket(M), self.K, self.N, self.group_size, x.dtype)
        candidates = lambda: triton_w4a8.w4a8_configs(m_bucket(M), self.N, self.K, self.group_size,
                                                      sm_count(x.device), path == "splitk")
        config = pick_config(key, candidates, lambda c: triton_w4a8.w4a8_gemm(*args, c))
        return triton_w4a8.w4a8_gemm(*args, config)

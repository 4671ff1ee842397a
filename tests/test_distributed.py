"""Data-parallel calibration (bitsmith/distributed.py): the pieces on known tensors in two gloo processes, and
`bitsmith quantize --nproc 2` against one process, killed and resumed."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given
from hypothesis import strategies as st
from tests_support import ASSETS

from bitsmith.calibration.hessian import Hessian
from bitsmith.distributed import World, from_owners, gathered_list, placement, reduce_hessians
from bitsmith.formats.errors import InputError

STORIES = ASSETS / "models" / "stories260K"
CALIB = ASSETS / "text" / "tinystories_calib.txt"


@given(st.integers(0, 200), st.integers(1, 16), st.integers(1, 8))
def test_shares_are_whole_batches_covering_every_window_once(n, batch, size):
    shares = [World(rank, size).share(n, batch) for rank in range(size)]
    assert [i for s in shares for i in range(n)[s]] == list(range(n))
    assert all(s.start % batch == 0 for s in shares)
    counts = [len(range(n)[s]) for s in shares]
    assert max(counts) - min(counts) <= batch            # as even as whole batches allow


def test_owners_balance_the_cost_and_agree_on_every_rank():
    costs = [9.0, 1.0, 1.0, 4.0, 4.0, 1.0]
    owners = [World(rank, 2).owners(costs) for rank in range(2)]
    assert owners[0] == owners[1]
    loads = [sum(c for c, o in zip(costs, owners[0]) if o == r) for r in range(2)]
    assert loads == [10.0, 10.0]


def _spawn(fn, size: int, tmp_path: Path):
    mp.spawn(_entry, args=(fn, size, str(tmp_path / "store")), nprocs=size, join=True)


def _entry(rank: int, fn, size: int, store: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=size)
    try:
        fn(World(rank, size))
    finally:
        dist.destroy_process_group()


def _batches():
    gen = torch.Generator().manual_seed(0)
    scale = 10.0 ** torch.randn(40, generator=gen)                        # columns of very different size
    return [torch.randn(1 + 37 * b, 40, generator=gen) * scale for b in range(6)]


def _reduced_hessian(world: World):
    batches = _batches()
    mine = Hessian(40)
    for x in batches[world.share(len(batches), 1)]:
        mine.add(x)
    alone = Hessian(40)
    for x in batches:
        alone.add(x)
    hessians = {"h": mine}
    reduce_hessians(hessians, world)
    assert hessians["h"].n == alone.n
    assert torch.equal(hessians["h"].H, alone.H)                          # bit for bit, not just close
    every = torch.cat(batches).double()
    exact = 2 * every.t() @ every / every.shape[0]
    scale = torch.outer(exact.diag(), exact.diag()).sqrt()               # |H_ij| <= sqrt(H_ii H_jj)
    assert ((alone.H.double() - exact).abs() <= 1e-6 * scale).all()


def test_hessians_summed_over_two_processes_equal_one_process_bit_for_bit(tmp_path):
    _spawn(_reduced_hessian, 2, tmp_path)


def _shared_results(world: World):
    def job(j):
        return lambda: {"codes": torch.arange(5, dtype=torch.int32) + j, "scale": torch.full((2, 3), j, dtype=torch.bfloat16),
                        "mask": torch.tensor([j % 2 == 0, True]), "half": torch.ones(4, dtype=torch.float16) / (j + 1),
                        "empty": torch.zeros(0, 7), "loss": 0.5 * j, "ran_on": world.rank}
    results = from_owners([job(j) for j in range(5)], [5.0, 4.0, 3.0, 2.0, 1.0], world)
    owners = world.owners([5.0, 4.0, 3.0, 2.0, 1.0])
    for j, r in enumerate(results):
        expected = job(j)()
        assert r["ran_on"] == owners[j]
        assert r["loss"] == expected["loss"]
        for key in ("codes", "scale", "mask", "half", "empty"):
            assert r[key].dtype == expected[key].dtype and torch.equal(r[key], expected[key])
    assert gathered_list([world.rank] * (world.rank + 1), world) == [0, 1, 1]


def test_results_of_jobs_shared_out_reach_every_rank_with_their_dtypes(tmp_path):
    _spawn(_shared_results, 2, tmp_path)


def _quantize(out: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "bitsmith", "quantize", str(STORIES), "-o", str(out), "--bits", "3",
                           "--calib", str(CALIB), "--nsamples", "32", "--seqlen", "128", *extra],
                          check=False, capture_output=True, text=True, env=environment,
                          timeout=600)


def _same_files(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("solo") / "out"
    done = _quantize(out)
    assert done.returncode == 0, done.stderr
    return out


@pytest.mark.slow
def test_two_processes_write_the_same_bytes_as_one(one_process, tmp_path):
    done = _quantize(tmp_path / "out", "--nproc", "2")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("wrote ") == 1                              # main reports, the other is silent
    _same_files(one_process, tmp_path / "out")


@pytest.mark.slow
def test_a_killed_process_stops_the_run_and_nothing_is_published(tmp_path):
    out = tmp_path / "out"
    done = _quantize(out, "--nproc", "2", env={"BITSMITH_KILL_AT": "block:2", "BITSMITH_KILL_RANK": "1"})
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == ("error: process 1 of 2 was killed by SIGKILL; the run stopped "
                                                    "and its output was not published")
    assert not out.exists()


@pytest.mark.slow
def test_a_parallel_run_killed_midway_resumes_to_the_same_bytes(one_process, tmp_path):
    out = tmp_path / "out"
    killed = _quantize(out, "--nproc", "2", env={"BITSMITH_KILL_AT": "block:2", "BITSMITH_KILL_RANK": "0"})
    assert killed.returncode == 1 and not out.exists()
    assert len(list(tmp_path.glob(".out.*.partial"))) == 1               # kept for --resume, not published
    done = _quantize(out, "--nproc", "2", "--resume")
    assert done.returncode == 0, done.stderr
    assert "resuming the interrupted run, 3 of 5 blocks done" in done.stderr
    _same_files(one_process, out)


@pytest.mark.parametrize("extra, message", [
    (("--nproc", "2", "--rounding", "signround"), "error: --rounding signround runs in one process"),
    (("--nproc", "2", "--rounding", "gptaq"), "error: --rounding gptaq runs in one process"),
    (("--nproc", "2", "--nsamples", "8"), "error: --nsamples 8: 2 processes need at least 2 batches"),
    (("--nproc", "0"), "error: Invalid value for '--nproc'"),
    pytest.param(("--nproc", "2", "--device", "cuda"), "error: --device cuda: no CUDA device is visible",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")),
])
def test_what_a_parallel_run_cannot_do_is_refused_in_one_line(tmp_path, extra, message):
    out = tmp_path / "out"
    done = _quantize(out, *extra)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and done.stderr.startswith(message), done.stderr
    assert not out.exists() and not list(tmp_path.iterdir())


def test_placement_is_gloo_on_cpu_and_one_gpu_per_process_with_nccl():
    assert placement("cpu", 2, 0) == "gloo"
    assert placement("cuda", 2, 2) == placement("cuda", 4, 8) == "nccl"
    with pytest.raises(InputError, match=r"^--device cuda: 4 processes on this machine take one GPU each, and 2 are"):
        placement("cuda", 4, 2)
    with pytest.raises(InputError, match=r"^--device cuda:1 names one GPU; 2 processes take one GPU each"):
        placement("cuda:1", 2, 8)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL across processes needs two GPUs")
def test_two_processes_on_two_gpus_write_the_same_bytes_as_one_gpu(tmp_path):
    """NCCL: each process calibrates on its own GPU; the Hessians are summed in float64 in rank order as on gloo."""
    one = _quantize(tmp_path / "one", "--device", "cuda")
    two = _quantize(tmp_path / "two", "--device", "cuda", "--nproc", "2")
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    _same_files(tmp_path / "one", tmp_path / "two")


@pytest.mark.slow
def test_a_planned_run_measures_in_two_processes_to_the_same_bytes(tmp_path):
    """--target-bpw: the Fisher windows, the measurement's batches and its linears are shared out too."""
    plan = ["--target-bpw", "3.5", "--fisher-samples", "8"]
    one, two = _quantize(tmp_path / "one", *plan), _quantize(tmp_path / "two", *plan, "--nproc", "2")
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    _same_files(tmp_path / "one", tmp_path / "two")
    assert (tmp_path / "two" / "measurement.json").is_file()

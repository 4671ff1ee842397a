"""Data-parallel calibration over torch.distributed: N processes share one `bitsmith quantize`.

Started by `torchrun --nproc-per-node N -m bitsmith quantize ...` or by `bitsmith quantize --nproc N` (which
launches the same through torch's elastic launcher, `launch`). Each process (rank) runs a contiguous share of
the calibration batches through every block; the statistics the plan needs are summed over the ranks
(`reduce_hessians`: Hessians, whose sums do not depend on the order of the batches, calibration/hessian.py);
the linears of a block are shared out among the ranks, each quantizes its own (GPTQ of one linear needs only
its weight and Hessian) and sends the stored tensors to all (`from_owners`); rank 0 alone writes. Every batch
goes through the same arithmetic as in a single process with the same number of threads, so N processes write
the same bytes as one.

Backend (`placement`): gloo for a run on the CPU; NCCL for one on CUDA, each process on its own GPU (cuda:LOCAL_RANK,
made the current device, so that `--device cuda` means this process's GPU), its collectives' tensors sent from
there. A rank that dies stops the others: the launcher ends the run, and a rank waiting on a dead peer gets an
error from its collective (`PeerLost`)."""
from __future__ import annotations

import atexit
import contextlib
import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .calibration.hessian import add_exactly
from .formats.errors import InputError, PeerLost

TIMEOUT = datetime.timedelta(hours=12)   # a collective waits this long for a slow peer (a dead one fails at once)
CHUNK_ROWS = 1024                        # rows of a Hessian sent at once (bounds the gathered copies)


@dataclass(frozen=True)
class World:
    """This process's place among the processes of a run (rank 0 of 1 alone) and the device its collectives send
    tensors from (the CPU for gloo, its GPU for NCCL)."""
    rank: int = 0
    size: int = 1
    wire: str = "cpu"

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.size > 1

    def share(self, n: int, batch: int) -> slice:
        """This rank's windows of `n`: a contiguous run of whole batches of `batch` windows (so that every batch
        is the one a single process forms), the batches split as evenly as they go."""
        batches = -(-n // batch)
        first, last = batches * self.rank // self.size, batches * (self.rank + 1) // self.size
        return slice(min(first * batch, n), min(last * batch, n))

    def owners(self, costs: list[float]) -> list[int]:
        """The rank that computes each of a list of jobs: longest first, each to the least loaded rank (ties to
        the lowest rank): the same answer on every rank."""
        load = [0.0] * self.size
        owner = [0] * len(costs)
        for job in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
            rank = min(range(self.size), key=lambda r: (load[r], r))
            owner[job] = rank
            load[rank] += costs[job]
        return owner


SOLO = World()


def launch(nproc: int, args: list[str]) -> int:
    """Run `python -m bitsmith ARGS` in `nproc` processes on this machine through torch's elastic launcher
    (torchrun --standalone: a c10d rendezvous on a free local port, no restarts), each with its share of the
    CPU threads unless OMP_NUM_THREADS says. Returns the exit status: 0, or the first failed process's (the
    process said why, unless a signal killed it: then it is said here, and the status is 1)."""
    import logging
    import signal
    import sys
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)   # failures are reported below
    os.environ["BITSMITH_LAUNCHED"] = "1"
    if "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"bitsmith-{uuid.uuid4().hex}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1)
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "bitsmith", *args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        if failure.exitcode >= 0:
            return failure.exitcode
        name = signal.Signals(-failure.exitcode).name if -failure.exitcode in signal.valid_signals() else \
            f"signal {-failure.exitcode}"
        print(f"error: process {rank} of {nproc} was killed by {name}; the run stopped and its output was not "
              "published", file=sys.stderr)
        return 1
    return 0
_joined: World | None = None


def placement(device: str, local_size: int, visible_gpus: int) -> str:
    """The backend of a run of several processes, `local_size` of them on this machine, calibrating on `device`:
    gloo on the CPU; NCCL on CUDA, one GPU per process (refused when the machine shows fewer, or when `device`
    names one GPU for all of them)."""
    if device.startswith("cuda:"):
        raise InputError(f"--device {device} names one GPU; {local_size} processes take one GPU each: use --device "
                         "cuda")
    if device != "cuda":
        return "gloo"
    if visible_gpus < local_size:
        raise InputError(f"--device cuda: {local_size} processes on this machine take one GPU each, and "
                         f"{visible_gpus} {'is' if visible_gpus == 1 else 'are'} visible")
    return "nccl"


def announced() -> World:
    """This process's place as its launcher's environment gives it (RANK, WORLD_SIZE), before any group is joined:
    what is refused on every rank is refused on this, so that no rank stops while another is still connecting."""
    return World(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))


def join(device: str = "cpu") -> World:
    """The world of this process: when started by torchrun or `launch` (WORLD_SIZE > 1 in the environment), its
    rank in a process group of `placement`'s backend, joined on the first call (on CUDA with this process's GPU
    made the current device); otherwise SOLO."""
    global _joined
    if _joined is not None:
        return _joined
    size = announced().size
    if size <= 1:
        _joined = SOLO
        return SOLO
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(size)))
    backend = placement(device, local_size, torch.cuda.device_count() if device != "cpu" else 0)
    wire = "cpu"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        wire = f"cuda:{local_rank}"
    if not dist.is_initialized():
        options = {"device_id": torch.device(wire)} if backend == "nccl" else {}
        dist.init_process_group(backend, timeout=TIMEOUT, **options)
        atexit.register(_leave)
    _joined = World(dist.get_rank(), dist.get_world_size(), wire)
    return _joined


def _leave() -> None:
    """Take the process group down before the interpreter does: a gloo group left to the exit's destructors can
    abort the process (std::terminate on a thread still joinable) after its work is done."""
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def collective(what: str):
    """Turn the failure of a collective into PeerLost, naming what the run was doing."""
    try:
        yield
    except (RuntimeError, dist.DistBackendError) as e:
        if isinstance(e, PeerLost):
            raise
        raise PeerLost(f"another process of the run stopped while {what} ({type(e).__name__}); nothing was "
                       "written") from None


def reduce_hessians(hessians: dict, world: World) -> None:
    """Every rank's Hessians become the sums over all ranks' tokens, identical on every rank: the float64 sums
    and their error terms are gathered a few rows at a time and merged in rank order (the merge does not depend
    on the order; calibration/hessian.py)."""
    if not world.parallel:
        return
    with collective("summing Hessians"):
        for h in hessians.values():
            counts = [None] * world.size
            dist.all_gather_object(counts, h.n)
            for rows in range(0, h.columns, CHUNK_ROWS):
                part = slice(rows, rows + CHUNK_ROWS)
                sums, errors = _gathered(h.sum[part], world), _gathered(h.error[part], world)
                total, error = sums[0], errors[0]
                for rank in range(1, world.size):
                    add_exactly(total, error, sums[rank], errors[rank])
                h.sum[part], h.error[part] = total, error
            h.n = sum(counts)


def _gathered(t: torch.Tensor, world: World) -> list[torch.Tensor]:
    """Every rank's `t`, sent from the world's wire device, back on `t`'s."""
    sent = t.to(world.wire).contiguous()
    out = [torch.empty_like(sent) for _ in range(world.size)]
    dist.all_gather(out, sent)
    return [o.to(t.device) for o in out]


def from_owners(jobs: list[Callable[[], object]], costs: list[float], world: World) -> list:
    """Run each job on one rank (`World.owners`) and give every rank every result (tensors, dicts of tensors,
    numbers, strings): each rank runs its own jobs first, then each result is sent from its owner in job
    order."""
    if not world.parallel:
        return [job() for job in jobs]
    owner = world.owners(costs)
    mine = {j: job() for j, job in enumerate(jobs) if owner[j] == world.rank}
    results = []
    with collective("sharing quantized layers"):
        for j in range(len(jobs)):
            results.append(_broadcast(mine.get(j), owner[j], world))
    return results


def broadcast_from_main(value, world: World):
    """Main's `value` on every rank (the others pass anything, None say)."""
    if not world.parallel:
        return value
    with collective("receiving from the main process"):
        return _broadcast(value, 0, world)


def _broadcast(value, src: int, world: World):
    """`value` of rank `src` on every rank: its structure pickled, its tensors sent as tensors."""
    tensors: list[torch.Tensor] = []

    def strip(v):
        if isinstance(v, torch.Tensor):
            tensors.append(v.detach().contiguous())
            return _Slot(len(tensors) - 1, v.dtype, tuple(v.shape))
        if isinstance(v, dict):
            return {k: strip(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return type(v)(strip(x) for x in v)
        return v

    box = [strip(value) if world.rank == src else None]
    dist.broadcast_object_list(box, src=src)
    received: list[torch.Tensor] = []

    def fill(v):
        if isinstance(v, _Slot):
            t = tensors[v.index] if world.rank == src else torch.empty(v.shape, dtype=v.dtype)
            received.append(t)
            return t
        if isinstance(v, dict):
            return {k: fill(x) for k, x in v.items()}
        if isinstance(v, list):
            return [fill(x) for x in v]
        if isinstance(v, tuple):
            return tuple(fill(x) for x in v)
        return v

    value = fill(box[0])
    for t in received:
        _broadcast_tensor(t, src, world.wire)
    return value


@dataclass(frozen=True)
class _Slot:
    """Where a tensor sits in a value being broadcast: its place in the order the tensors are sent, dtype, shape."""
    index: int
    dtype: torch.dtype
    shape: tuple


def _broadcast_tensor(t: torch.Tensor, src: int, wire: str = "cpu") -> None:
    """dist.broadcast of a contiguous tensor of any dtype, as its bytes (gloo has no bool or bfloat16 type), sent from
    the `wire` device (a copy there and back when `t` is elsewhere)."""
    if not t.numel():
        return
    sent = t if t.device == torch.device(wire) else t.to(wire)
    dist.broadcast(sent.view(-1).view(torch.uint8), src=src)
    if sent is not t:
        t.copy_(sent)


def gathered_list(values: list, world: World) -> list:
    """The concatenation, in rank order, of every rank's list."""
    if not world.parallel:
        return list(values)
    out = [None] * world.size
    with collective("gathering results"):
        dist.all_gather_object(out, list(values))
    return [v for part in out for v in part]


class Discarding:
    """The writer of a rank that is not main: main writes the output; this one takes the same calls and keeps
    nothing."""

    def __init__(self):
        self.resumed: list = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def record(self, entry: dict) -> None:
        """Journaled by main only."""

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Written by main only."""

    def add_file(self, name: str, data) -> None:
        """Written by main only."""

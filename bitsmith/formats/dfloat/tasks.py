"""Tasks run by helper threads and by the calling thread while it waits: the decoder's and encoder's
way of keeping a second core busy with long numpy calls (which release the GIL) beside its own loop."""
from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future

import torch


class Tasks:
    """Tasks run by `helpers` threads, and by the calling thread while it waits for some (`wait`).

    numpy and hashlib release the GIL in their loops, but a thread that makes many short numpy calls
    hands the GIL over and over: two threads running lockstep loops (hundreds of calls of a few
    microseconds) run no faster than one. So the calling thread alone runs those loops, and the tasks
    (gathering and merging a block, hashing an output) make fewer, longer calls.
    """

    def __init__(self, helpers: int):
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.helpers = [threading.Thread(target=self._serve, daemon=True) for _ in range(max(helpers, 0))]
        for thread in self.helpers:
            thread.start()

    def __enter__(self) -> Tasks:  # noqa: PYI034 (Python 3.10 has no typing.Self)
        return self

    def __exit__(self, *exc) -> None:
        for _ in self.helpers:                                   # after the tasks still queued
            self.queue.put(None)
        for thread in self.helpers:
            thread.join()

    def submit(self, fn: Callable, *args) -> Future:
        future = Future()
        self.queue.put((future, fn, args))
        return future

    def wait(self, futures: list[Future], work: bool = True) -> None:
        """Until these tasks are done, run queued ones here (if not `work`, only where there are no helper
        threads to run them); raise what they raised."""
        work = work or not self.helpers
        for future in futures:
            while work and not future.done():
                if not self._run_one(block=False):
                    break
            future.result()

    def _run_one(self, block: bool) -> bool:
        try:
            task = self.queue.get(block=block)
        except queue.Empty:
            return False
        if task is None:
            return False
        future, fn, args = task
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 handed to the waiting caller
                future.set_exception(e)
        return True

    def _serve(self) -> None:
        running = True
        while running:
            running = self._run_one(block=True)


def default_threads() -> int:
    """Threads the decoder and encoder use unless told: torch's intra-op thread count (`torch.set_num_threads`)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(torch.get_num_threads(), cores))

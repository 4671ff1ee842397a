"""How the process's allocator (glibc malloc) treats the large temporaries of calibration.

Tensors above the mmap threshold get a mapping of their own, returned to the system when freed, whose pages fault
in again at every allocation; below it they come from the heap and are reused, but freed heap memory stays
resident until it is trimmed. glibc raises its threshold to 32 MiB after the first large free, and then
block-sized tensors freed one block after another stay resident: the command line fixes it at 1 MiB instead
(`set_allocator`, unless MALLOC_MMAP_THRESHOLD_ is set), and the steps that allocate the same temporaries over and
over raise it while they run (`mmap_threshold`): a block's calibration passes to `BATCH_THRESHOLD`, where a batch's
temporaries (SmolLM2 at 8 x 512 tokens: up to 25 MB) are reused from the heap while stream-sized buffers (the
calibration hidden states, 151 MB) keep mappings of their own. At 1 MiB every such temporary faulted in anew: 188
of 510 CPU seconds in the kernel for SmolLM2's GPTAQ true-sequential plan, 25 at 32 MiB. Each raise ends with the
heap's free memory given back (malloc_trim), so resident memory stays flat in the number of blocks.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import sys

M_MMAP_THRESHOLD = -3          # glibc mallopt parameter
MMAP_THRESHOLD = 1 << 20       # between the steps below
BATCH_THRESHOLD = 32 << 20     # a block's calibration passes
LOOP_THRESHOLD = 1 << 30       # an optimization loop (learned rounding)
_current: list[int] = []       # thresholds set by the contexts open now, innermost last


@functools.cache
def _libc():
    """glibc, when this is Linux with a C library that has mallopt and malloc_trim; else None."""
    name = ctypes.util.find_library("c") if sys.platform.startswith("linux") else None
    libc = ctypes.CDLL(name) if name else None
    return libc if libc is not None and hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


def _base() -> int:
    """The threshold outside the contexts: MALLOC_MMAP_THRESHOLD_ when set (glibc reads it itself), else ours."""
    try:
        return int(os.environ["MALLOC_MMAP_THRESHOLD_"])
    except (KeyError, ValueError):
        return MMAP_THRESHOLD


def set_allocator() -> None:
    """Fix the mmap threshold at MMAP_THRESHOLD (module docstring), unless the environment sets it."""
    libc = _libc()
    if libc is not None and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)


@contextlib.contextmanager
def mmap_threshold(threshold: int):
    """Allocations up to `threshold` bytes served from the heap and their memory reused while it lasts; then the
    threshold before it again and the heap's free memory returned (malloc_trim)."""
    libc = _libc()
    if libc is None:
        yield
        return
    _current.append(threshold)
    libc.mallopt(M_MMAP_THRESHOLD, threshold)
    try:
        yield
    finally:
        _current.pop()
        libc.mallopt(M_MMAP_THRESHOLD, _current[-1] if _current else _base())
        libc.malloc_trim(0)


def keeping_freed_memory():
    """An optimization loop's context: it allocates the same large temporaries at every iteration, and as
    mappings of their own their pages would fault in again each time (a third of SignRound's time on SmolLM2)."""
    return mmap_threshold(LOOP_THRESHOLD)


def release_freed_memory() -> None:
    """Give the free memory of the heap back to the system (malloc_trim) once a step of a block is done: a block's
    mid-sized temporaries otherwise leave the heap fragmented, and resident memory grows with the number of blocks
    (1.7 MB per block on a synthetic Llama of 512-wide blocks: 411 -> 582 MB over 100 blocks; flat with it)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)

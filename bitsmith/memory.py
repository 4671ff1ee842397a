"""How the process's allocator (glibc malloc) treats the large temporaries of calibration.

Tensors above the mmap threshold get a mapping of their own, returned to the system when freed, whose pages fault
in again at every allocation; below it they come from the heap and are reused. glibc raises its threshold to
32 MiB after the first large free, and then block-sized tensors freed one block after another stay resident: the
command line fixes it instead (`set_allocator`, unless MALLOC_MMAP_THRESHOLD_ is set). At `MMAP_THRESHOLD` = 32 MiB
a batch's temporaries (SmolLM2 at 8 x 512 tokens: up to 25 MB) are reused from the heap, and stream-sized buffers
(the calibration hidden states, 151 MB) are mappings of their own; at 1 MiB every temporary faulted in anew, which
took a third of the quantization's time in the kernel (SmolLM2, GPTAQ true-sequential plan: 188 of 510 CPU s).
`release_freed_memory` gives the heap's free memory back between the steps of a block, so resident memory stays
flat in the number of blocks.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import sys

M_MMAP_THRESHOLD = -3     # glibc mallopt parameter
MMAP_THRESHOLD = 32 << 20


@functools.cache
def _libc():
    """glibc, when this is Linux with a C library that has mallopt and malloc_trim; else None."""
    name = ctypes.util.find_library("c") if sys.platform.startswith("linux") else None
    libc = ctypes.CDLL(name) if name else None
    return libc if libc is not None and hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


def _threshold() -> int:
    """The mmap threshold in force: MALLOC_MMAP_THRESHOLD_ when set (glibc reads it itself), else ours."""
    try:
        return int(os.environ["MALLOC_MMAP_THRESHOLD_"])
    except (KeyError, ValueError):
        return MMAP_THRESHOLD


def set_allocator() -> None:
    """Fix the mmap threshold (module docstring), unless the environment sets it."""
    libc = _libc()
    if libc is not None and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)


@contextlib.contextmanager
def keeping_freed_memory():
    """Large freed blocks kept for reuse while it lasts (the mmap threshold raised to 1 GiB), then returned
    (malloc_trim). An optimization loop allocates the same large temporaries at every iteration: as mappings of
    their own their pages fault in again each time, a third of SignRound's time on SmolLM2."""
    libc = _libc()
    if libc is None:
        yield
        return
    libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, _threshold())
        libc.malloc_trim(0)


def release_freed_memory() -> None:
    """Give the free memory of the heap back to the system (malloc_trim) once a step of a block is done: a block's
    mid-sized temporaries otherwise leave the heap fragmented, and resident memory grows with the number of blocks
    (1.7 MB per block on a synthetic Llama of 512-wide blocks: 411 -> 582 MB over 100 blocks; flat with it)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)

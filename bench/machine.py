"""The machine a benchmark ran on, for its results: CPU times move with it (bf16 matrix products, the bulk of
learned rounding and tuning, run several times faster on CPUs with AMX than on those without)."""
from __future__ import annotations

import functools
import platform
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")      # the Linux kernel's description of the CPU; absent elsewhere


@functools.cache
def cpuinfo() -> dict[str, str]:
    """The first processor's fields of CPUINFO (name -> value), read once; empty where there is none."""
    fields: dict[str, str] = {}
    if CPUINFO.exists():
        for line in CPUINFO.read_text().splitlines():
            if not line.strip():
                break                                    # the first processor's block ends at a blank line
            name, _, value = line.partition(":")
            fields.setdefault(name.strip(), value.strip())
    return fields


def cpu_name() -> str:
    """The CPU's model name (platform's guess where the kernel does not say)."""
    return cpuinfo().get("model name") or platform.processor() or platform.machine()


def cpu_label() -> str:
    """The model name and its bf16 matrix units: 'AMD EPYC (avx512_bf16)', 'Intel Xeon (amx_bf16)'."""
    flags = set(cpuinfo().get("flags", "").split())
    units = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
    return cpu_name() + (f" ({units[0]})" if units else "")

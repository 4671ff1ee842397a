"""The machine a benchmark ran on, for its results: CPU times move with it (bf16 matrix products, the bulk of
learned rounding and tuning, run several times faster on CPUs with AMX than on those without)."""
from __future__ import annotations

import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name as /proc/cpuinfo gives it (platform's guess elsewhere)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


def cpu_label() -> str:
    """The model name and its bf16 matrix units: 'AMD EPYC (avx512_bf16)', 'Intel Xeon (amx_bf16)'."""
    flags = cpu_flags()
    units = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
    return cpu_name() + (f" ({units[0]})" if units else "")

"""The machine a benchmark ran on, for its results: CPU times move with it (bf16 matrix products, the bulk of
learned rounding and tuning, run several times faster on CPUs with AMX than on those without)."""
from __future__ import annotations

import functools
import platform
import subprocess


@functools.cache
def cpu_name() -> str:
    """The CPU's model name as `lscpu` gives it (platform's guess where there is no lscpu or it does not say)."""
    try:
        listing = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        listing = ""
    for line in listing.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "Model name" and value.strip():
            return value.strip()
    return platform.processor() or platform.machine()


def cpu_label() -> str:
    """The model name and the bf16 matrix units torch finds on it: 'AMD EPYC (avx512_bf16)', 'Intel Xeon (amx)'."""
    import torch
    probes = (("amx", "_is_amx_tile_supported"), ("avx512_bf16", "_is_avx512_bf16_supported"))
    units = [unit for unit, probe in probes if getattr(torch.cpu, probe, lambda: False)()]
    return cpu_name() + (f" ({units[0]})" if units else "")

"""What CPU a benchmark ran on: every speed table prints it, since sparse / dense ratios move with the CPU."""

from __future__ import annotations

import platform
from pathlib import Path

import torch

# Flags that decide which matrix-product kernels torch and ONNX Runtime can use (AMX tiles, AVX-512 BF16/VNNI).
SPEED_FLAGS = ("amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx512f", "avx2")


def cpu_description(threads: int | None = None) -> str:
    """One line naming the CPU model, its speed-relevant instruction-set flags and the thread count.

    Args:
        threads (`int`, *optional*): the threads the run uses (default: `torch.get_num_threads()`).

    Returns:
        `str`, e.g. ``"Intel(R) Xeon(R) Processor; flags amx_bf16 amx_int8 avx512_bf16 avx512f; 2 threads"``.
    """
    model, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    present = [flag for flag in SPEED_FLAGS if flag in flags]
    threads = torch.get_num_threads() if threads is None else threads
    return f"{model}; flags {' '.join(present) or 'none of ' + '/'.join(SPEED_FLAGS)}; {threads} threads"

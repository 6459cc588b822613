"""The machine a table was measured on: CPU model, cores, and the ISA extensions that decide INT8/BF16 speed.

INT8 and BF16 ratios differ between CPUs (AMX on Intel Sapphire Rapids; AVX-512 VNNI/BF16 on AMD Zen 4 and
Intel since Cascade Lake; neither on older parts), so every benchmark table and the demo print this line.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path

# /proc/cpuinfo flag -> the name people know; the three that matter for INT8/BF16 kernels
ISA_FLAGS = (("amx_int8", "AMX"), ("avx512_vnni", "AVX-512 VNNI"), ("avx512_bf16", "AVX-512 BF16"))


def read_cpuinfo(cpuinfo: str | None = None) -> str:
    """The text of /proc/cpuinfo ('' where there is none), or ``cpuinfo`` when given."""
    if cpuinfo is not None:
        return cpuinfo
    path = Path("/proc/cpuinfo")
    try:
        return path.read_text() if path.exists() else ""
    except OSError:
        return ""


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's ISA flags as /proc/cpuinfo names them ('avx2', 'avx512_vnni', 'amx_int8', ...)."""
    lines = read_cpuinfo(cpuinfo).splitlines()
    return set(next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), []))


def cpu_info(cpuinfo: str | None = None) -> dict:
    """{'model': str, 'cores': int, 'isa': {name: bool}} from /proc/cpuinfo (or the text given)."""
    cpuinfo = read_cpuinfo(cpuinfo)
    lines = cpuinfo.splitlines()
    model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "") \
        or platform.processor() or platform.machine()
    flags = cpu_flags(cpuinfo)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return {"model": model, "cores": cores, "isa": {name: flag in flags for flag, name in ISA_FLAGS}}


def cpu_summary(cpuinfo: str | None = None) -> str:
    """One line for a table, e.g. 'CPU: AMD EPYC, 2 cores; AMX no, AVX-512 VNNI yes, AVX-512 BF16 yes'."""
    info = cpu_info(cpuinfo)
    isa = ", ".join(f"{name} {'yes' if has else 'no'}" for name, has in info["isa"].items())
    return f"CPU: {info['model']}, {info['cores']} core(s); {isa}"

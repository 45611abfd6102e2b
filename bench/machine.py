"""What a bench result was measured on: CPU model, cores, the ISA flags that decide fp32 speed, memory, versions."""

from __future__ import annotations

import os
import platform
from importlib.metadata import PackageNotFoundError, version
from typing import Any

# The flags that decide which kernels onnxruntime, OpenVINO and PyTorch pick for fp32 / int8 / bf16 work.
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
             "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve")
PACKAGES = ("pocketsd", "numpy", "onnxruntime", "openvino", "torch", "diffusers", "transformers", "onnx")


def _cpuinfo() -> dict[str, str]:
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def _memory_gb() -> float | None:
    try:
        import psutil

        return round(psutil.virtual_memory().total / 1e9, 1)
    except ImportError:
        return None


def _physical_cores() -> int | None:
    try:
        import psutil

        return psutil.cpu_count(logical=False)
    except ImportError:
        return None


def machine_info() -> dict[str, Any]:
    cpu = _cpuinfo()
    flags = set((cpu.get("flags") or cpu.get("Features") or "").split())
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return {"cpu": cpu.get("model name") or platform.processor() or platform.machine(),
            "logical_cores": os.cpu_count(), "physical_cores": _physical_cores(),
            "isa_flags": [f for f in ISA_FLAGS if f in flags], "memory_gb": _memory_gb(),
            "os": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
            "versions": versions}


def _meminfo_bytes(key: str) -> int | None:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith(f"{key}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def memory_available_bytes() -> int | None:
    """What the kernel says can still be allocated without swapping (MemAvailable), or None off Linux."""
    return _meminfo_bytes("MemAvailable")


def memory_total_bytes() -> int | None:
    """The machine's memory (MemTotal), or None off Linux."""
    return _meminfo_bytes("MemTotal")

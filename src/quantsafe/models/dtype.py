"""Compute dtype per machine: bf16 halves memory traffic where the hardware multiplies it natively, but a CPU
without bf16 instructions (AVX2 only) emulates it and runs ~5x slower than fp32."""

from __future__ import annotations

import os
import platform
from typing import Any

import torch

from quantsafe.errors import QuantsafeError
from quantsafe.models.device import resolve_device

DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
BF16_FLAGS = {"avx512_bf16", "amx_bf16"}
ISA_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def _cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return f.read()
    except OSError:
        return ""


def _cpuinfo_field(text: str, name: str) -> str | None:
    """The first `name : value` line's value (every core repeats the same block)."""
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == name:
            return value.strip()
    return None


def _cpu_flags(text: str) -> set[str]:
    return set((_cpuinfo_field(text, "flags") or "").split())


def _device(device: torch.device | str | None) -> torch.device:
    return device if isinstance(device, torch.device) else resolve_device(device or "auto")


def bf16_native(device: torch.device | str | None = None) -> bool:
    """Whether `device` (default: CUDA if present, else CPU) multiplies bf16 in hardware. ATEN_CPU_CAPABILITY
    below avx512 counts as not native: it is how an AVX2-only machine is emulated on a newer one."""
    dev = _device(device)
    if dev.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    capability = os.environ.get("ATEN_CPU_CAPABILITY", "").lower()
    if capability and not capability.startswith("avx512"):
        return False
    return bool(_cpu_flags(_cpuinfo()) & BF16_FLAGS)


def dtype_name(dtype: torch.dtype) -> str:
    """"bfloat16", "float32", ...: the name recorded in rows and ids."""
    return str(dtype).removeprefix("torch.")


def resolve_dtype(requested: str, device: torch.device | str | None = None) -> torch.dtype:
    """The named dtype; "auto" is bf16 where `device` (default: CUDA if present, else CPU) computes it natively
    (see bf16_native), else fp16 on a GPU (pre-Ampere tensor cores have it) and fp32 on a CPU (emulated there)."""
    if requested == "auto":
        if bf16_native(device):
            return torch.bfloat16
        return torch.float16 if _device(device).type == "cuda" else torch.float32
    if requested not in DTYPES:
        raise QuantsafeError(f"unknown dtype '{requested}'; choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[requested]


def machine_info() -> dict[str, Any]:
    """What decides speed and the auto dtype, stored beside timings so they can be compared honestly."""
    text = _cpuinfo()
    flags = _cpu_flags(text)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu_model": _cpuinfo_field(text, "model name") or platform.processor() or platform.machine(),
        "cpu_cores": cores,
        "isa_flags": [f for f in ISA_FLAGS if f in flags],
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        **{name.lower(): os.environ[name] for name in ISA_ENV if name in os.environ},
        "bf16_native": bf16_native(),
        "torch": torch.__version__,
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }

"""The auto compute dtype and the machine description, on simulated CPUs."""

import pytest
import torch

from quantsafe.errors import QuantsafeError
from quantsafe.models import dtype

AVX2_CPU = """processor\t: 0
model name\t: Old Xeon
flags\t\t: fpu sse2 avx avx2 fma

processor\t: 1
model name\t: Old Xeon
flags\t\t: fpu sse2 avx avx2 fma
"""
AMX_CPU = "processor\t: 0\nmodel name\t: New Xeon\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile amx_bf16\n"


@pytest.fixture(autouse=True)
def cpu_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in dtype.ISA_ENV:
        monkeypatch.delenv(name, raising=False)


def test_auto_is_fp32_without_native_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dtype, "_cpuinfo", lambda: AVX2_CPU)
    assert not dtype.bf16_native()
    assert dtype.resolve_dtype("auto") == torch.float32
    monkeypatch.setattr(dtype, "_cpuinfo", lambda: "")  # no /proc/cpuinfo: assume emulation
    assert dtype.resolve_dtype("auto") == torch.float32


@pytest.mark.parametrize(("capability", "expected"), [(None, torch.bfloat16), ("avx512", torch.bfloat16),
                                                      ("AVX2", torch.float32), ("default", torch.float32)])
def test_auto_on_a_bf16_cpu_follows_the_emulated_capability(
    monkeypatch: pytest.MonkeyPatch, capability: str | None, expected: torch.dtype,
) -> None:
    monkeypatch.setattr(dtype, "_cpuinfo", lambda: AMX_CPU)
    if capability:
        monkeypatch.setenv("ATEN_CPU_CAPABILITY", capability)
    assert dtype.resolve_dtype("auto") == expected


def test_auto_on_cuda_asks_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dtype, "_cpuinfo", lambda: AMX_CPU)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert dtype.resolve_dtype("auto") == torch.float16  # a pre-Ampere GPU: fp16 tensor cores
    assert dtype.resolve_dtype("auto", device="cpu") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert dtype.resolve_dtype("auto", device=torch.device("cuda", 0)) == torch.bfloat16


def test_explicit_and_unknown_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dtype, "_cpuinfo", lambda: AVX2_CPU)
    assert [dtype.resolve_dtype(n) for n in ("bfloat16", "float32", "float16")] == [
        torch.bfloat16, torch.float32, torch.float16]
    with pytest.raises(QuantsafeError, match="unknown dtype 'fp8'; choose one of auto, bfloat16") as err:
        dtype.resolve_dtype("fp8")
    assert "\n" not in str(err.value)


def test_machine_info_names_what_decides_speed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dtype, "_cpuinfo", lambda: AVX2_CPU)
    info = dtype.machine_info()
    assert info["cpu_model"] == "Old Xeon" and info["isa_flags"] == ["avx2"]
    assert info["bf16_native"] is False and info["cuda_device"] is None
    assert info["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert info["torch"] == torch.__version__ and info["cpu_cores"] >= 1
    assert "aten_cpu_capability" not in info
    monkeypatch.setattr(dtype, "_cpuinfo", lambda: AMX_CPU)
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    info = dtype.machine_info()
    assert info["isa_flags"] == ["avx2", "avx512f", "avx512_bf16", "amx_bf16"] and info["bf16_native"] is False
    assert info["aten_cpu_capability"] == "avx2" and info["onednn_max_cpu_isa"] == "AVX2"

"""Device choice, KV-cache sizing and model release, on a CPU-only machine with CUDA simulated where needed."""

import pytest
import torch
from transformers import Qwen2Config

from quantsafe.errors import QuantsafeError
from quantsafe.models import device

QWEN_05B = Qwen2Config(hidden_size=896, num_attention_heads=14, num_key_value_heads=2, num_hidden_layers=24)


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_auto_is_the_cpu_without_cuda_and_names_are_taken_as_asked(no_gpu: None) -> None:
    assert device.resolve_device() == torch.device("cpu")
    assert device.resolve_device("cpu") == torch.device("cpu")


def test_auto_is_the_first_gpu_where_cuda_is_available(two_gpus: None) -> None:
    assert device.resolve_device("auto") == torch.device("cuda")
    assert device.resolve_device("cuda:1") == torch.device("cuda", 1)


@pytest.mark.parametrize(("spec", "message"), [("cuda", "sees no CUDA GPU"), ("cuda:0", "sees no CUDA GPU"),
                                               ("tpu", "unknown device 'tpu'"), ("meta", "unsupported device")])
def test_impossible_devices_are_one_clear_line(no_gpu: None, spec: str, message: str) -> None:
    with pytest.raises(QuantsafeError, match=message) as err:
        device.resolve_device(spec)
    assert "\n" not in str(err.value)


def test_a_gpu_index_beyond_the_machine_is_refused(two_gpus: None) -> None:
    with pytest.raises(QuantsafeError, match="only 2 CUDA GPU"):
        device.resolve_device("cuda:2")


def test_kv_bytes_per_token_counts_keys_and_values_of_the_kv_heads() -> None:
    # 2 (K and V) x 24 layers x 2 KV heads x 64 head dim x 2 bytes
    assert device.kv_bytes_per_token(QWEN_05B, torch.bfloat16) == 12_288
    assert device.kv_bytes_per_token(QWEN_05B, torch.float32) == 24_576


def test_fit_batch_size_keeps_the_kv_cache_within_free_memory() -> None:
    per_row = 12_288 * 1_000  # 1000 tokens per row
    assert device.fit_batch_size(64, free_bytes=10 * per_row, bytes_per_token=12_288, tokens_per_row=1_000,
                                 headroom=1.0) == 10
    assert device.fit_batch_size(64, 10 * per_row, 12_288, 1_000) == 8  # default headroom 0.8
    assert device.fit_batch_size(4, 10 * per_row, 12_288, 1_000) == 4  # never more than asked
    assert device.fit_batch_size(64, 0, 12_288, 1_000) == 1  # one row always runs


class _FakeModel:
    def __init__(self, where: str):
        self.device, self.config, self.dtype = torch.device(where), QWEN_05B, torch.bfloat16


def test_generation_rows_shrink_to_free_gpu_memory_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda _device=None: (12_288 * 1_000 * 10, 80 * 2**30))
    assert device.generation_rows(_FakeModel("cpu"), 64, 1_000) == 64
    assert device.generation_rows(_FakeModel("cuda"), 64, 1_000) == 8


def test_release_model_frees_weights_that_are_still_referenced() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    holder = {"backend": model}
    model.device = torch.device("cpu")  # transformers models expose their device; Sequential does not
    device.release_model(model)
    assert all(p.is_meta for p in holder["backend"].parameters())

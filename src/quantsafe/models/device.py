"""Where models run: CUDA when present, else the CPU, and how much fits there.

The same study runs on a laptop and on a GPU node, so the device is resolved at run time ("auto") and recorded;
generation batches shrink to what the GPU's free memory holds instead of failing with out-of-memory halfway."""

from __future__ import annotations

import gc
from typing import Any

import torch

from quantsafe.errors import QuantsafeError

KV_HEADROOM = 0.8  # share of free GPU memory the KV cache may take; the rest is activations and allocator slack


def resolve_device(spec: str = "auto") -> torch.device:
    """"auto" is the first GPU when CUDA is available, else the CPU; "cpu", "cuda" and "cuda:N" are taken as asked."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise QuantsafeError(f"unknown device '{spec}'; choose auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise QuantsafeError(f"unsupported device '{spec}'; choose auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise QuantsafeError(f"device '{spec}' asked for, but this PyTorch sees no CUDA GPU; use 'auto' or 'cpu'")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise QuantsafeError(f"device '{spec}' asked for, but only {torch.cuda.device_count()} CUDA GPU(s) exist")
    return device


def kv_bytes_per_token(config: Any, dtype: torch.dtype) -> int:
    """KV-cache bytes one token holds: keys and values of every layer's KV heads (grouped-query models have few)."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()


def fit_batch_size(requested: int, free_bytes: int, bytes_per_token: int, tokens_per_row: int,
                   headroom: float = KV_HEADROOM) -> int:
    """Rows (at most `requested`, at least 1) whose KV caches of `tokens_per_row` tokens fit in `headroom` of
    `free_bytes`; one row always runs, so a model too big for the device still fails loudly rather than idles."""
    per_row = max(1, bytes_per_token * tokens_per_row)
    return max(1, min(requested, int(free_bytes * headroom) // per_row))


def generation_rows(model: Any, requested: int, tokens_per_row: int) -> int:
    """How many rows `model` decodes at once: the configured batch size, cut to the free memory on CUDA (the
    CPU's RAM is large beside a KV cache; swapping shows as slowness, not a crash)."""
    device = model.device
    if device.type != "cuda":
        return requested
    free, _total = torch.cuda.mem_get_info(device)
    return fit_batch_size(requested, free, kv_bytes_per_token(model.config, model.dtype), tokens_per_row)


def release_model(model: Any) -> None:
    """Free a model's weights now, even while other objects (a backend, a judge) still reference it: its tensors
    move to the meta device, and CUDA's cached blocks go back so the next cell's model fits."""
    on_cuda = model.device.type == "cuda"
    model.to("meta")
    gc.collect()
    if on_cuda:
        torch.cuda.empty_cache()

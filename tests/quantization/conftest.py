"""Quantization tests run many small tensor ops; on a busy 2-core machine OpenMP's default spin-waiting makes
them several times slower. This only takes effect when torch is not imported yet (e.g. `pytest tests/quantization`)."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from collections.abc import Callable
from typing import Any

import pytest
import torch

TINY = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}


@pytest.fixture
def tiny_model() -> Callable[..., Any]:
    """A factory of tiny random Llama/Qwen2 causal LMs (seeded, eval mode, fp32); keyword args edit the config."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    def make(kind: str = "llama", **overrides: Any) -> Any:
        torch.manual_seed(0)
        cfg = TINY | overrides
        if kind == "llama":
            return LlamaForCausalLM(LlamaConfig(**cfg)).eval()
        return Qwen2ForCausalLM(Qwen2Config(**cfg)).eval()

    return make


@pytest.fixture
def round_trip(tmp_path: Any) -> Callable[[Any], Any]:
    """Checks that a QuantizedLayer survives safetensors + its JSON record bit-exactly; returns the reloaded one."""
    import json

    from safetensors.torch import load_file, save_file

    from quantsafe.quantization.base import layer_format

    def check(layer: Any) -> Any:
        path = tmp_path / f"{layer.format}.safetensors"
        save_file({k: v.detach().cpu().contiguous() for k, v in layer.to_tensors().items()}, str(path))
        meta = json.loads(json.dumps(layer.meta()))
        again = layer_format(layer.format).from_tensors(layer.shape, load_file(str(path)), meta)
        assert again.shape == layer.shape
        assert again.storage_bits() == layer.storage_bits()
        assert torch.equal(again.dequantize(), layer.dequantize().cpu())
        return again

    return check

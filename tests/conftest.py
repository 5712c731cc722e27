"""Shared fixtures: the real shared data directory, a real llama.cpp server serving the default model, a tiny
compressed-tensors checkpoint, and Debian's headless Chromium driven by Playwright."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from quantsafe.backends.llamacpp import LlamaServer, serve_gguf
from quantsafe.models import DEFAULT_MODEL
from quantsafe.models.loading import gguf_path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("QUANTSAFE_DATA_DIR", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"shared data not found at {SHARED_DATA}; set QUANTSAFE_DATA_DIR")
    return SHARED_DATA


REQUIRE_ENV = "QUANTSAFE_REQUIRE_LLAMA_SERVER"


@pytest.fixture(scope="session")
def llama_gguf() -> Path:
    """The default model's GGUF. Without llama-cpp-python: skip, or fail where QUANTSAFE_REQUIRE_LLAMA_SERVER=1
    (CI installs it, so a missing server there is a broken set-up, not an optional extra)."""
    if importlib.util.find_spec("llama_cpp") is None:
        reason = "llama-cpp-python[server] is not installed (scripts/llama_server.sh installs it)"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{reason}; {REQUIRE_ENV}=1 requires it")
        pytest.skip(reason)
    return gguf_path(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def llama_server(llama_gguf: Path) -> Iterator[LlamaServer]:
    with serve_gguf(llama_gguf, n_ctx=4096, tokenizer=DEFAULT_MODEL) as server:
        yield server


@pytest.fixture(scope="session")
def compressed_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny random Llama (SmolLM2's tokenizer and chat template) saved by compressed-tensors as a W4 g32
    pack-quantized checkpoint, beside the same weights fake-quantized and saved dense (the reference its loaded
    logits must match). For imports of existing quantized checkpoints (models/imported.py)."""
    import shutil

    import torch
    from compressed_tensors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationStatus,
        apply_quantization_config,
        preset_name_to_scheme,
    )
    from compressed_tensors.quantization.utils import calculate_qparams
    from transformers import LlamaConfig, LlamaForCausalLM

    from quantsafe.models import resolve_model

    root = tmp_path_factory.mktemp("compressed")
    packed, dense = root / "tiny-w4-pack", root / "tiny-w4-dense"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)  # fp32: the reference comparison is then exact up to summation order
    scheme = preset_name_to_scheme("W4A16", ["Linear"])
    scheme.weights.group_size = 32
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"],
                                                        quantization_status=QuantizationStatus.INITIALIZED))
    reference = LlamaForCausalLM(config)
    reference.load_state_dict(model.state_dict(), strict=False)
    for name, module in model.named_modules():
        if hasattr(module, "weight_scale"):  # symmetric int4: w ≈ clamp(round(w / s), -8, 7) · s, per group of 32
            w = module.weight.detach().reshape(module.weight.shape[0], -1, 32)
            scale, zero = calculate_qparams(w.amin(-1), w.amax(-1), module.quantization_scheme.weights)
            module.weight_scale.data.copy_(scale)
            module.weight_zero_point.data.copy_(zero)
            q = torch.clamp(torch.round(w / scale[..., None]), -8, 7) * scale[..., None]
            reference.get_submodule(name).weight.data.copy_(q.reshape(module.weight.shape))
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    model.save_pretrained(packed)
    compressor.update_config(packed)
    reference.save_pretrained(dense)
    smollm2 = resolve_model("smollm2-135m").path
    for folder in (packed, dense):
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            shutil.copy(smollm2 / name, folder / name)
    return packed, dense


CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
REQUIRE_BROWSER_ENV = "QUANTSAFE_REQUIRE_BROWSER"


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """Debian's chromium (no Playwright download). Without it or Playwright: skip, or fail where
    QUANTSAFE_REQUIRE_BROWSER=1 (CI installs both with scripts/browser.sh)."""
    missing = [what for what, ok in (("/usr/bin/chromium", CHROMIUM.is_file()),
                                     ("playwright", importlib.util.find_spec("playwright") is not None)) if not ok]
    if missing:
        reason = f"{' and '.join(missing)} not installed (scripts/browser.sh installs them)"
        if os.environ.get(REQUIRE_BROWSER_ENV) == "1":
            pytest.fail(f"{reason}; {REQUIRE_BROWSER_ENV}=1 requires them")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()

from pathlib import Path

import pytest

from quantsafe.errors import QuantsafeError
from quantsafe.models import KNOWN_MODELS, load_model, resolve_model


def test_short_name_is_verified_cached_bf16() -> None:
    r = resolve_model("smollm2-135m")
    assert r.source_sha256 == KNOWN_MODELS["smollm2-135m"].sha256
    assert r.dequantized_gguf and r.original_hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert (r.path / "model.safetensors").is_file() and (r.path / "quantsafe_source.json").is_file()
    again = resolve_model(str(r.path))  # a cached directory keeps its provenance
    assert again.source_sha256 == r.source_sha256 and again.dequantized_gguf
    model, tok = load_model(r)
    assert str(model.dtype) == "torch.bfloat16" and tok.chat_template


@pytest.mark.parametrize("ref", ["no-such-model", "/nonexistent/dir", "missing.gguf"])
def test_bad_reference_is_clear(ref: str) -> None:
    with pytest.raises(QuantsafeError):
        resolve_model(ref)


def test_directory_without_config(tmp_path: Path) -> None:
    with pytest.raises(QuantsafeError, match=r"no config\.json"):
        resolve_model(str(tmp_path))

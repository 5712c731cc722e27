"""Real model: quantize SmolLM2-135M, save, reload, run; artifact reuse and killed-run safety."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from quantsafe.models import ResolvedModel, load_model, resolve_model
from quantsafe.quantization import QuantConfig, QuantizedArtifact, load_quantized, quantize_variant
from quantsafe.quantization.artifact import MANIFEST_FILE, read_manifest
from quantsafe.quantization.uniform import layer_storage_bits

pytestmark = pytest.mark.slow

GPTQ8 = QuantConfig(
    method="gptq", bits=8, group_size=64, calibration={"source": "wikitext2", "n_samples": 4, "seq_len": 64}
)
RTN4 = QuantConfig(method="rtn", bits=4, group_size=64)
PROMPT = "The capital of France is Paris. The capital of Italy is"


@pytest.fixture(scope="module")
def smollm2() -> ResolvedModel:
    return resolve_model("smollm2-135m")


@pytest.fixture(scope="module")
def gptq8(smollm2: ResolvedModel, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> QuantizedArtifact:
    return quantize_variant(smollm2, GPTQ8, data_dir, tmp_path_factory.mktemp("artifacts"))


def _logits(model: Any, tok: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(**tok(PROMPT, return_tensors="pt")).logits[0].float()


def test_gptq8_artifact_manifest(gptq8: QuantizedArtifact, smollm2: ResolvedModel) -> None:
    assert not gptq8.reused and (gptq8.path / MANIFEST_FILE).is_file()
    assert gptq8.path.name.startswith("smollm2-135m-gptq-w8g64-") and gptq8.artifact_id in gptq8.path.name
    on_disk = read_manifest(gptq8.path)
    assert on_disk.artifact_id == gptq8.artifact_id and on_disk.config == GPTQ8
    assert on_disk.base_source_sha256 == smollm2.source_sha256
    assert on_disk.calibration is not None and on_disk.calibration["n_samples"] == 4
    assert len(on_disk.calibration["token_sha256"]) == 64
    assert len(on_disk.layers) == 30 * 7 and "lm_head" not in " ".join(on_disk.layers)
    assert all(rec.loss is not None and not rec.meta["g_idx"] for rec in on_disk.layers.values())  # static groups
    # bpw: 8-bit codes + (16-bit scale + 8-bit zero) per group of 64
    expected = sum(layer_storage_bits(*r.shape, 8, 64, False, False) for r in on_disk.layers.values())
    assert on_disk.bits_per_weight == pytest.approx(expected / on_disk.n_quantized_weights) == 8.375


def test_gptq8_reloads_close_to_full_precision(gptq8: QuantizedArtifact, smollm2: ResolvedModel) -> None:
    fp_model, tok = load_model(smollm2)
    q_model, q_tok = load_quantized(gptq8.path)
    assert q_tok.chat_template == tok.chat_template
    fp, q = _logits(fp_model, tok), _logits(q_model, q_tok)
    assert torch.nn.functional.cosine_similarity(fp, q, dim=-1).min() > 0.99
    assert (fp.argmax(-1) == q.argmax(-1)).float().mean() > 0.8
    out = q_model.generate(**q_tok(PROMPT, return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert out.shape[1] > 3


def test_existing_artifact_is_reused(gptq8: QuantizedArtifact, smollm2: ResolvedModel, data_dir: Path) -> None:
    again = quantize_variant(smollm2, GPTQ8, data_dir, gptq8.path.parent)
    assert again.reused and again.path == gptq8.path and again.artifact_id == gptq8.artifact_id


def test_killed_run_leaves_no_artifact(smollm2: ResolvedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors.torch

    real_save = safetensors.torch.save_file

    def save_then_die(tensors: dict[str, torch.Tensor], filename: str, **kw: Any) -> None:
        real_save(tensors, filename, **kw)
        raise KeyboardInterrupt  # killed after the weights, before the manifest

    monkeypatch.setattr(safetensors.torch, "save_file", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        quantize_variant(smollm2, RTN4, None, tmp_path)
    assert list(tmp_path.iterdir()) == []  # no final dir, temporary cleaned up

    # A SIGKILL cannot clean up: its stale temporary directory must never count as an artifact.
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    stale = tmp_path / ".tmp-smollm2-135m-rtn-w4g64-0000000000000000-1"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    artifact = quantize_variant(smollm2, RTN4, None, tmp_path)
    assert not artifact.reused and artifact.path.parent == tmp_path and not artifact.path.name.startswith(".")
    assert 4.3 < artifact.bits_per_weight < 4.4  # 4 + (16 + 4)/64 = 4.3125 (+ none: RTN has no g_idx)
    model, tok = load_quantized(artifact.path)
    assert torch.isfinite(_logits(model, tok)).all()

"""Artifact ids and reloading, on a tiny random Llama that uses SmolLM2's tokenizer (fast, no real weights)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from quantsafe.errors import QuantsafeError
from quantsafe.models import ResolvedModel, resolve_model
from quantsafe.quantization import QuantConfig, QuantizedArtifact, load_quantized, quantize_variant
from quantsafe.quantization.artifact import MANIFEST_FILE, compute_artifact_id, read_manifest
from quantsafe.quantization.base import Quantizer, register_quantizer
from quantsafe.quantization.methods.gptq import GPTQQuantizer
from quantsafe.quantization.methods.rtn import RTNQuantizer

BASE = "0" * 64
RTN4 = QuantConfig(method="rtn", bits=4, group_size=32)
GPTQ4 = QuantConfig(method="gptq", bits=4, group_size=64, calibration={"source": "wikitext2"})
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> ResolvedModel:
    smollm2 = resolve_model("smollm2-135m").path
    out = tmp_path_factory.mktemp("tiny-llama")
    for name in TOKENIZER_FILES:
        shutil.copy(smollm2 / name, out / name)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out)
    return ResolvedModel(name="tiny", path=out, source=str(out), source_sha256=BASE, dequantized_gguf=False)


@pytest.fixture(scope="module")
def rtn4(tiny: ResolvedModel, tmp_path_factory: pytest.TempPathFactory) -> QuantizedArtifact:
    return quantize_variant(tiny, RTN4, None, tmp_path_factory.mktemp("artifacts"))


def test_artifact_id_is_pinned() -> None:
    """Any change to what the id covers must be deliberate: it orphans every artifact already on disk."""
    assert compute_artifact_id(BASE, QuantConfig(method="rtn", bits=4, group_size=64), None) == "1e42f51df372eef9"
    assert compute_artifact_id(BASE, GPTQ4, "c" * 64) == "9507741edffea02b"


def test_calibration_dtype_changes_calibrated_artifacts_only() -> None:
    """Calibration activations differ between bf16 and fp32 forward passes; RTN never runs one."""
    assert compute_artifact_id(BASE, GPTQ4, "c" * 64, torch.float32) != compute_artifact_id(BASE, GPTQ4, "c" * 64)
    assert compute_artifact_id(BASE, RTN4, None, torch.float32) == compute_artifact_id(BASE, RTN4, None)


@pytest.mark.parametrize(("cls", "config", "calibration"), [(RTNQuantizer, RTN4, None),
                                                            (GPTQQuantizer, GPTQ4, "c" * 64)])
def test_method_version_changes_the_artifact_id(
    cls: type[Quantizer], config: QuantConfig, calibration: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = compute_artifact_id(BASE, config, calibration)
    monkeypatch.setattr(cls, "version", cls.version + 1)
    assert compute_artifact_id(BASE, config, calibration) != before


def test_manifest_records_the_method_version(rtn4: QuantizedArtifact) -> None:
    assert rtn4.method_version == read_manifest(rtn4.path).method_version == RTNQuantizer.version == 1
    assert rtn4.artifact_id == compute_artifact_id(BASE, RTN4, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_load_quantized_in_the_requested_dtype(rtn4: QuantizedArtifact, dtype: torch.dtype) -> None:
    model, tok = load_quantized(rtn4.path, dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}
    with torch.no_grad():
        logits = model(**tok("Hello", return_tensors="pt")).logits
    assert logits.dtype == dtype and torch.isfinite(logits).all()


def test_float32_load_holds_the_same_weights(rtn4: QuantizedArtifact) -> None:
    """fp32 only skips the final bf16 rounding: rounding its weights to bf16 gives the bf16 load exactly."""
    fp32, _ = load_quantized(rtn4.path, dtype=torch.float32)
    bf16, _ = load_quantized(rtn4.path)
    for (name, a), b in zip(fp32.state_dict().items(), bf16.state_dict().values(), strict=True):
        assert torch.equal(a.to(torch.bfloat16), b), name


def test_a_method_without_a_version_cannot_register() -> None:
    unversioned = type("Unversioned", (Quantizer,), {})
    with pytest.raises(ValueError, match="must set the class attribute `version`"):
        register_quantizer("unversioned")(unversioned)


@pytest.mark.parametrize(("content", "problem"), [(b'{"artifact_id": "x"', r"file: Invalid JSON"),
                                                  (b'{"artifact_id": "\xff"}', r"file: Invalid JSON"),
                                                  (b'{"artifact_id": 3}', r"artifact_id: Input should be a valid str")])
def test_broken_manifest_is_one_clear_line(tmp_path: Path, content: bytes, problem: str) -> None:
    manifest = tmp_path / MANIFEST_FILE
    manifest.write_bytes(content)
    with pytest.raises(QuantsafeError, match=rf"^{manifest}: not a valid quantsafe manifest \({problem}"):
        read_manifest(tmp_path)


EVERY_METHOD = {  # each method at a small setting that still exercises its storage format
    "rtn": {"bits": 4, "group_size": 32},
    "gptq": {"bits": 3, "group_size": 32},
    "awq": {"bits": 4, "group_size": 32},
    "quik": {"bits": 4},
    "quip_sharp": {"bits": 2},
    "aqlm": {"bits": 2, "options": {"max_epochs": 1, "steps_per_epoch": 2}},
    "ste": {"bits": 4, "options": {"steps": 2, "window": 32}},
    "qlora": {"bits": 4, "options": {"steps": 2, "window": 32}},
}


def test_every_method_is_tested_here() -> None:
    from quantsafe.quantization import known_methods

    assert set(EVERY_METHOD) == set(known_methods())


@pytest.mark.parametrize("method", sorted(EVERY_METHOD))
def test_every_method_saves_and_reloads_its_artifact(tiny: ResolvedModel, tmp_path: Path, data_dir: Path,
                                                     method: str) -> None:
    """quantize_variant → load_quantized gives back exactly the weights the quantizer stored."""
    from safetensors.torch import load_file

    from quantsafe.quantization import get_quantizer_class
    from quantsafe.quantization.artifact import read_layer

    spec: dict[str, object] = {"method": method, **EVERY_METHOD[method]}
    if get_quantizer_class(method).needs_calibration:
        spec["calibration"] = {"source": "wikitext2", "n_samples": 4, "seq_len": 32}
    artifact = quantize_variant(tiny, QuantConfig.from_dict(spec), data_dir, tmp_path, dtype=torch.float32)
    model, _ = load_quantized(artifact.path, dtype=torch.float32)
    stored = load_file(str(artifact.path / "model.safetensors"))
    state = model.state_dict()
    for name, rec in read_manifest(artifact.path).layers.items():
        assert rec.format == read_layer(dict(stored), name, rec).format
        assert torch.equal(state[f"{name}.weight"], read_layer(stored, name, rec).dequantize(torch.float32)), name


def test_layers_that_share_a_tensor_are_saved(tmp_path: Path) -> None:
    """QuIP#'s q/k/v share one input rotation tensor; safetensors refuses shared memory, so it is stored per layer."""
    from safetensors.torch import load_file, save_file

    from quantsafe.quantization.artifact import _tensors_to_save
    from quantsafe.quantization.uniform import UniformLayer

    shared = torch.full((4, 1), 0.5, dtype=torch.float16)
    layers = {n: UniformLayer(codes=torch.full((4, 8), 3, dtype=torch.uint8), scales=shared, zeros=None, bits=4,
                              group_size=None) for n in ("a", "b")}
    tensors, _ = _tensors_to_save(torch.nn.Linear(1, 1), layers)
    save_file(tensors, str(tmp_path / "x.safetensors"))
    assert torch.equal(load_file(str(tmp_path / "x.safetensors"))["b.scales"], shared)

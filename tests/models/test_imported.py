"""Existing quantized checkpoints as variants: located, hashed by content, described, checked and loaded."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from quantsafe.errors import QuantsafeError
from quantsafe.models import KNOWN_MODELS, resolve_model
from quantsafe.models.imported import ImportSpec, _dequantized, inspect_import, load_imported
from quantsafe.models.loading import gguf_path


@pytest.fixture
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Hashes of test checkpoints must not reach the real cache."""
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("QUANTSAFE_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def smollm2_gguf() -> Path:
    return gguf_path("smollm2-135m")


def test_gguf_is_described_from_its_header(smollm2_gguf: Path) -> None:
    ckpt = inspect_import(ImportSpec(source=str(smollm2_gguf)))
    assert ckpt.format == "gguf" and ckpt.content_sha256 == KNOWN_MODELS["smollm2-135m"].sha256
    assert (ckpt.method, ckpt.precision, ckpt.bits) == ("import:gguf-q4_1", "int4", 4)
    # Q4_1 stores 32 weights in 20 bytes; all 30 blocks × 7 matrices are Q4_1 (the Q8_0 tensor is the embedding)
    assert ckpt.bits_per_weight == 5.0 and ckpt.details["block_tensor_types"] == {"Q4_1": 210}
    declared = inspect_import(ImportSpec(source=str(smollm2_gguf), precision="w4", bits_per_weight=4.5,
                                         method="llama.cpp q4_1"))
    assert (declared.precision, declared.bits_per_weight, declared.method) == ("w4", 4.5, "llama.cpp q4_1")
    assert declared.details["bits_per_weight_measured"] == 5.0


def test_gguf_reuses_the_conversion_of_the_same_bytes(smollm2_gguf: Path) -> None:
    """The study's base model is this very file: importing it must not dequantize it a second time."""
    ckpt = inspect_import(ImportSpec(source=str(smollm2_gguf)))
    assert _dequantized(ckpt.path, ckpt.content_sha256).path == resolve_model("smollm2-135m").path


def test_compressed_tensors_checkpoint_loads_its_quantized_weights(compressed_checkpoint: tuple[Path, Path]) -> None:
    packed, dense = compressed_checkpoint
    ckpt = inspect_import(ImportSpec(source=str(packed)))
    assert (ckpt.format, ckpt.method, ckpt.precision, ckpt.bits, ckpt.group_size) == (
        "hf", "import:compressed-tensors", "int4", 4, 32)
    assert ckpt.details["quantization_config"]["format"] == "pack-quantized" and ckpt.bits_per_weight is None
    model, tok = load_imported(ckpt, torch.float32)
    reference, _ = load_imported(ckpt.model_copy(update={"path": dense}), torch.float32)
    ids = tok.apply_chat_template([{"role": "user", "content": "Hello there"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        got, want = model(ids).logits, reference(ids).logits
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()  # the int4 grid, decoded exactly


@pytest.mark.usefixtures("private_cache")
def test_identity_is_content_not_path(tmp_path: Path, compressed_checkpoint: tuple[Path, Path]) -> None:
    packed, _ = compressed_checkpoint
    copy = shutil.copytree(packed, tmp_path / "elsewhere")
    a, b = inspect_import(ImportSpec(source=str(packed))), inspect_import(ImportSpec(source=str(copy)))
    assert a.content_sha256 == b.content_sha256 and a.variant_id("base") == b.variant_id("base")
    assert a.variant_id("base") != a.variant_id("other-base")
    relabelled = inspect_import(ImportSpec(source=str(copy), precision="w4a16"))
    assert relabelled.variant_id("base") != a.variant_id("base")
    config = json.loads((copy / "config.json").read_text())
    config["quantization_config"]["ignore"] = []  # one byte of meaning: a new checkpoint
    (copy / "config.json").write_text(json.dumps(config))
    assert inspect_import(ImportSpec(source=str(copy))).content_sha256 != a.content_sha256


def _with_quant_config(src: Path, dest: Path, qc: dict[str, object] | None) -> Path:
    shutil.copytree(src, dest)
    config = json.loads((dest / "config.json").read_text())
    config.pop("quantization_config", None)
    if qc is not None:
        config["quantization_config"] = qc
    (dest / "config.json").write_text(json.dumps(config))
    return dest


@pytest.mark.usefixtures("private_cache")
@pytest.mark.parametrize(("package", "qc", "needle"), [
    ("optimum", {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True},
     "pip install optimum"),
    ("gptqmodel", {"quant_method": "awq", "bits": 4, "group_size": 128}, "pip install gptqmodel"),
    ("aqlm", {"quant_method": "aqlm", "in_group_size": 8, "out_group_size": 1, "num_codebooks": 1,
              "nbits_per_codebook": 16}, "pip install aqlm"),
    ("bitsandbytes", {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
     "pip install -U bitsandbytes"),
])
def test_missing_quantization_backend_names_the_package(tmp_path: Path, compressed_checkpoint: tuple[Path, Path],
                                                        package: str, qc: dict[str, object], needle: str) -> None:
    """transformers' own environment check runs at inspection, before any model loads, and names the package."""
    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed here")
    folder = _with_quant_config(compressed_checkpoint[1], tmp_path / str(qc["quant_method"]), qc)
    with pytest.raises(QuantsafeError) as err:
        inspect_import(ImportSpec(source=str(folder)))
    message = str(err.value)
    assert message.startswith(f"{folder / 'config.json'}: transformers cannot load this '{qc['quant_method']}' "
                              "checkpoint on this machine: ")
    assert needle in message and "\n" not in message


@pytest.mark.usefixtures("private_cache")
def test_precision_from_config_or_declared(tmp_path: Path, compressed_checkpoint: tuple[Path, Path]) -> None:
    packed = compressed_checkpoint[0]
    qc = json.loads((packed / "config.json").read_text())["quantization_config"]
    group = qc["config_groups"]["group_0"]
    qc["config_groups"]["group_1"] = {**group, "weights": {**group["weights"], "num_bits": 8}, "targets": ["x"]}
    mixed = _with_quant_config(packed, tmp_path / "mixed", qc)
    with pytest.raises(QuantsafeError, match=r"cannot tell the precision .* declare it as import\.precision"):
        inspect_import(ImportSpec(source=str(mixed)))
    assert inspect_import(ImportSpec(source=str(mixed), precision="int4+int8")).precision == "int4+int8"


@pytest.mark.usefixtures("private_cache")
def test_bad_imports_are_one_clear_line(tmp_path: Path, compressed_checkpoint: tuple[Path, Path]) -> None:
    packed, dense = compressed_checkpoint
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / "fake.gguf").write_bytes(b"not a gguf at all, just bytes")
    unknown = _with_quant_config(dense, tmp_path / "unknown", {"quant_method": "magic4", "bits": 4})
    cases = [
        (ImportSpec(source=str(tmp_path / "nope")), "import.source does not exist"),
        (ImportSpec(source=str(dense)), "no quantization_config with a quant_method"),
        (ImportSpec(source=str(packed), format="gguf"), "import.format is 'gguf' but the source is a directory"),
        (ImportSpec(source=str(packed), revision="main"), "import.revision applies to hub ids only"),
        (ImportSpec(source=str(tmp_path / "notes.txt")), "is a file but not a .gguf file"),
        (ImportSpec(source=str(tmp_path / "fake.gguf")), "not a GGUF file"),
        (ImportSpec(source=str(unknown)), "quant_method 'magic4' is not one transformers"),
        (ImportSpec(source=str(tmp_path)), "no config.json"),
        (ImportSpec(source="models/missing.gguf"), "import.source does not exist"),  # local, not hub owner/repo
        (ImportSpec(source="a/b/c"), "import.source does not exist"),
        # compressed-tensors is a test dependency, so this is the malformed-config message on every machine
        (ImportSpec(source=str(_with_quant_config(dense, tmp_path / "bad-ct",
                                                  {"quant_method": "compressed-tensors", "config_groups": 5}))),
         "quantization_config is not a valid 'compressed-tensors' config for transformers (ValidationError"),
    ]
    for spec, needle in cases:
        with pytest.raises(QuantsafeError) as err:
            inspect_import(spec)
        assert needle in str(err.value) and "\n" not in str(err.value), (spec, str(err.value))


@pytest.mark.usefixtures("private_cache")
def test_hub_ids_resolve_to_local_files_before_hashing(monkeypatch: pytest.MonkeyPatch, smollm2_gguf: Path,
                                                       compressed_checkpoint: tuple[Path, Path]) -> None:
    """No network in tests: the hub client is replaced by what it returns, a local snapshot or file."""
    import huggingface_hub

    calls: list[tuple[str, ...]] = []

    def snapshot(repo_id: str, revision: str | None = None, **kwargs: object) -> str:
        calls.append((repo_id, str(revision)))
        return str(compressed_checkpoint[0])

    def one_file(repo_id: str, filename: str, revision: str | None = None) -> str:
        calls.append((repo_id, filename, str(revision)))
        return str(smollm2_gguf)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", one_file)
    hf = inspect_import(ImportSpec(source="someone/tiny-w4", revision="v1"))
    assert hf.path == compressed_checkpoint[0] and hf.method == "import:compressed-tensors"
    gguf = inspect_import(ImportSpec(source="someone/gguf-repo/sub/model.gguf"))
    assert gguf.content_sha256 == KNOWN_MODELS["smollm2-135m"].sha256
    assert calls == [("someone/tiny-w4", "v1"), ("someone/gguf-repo", "sub/model.gguf", "None")]

    def offline(*args: object, **kwargs: object) -> str:
        raise OSError("offline and not cached")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(QuantsafeError, match=r"^import\.source 'someone/x': not a local path and could not be "
                                             r"fetched from the hub \(OSError: offline and not cached\)$"):
        inspect_import(ImportSpec(source="someone/x"))

"""Quantized artifacts on disk: packed codes + fp16 scales in safetensors, a typed manifest, atomic writes.

Layout of `<out_root>/<model>-<method>-w<bits>[g<size>]-<artifact_id>/`:
- `model.safetensors`: for each quantized Linear the tensors of its storage format as `<name>.<suffix>` (uniform
  grids: `qweight` bit-packed codes, `scales` fp16, `qzeros` bit-packed zeros, `g_idx` int32; other formats
  their codes, codebooks, sign vectors, outlier columns); every other tensor (embeddings, norms, lm_head, biases)
  in bf16, including those a method changed (AWQ folds its scales into norms).
- `config.json`, `generation_config.json`, tokenizer files: the base model's, unchanged.
- `quant_config.json`: the `QuantizedArtifact` manifest (config, provenance, per-layer format, shapes, losses, bpw).
The directory appears only by an atomic rename of a finished temporary one: a killed run leaves no artifact.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, Field, ValidationError, model_validator

from quantsafe.errors import QuantsafeError
from quantsafe.hashing import stable_hash
from quantsafe.models import ResolvedModel, load_model
from quantsafe.models.dtype import dtype_name
from quantsafe.quantization.base import QuantizedLayer, get_quantizer_class, layer_format, make_quantizer
from quantsafe.quantization.calibration import build_calibration
from quantsafe.quantization.config import QuantConfig
from quantsafe.quantization.sequential import Progress

SCHEMA_VERSION = 2
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "quant_config.json"
SCOPE = (
    "every nn.Linear inside the decoder blocks (attention and MLP projections); embeddings, norms, lm_head "
    "and biases stay bf16. bits_per_weight counts everything a layer stores (codes, codebooks, scales, zeros, "
    "g_idx, outlier columns, sign vectors) over the quantized Linears only."
)


class LayerRecord(BaseModel):
    """How one Linear was stored (its format, the format's own fields, its tensors), and the method's loss."""

    shape: tuple[int, int]
    format: str
    meta: dict[str, Any]
    tensors: list[str]  # suffixes of `<name>.<suffix>` in the weights file
    storage_bits: int
    loss: float | None

    @model_validator(mode="before")
    @classmethod
    def _schema_1(cls, data: Any) -> Any:
        """Schema-1 manifests knew only uniform grids and recorded their fields flat."""
        if isinstance(data, dict) and "format" not in data and "bits" in data:
            meta = {k: data[k] for k in ("bits", "group_size", "sym", "g_idx")}
            tensors = ["qweight", "scales"] + ([] if meta["sym"] else ["qzeros"]) + (["g_idx"] if meta["g_idx"] else [])
            return {"shape": data["shape"], "format": "uniform", "meta": meta, "tensors": tensors,
                    "storage_bits": data["storage_bits"], "loss": data.get("loss")}
        return data


class QuantizedArtifact(BaseModel):
    """The manifest written as quant_config.json; `path` and `reused` describe this run and are not stored."""

    schema_version: int = SCHEMA_VERSION
    artifact_id: str
    config: QuantConfig
    method_version: int | None = None  # the quantizer's `version`; None in manifests written before it existed
    compute_dtype: str | None = None  # dtype of the calibration forward passes; None in older manifests
    base_model: str
    base_source_sha256: str
    calibration: dict[str, Any] | None
    scope: str = SCOPE
    bits_per_weight: float
    n_quantized_weights: int
    layers: dict[str, LayerRecord]
    aliases: dict[str, str] = Field(default_factory=dict)  # tied tensor name → the name it is stored under
    versions: dict[str, str]
    seconds: float  # wall time: load + calibration + quantization + writing the weights
    created_utc: str
    path: Path = Field(Path(), exclude=True)
    reused: bool = Field(False, exclude=True)


def effective_bits_per_weight(results: dict[str, QuantizedLayer]) -> float:
    """Stored bits (everything each layer stores) per weight, quantized Linears only (algorithms.md §8)."""
    weights = sum(r.shape[0] * r.shape[1] for r in results.values())
    return sum(r.storage_bits() for r in results.values()) / weights if weights else 0.0


def compute_artifact_id(base_sha256: str, config: QuantConfig, calibration_key: str | None,
                        compute_dtype: torch.dtype = torch.bfloat16, device: str = "cpu") -> str:
    """Content address of an artifact: base weights, full config, the calibration tokens' sha256, the method's
    version (an artifact made before a fix to the method is not reused after it) and, for calibrated methods,
    the dtype the calibration forward passes ran in (their activations, hence the result, depend on it)."""
    key: dict[str, object] = {"base": base_sha256, "config": config, "calibration": calibration_key,
                              "method_version": get_quantizer_class(config.method).version}
    if calibration_key is not None:
        key["compute_dtype"] = dtype_name(compute_dtype)
    if torch.device(device).type != "cpu":  # GPU kernels round differently; CPU ids stay as they were
        key["device"] = torch.device(device).type
    return stable_hash(key)


def _dir_name(model: str, config: QuantConfig, artifact_id: str) -> str:
    group = f"g{config.group_size}" if config.group_size else "row"
    return f"{model}-{config.method}-w{config.bits}{group}-{artifact_id}"


def _versions() -> dict[str, str]:
    import transformers

    from quantsafe import __version__ as quantsafe_version

    return {
        "quantsafe": str(quantsafe_version),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def read_manifest(path: Path) -> QuantizedArtifact:
    """The manifest of an artifact directory."""
    manifest = Path(path) / MANIFEST_FILE
    if not manifest.is_file():
        raise QuantsafeError(f"{path}: not a quantsafe artifact (no {MANIFEST_FILE})")
    try:
        artifact = QuantizedArtifact.model_validate_json(manifest.read_bytes())  # bytes: bad UTF-8 is invalid JSON
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "file"
        raise QuantsafeError(f"{manifest}: not a valid quantsafe manifest ({where}: {first['msg']})") from None
    artifact.path = Path(path)
    return artifact


def quantize_variant(
    resolved: ResolvedModel,
    config: QuantConfig,
    data_dir: Path | None,
    out_root: Path,
    *,
    batch_size: int = 8,
    progress: Progress | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: str = "cpu",
) -> QuantizedArtifact:
    """Quantize `resolved` as `config` says and save it under `out_root`, or reuse the one found there.

    `dtype` is what the calibration forward passes compute in: fp32 where the CPU has no native bf16 (bf16 is
    emulated there and ~5x slower). Stored tensors are the same width either way (bf16 base, fp16 scales)."""
    start = time.perf_counter()
    model, tokenizer = load_model(resolved, dtype, device=device)
    calibration = None
    calibration_key = None
    if config.calibration is not None:
        if config.calibration.source == "self_generated":
            # The tokens are a function of the base model and the calibration config, both already in the ID;
            # hashing them would mean generating them just to find out the artifact exists.
            calibration_key = "self_generated"
        else:
            calibration = build_calibration(config.calibration, tokenizer, data_dir, model)
            calibration_key = calibration.token_sha256
    artifact_id = compute_artifact_id(resolved.source_sha256, config, calibration_key, dtype, device)
    final = Path(out_root) / _dir_name(resolved.name, config, artifact_id)
    if (final / MANIFEST_FILE).is_file():
        artifact = read_manifest(final)
        artifact.reused = True
        return artifact
    if config.calibration is not None and calibration is None:
        calibration = build_calibration(config.calibration, tokenizer, data_dir, model)

    torch.manual_seed(config.seed)
    quantizer = make_quantizer(config)
    results = quantizer.quantize_model(model, calibration.tokens if calibration else None, batch_size, progress)
    artifact = QuantizedArtifact(
        artifact_id=artifact_id,
        config=config,
        method_version=type(quantizer).version,
        compute_dtype=dtype_name(dtype),
        base_model=resolved.name,
        base_source_sha256=resolved.source_sha256,
        calibration=calibration.record() if calibration else None,
        bits_per_weight=effective_bits_per_weight(results),
        n_quantized_weights=sum(r.shape[0] * r.shape[1] for r in results.values()),
        layers={name: _layer_record(r) for name, r in results.items()},
        versions=_versions(),
        seconds=0.0,
        created_utc=_dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )
    return _write_atomically(final, model, tokenizer, results, artifact, start)


def _layer_record(r: QuantizedLayer) -> LayerRecord:
    return LayerRecord(shape=r.shape, format=r.format, meta=r.meta(), tensors=sorted(r.to_tensors()),
                       storage_bits=r.storage_bits(), loss=r.loss)


def _tensors_to_save(model: Any, results: dict[str, QuantizedLayer],
                     ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, r in results.items():
        for suffix, t in r.to_tensors().items():
            t = t.detach().cpu().contiguous()
            if t.data_ptr() in seen:  # layers may share a tensor (QuIP#'s input rotation of q/k/v); safetensors can't
                t = t.clone()
            seen.add(t.data_ptr())
            tensors[f"{name}.{suffix}"] = t
    quantized = {f"{name}.weight" for name in results}
    aliases: dict[str, str] = {}
    stored_by_ptr: dict[int, str] = {}
    for key, value in model.state_dict().items():
        if key in quantized:
            continue
        ptr = value.data_ptr()
        if ptr in stored_by_ptr:  # tied weights (SmolLM2's lm_head is its embedding)
            aliases[key] = stored_by_ptr[ptr]
            continue
        stored_by_ptr[ptr] = key
        tensors[key] = (value.to(torch.bfloat16) if value.is_floating_point() else value).cpu().contiguous()
    return tensors, aliases


@contextmanager
def atomic_dir(final: Path, manifest: str) -> Iterator[Path]:
    """A temporary directory renamed to `final` when the block finishes (its `manifest` file written last marks
    it complete); removed if the block fails or is killed, so no half-written artifact is ever reused."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        try:
            tmp.rename(final)
        except OSError:  # another process finished the same artifact first; theirs is equally valid
            if not (final / manifest).is_file():
                raise
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_atomically(
    final: Path,
    model: Any,
    tokenizer: Any,
    results: dict[str, QuantizedLayer],
    artifact: QuantizedArtifact,
    start: float,
) -> QuantizedArtifact:
    from safetensors.torch import save_file

    with atomic_dir(final, MANIFEST_FILE) as tmp:
        tensors, artifact.aliases = _tensors_to_save(model, results)
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "quantsafe", "schema": str(SCHEMA_VERSION)})
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        artifact.seconds = round(time.perf_counter() - start, 2)
        (tmp / MANIFEST_FILE).write_text(artifact.model_dump_json(indent=2), encoding="utf-8")
    artifact.path = final
    return artifact


def load_quantized(path: Path | str, *, dtype: torch.dtype = torch.bfloat16) -> tuple[Any, Any]:
    """Load an artifact as a Hugging Face model (weights dequantized to `dtype`) and its tokenizer.

    bf16 is about twice as fast as fp32 on CPUs with native bf16 and much slower on those without, hence
    `dtype`; in fp32 the unquantized tensors (stored bf16) are the same and the dequantized weights skip one
    rounding.
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    path = Path(path)
    artifact = read_manifest(path)
    stored = load_file(str(path / WEIGHTS_FILE))
    state: dict[str, torch.Tensor] = {}
    for name, rec in artifact.layers.items():
        state[f"{name}.weight"] = read_layer(stored, name, rec).dequantize(dtype)
    state |= stored
    for alias, target in artifact.aliases.items():
        state[alias] = state[target]
    with _skip_init():  # every weight is overwritten below; random init of 0.5B params costs seconds
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(path)), dtype=dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise QuantsafeError(
            f"{path}: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(path))
    return model.eval(), AutoTokenizer.from_pretrained(str(path))


def _skip_init() -> AbstractContextManager[Any]:
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # not a public API; without it loading is only slower
        return nullcontext()
    return no_init_weights()


def read_layer(stored: dict[str, torch.Tensor], name: str, rec: LayerRecord) -> QuantizedLayer:
    """Rebuild the storage form of Linear `name` from the loaded weights file (its tensors are popped)."""
    try:
        tensors = {suffix: stored.pop(f"{name}.{suffix}") for suffix in rec.tensors}
    except KeyError as exc:
        raise QuantsafeError(f"{name}: tensor {exc.args[0]} missing from {WEIGHTS_FILE}") from None
    layer = layer_format(rec.format).from_tensors(rec.shape, tensors, rec.meta)
    layer.loss = rec.loss
    return layer

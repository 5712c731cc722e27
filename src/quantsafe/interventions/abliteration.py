"""Abliteration (Arditi et al. 2024, "Refusal in LLMs is mediated by a single direction"): the study's negative
control, a model that has lost its refusal direction but little else.

The direction r is the difference of the mean residual stream entering block `layer` at the last prompt token
(the chat template's generation prompt) over harmful and over harmless instructions, normalised. Every weight
that writes to the residual stream is then orthogonalised against it, W <- W - r r^T W: the token embeddings
(rows), each attention output projection and each MLP down projection (and their biases), so no block can write
along r again. That is exact for pre-norm decoders (Llama, Qwen2, Mistral, SmolLM2); models that normalise a
block's output before adding it (Gemma 2/3) only approximately lose r. Several layers may be named: the span of
their directions is then projected out (W <- W - Q Q^T W, Q an orthonormal basis of it), for models whose
refusal no single layer's direction carries alone.

Tied embeddings (SmolLM2, Qwen2.5-0.5B): the shared matrix is orthogonalised, so lm_head changes with it, as in
the reference implementation (andyrdt/refusal_direction on tied Gemma); the checkpoint keeps its base's
architecture and size (bench/abliteration.py measures the perplexity cost against an untied lm_head).

An artifact is a plain Hugging Face checkpoint (bf16, like the base) plus `abliteration.json` (this module's
manifest, with the exact instructions) and the direction, in `<artifacts_dir>/<model>-abliterated-<id>/`; the
directory appears only by renaming a finished temporary one, so a killed run leaves nothing behind.
"""

from __future__ import annotations

import datetime as _dt
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from quantsafe.backends.hf import HFBackend
from quantsafe.errors import QuantsafeError
from quantsafe.hashing import stable_hash
from quantsafe.interventions.instructions import DEFAULT_HARMFUL_SOURCES, DEFAULT_HARMLESS_SOURCES, check_source
from quantsafe.models import ResolvedModel, load_model
from quantsafe.models.dtype import dtype_name
from quantsafe.quantization.artifact import _versions, atomic_dir

SCHEMA_VERSION = 2
MANIFEST_FILE = "abliteration.json"
DIRECTION_FILE = "refusal_directions.safetensors"
STORED_DTYPE = torch.bfloat16
RESIDUAL_WRITERS = ("self_attn.o_proj", "mlp.down_proj")
DEFAULT_LAYER = (0.46, 0.54)
"""Fractions of depth: blocks 11 and 13 of qwen2.5-coder-0.5b, whose two directions together remove refusals where
no single layer's does (bench/abliteration.py: refusals -22 points on held-out OpenSafetyMini prompts, perplexity
+13%); other models may need their own (SmolLM2 loses much more perplexity there)."""


class AbliterationConfig(BaseModel):
    """How the direction is found. `layer` is a block index or, as a float in (0, 1), a fraction of depth (the
    nearest block), so one study config suits models of any depth; or several of these."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    layer: int | float | tuple[int | float, ...] = DEFAULT_LAYER
    n_instructions: int = Field(128, ge=1, description="instructions per side (Arditi et al.: 128)")
    seed: int = 0
    harmful_sources: tuple[str, ...] = DEFAULT_HARMFUL_SOURCES
    harmless_sources: tuple[str, ...] = DEFAULT_HARMLESS_SOURCES
    batch_size: int = Field(16, ge=1)
    version: int = 2  # of the algorithm: bumped when a fix changes results, so an artifact made before is not reused

    @field_validator("layer")
    @classmethod
    def _layer(cls, value: int | float | tuple[int | float, ...]) -> int | float | tuple[int | float, ...]:
        if value == ():
            raise ValueError("at least one layer is needed")
        for one in value if isinstance(value, tuple) else (value,):
            if isinstance(one, float) and not 0.0 < one < 1.0:
                raise ValueError(f"a fractional layer must lie in (0, 1), got {one}; give a block index as an int")
            if isinstance(one, int) and one < 0:
                raise ValueError(f"layer index must be >= 0, got {one}")
        return value

    @field_validator("harmful_sources", "harmless_sources")
    @classmethod
    def _sources(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("at least one instruction source is needed")
        return tuple(check_source(source) for source in value)


class AbliteratedArtifact(BaseModel):
    """The manifest written as abliteration.json; `path` and `reused` describe this run and are not stored."""

    schema_version: int = SCHEMA_VERSION
    artifact_id: str
    config: AbliterationConfig
    layer: int | list[int]  # the block index (indices) `config.layer` resolved to, in its shape
    n_layers: int
    base_model: str
    base_source_sha256: str
    compute_dtype: str  # of the forward passes that found the directions
    stored_dtype: str = dtype_name(STORED_DTYPE)
    direction_norms: list[float]  # |mean(harmful) - mean(harmless)| per layer, before normalising
    tied_embeddings: bool  # lm_head shares the embedding matrix, so it was orthogonalised too
    harmful: list[str]
    harmless: list[str]
    versions: dict[str, str]
    seconds: float
    created_utc: str
    path: Path = Field(Path(), exclude=True)
    reused: bool = Field(False, exclude=True)


def decoder_blocks(model: Any) -> Any:
    """The decoder's blocks (`model.model.layers`, the layout of Llama-family causal LMs)."""
    blocks = getattr(getattr(model, "model", None), "layers", None)
    if blocks is None:
        raise QuantsafeError(f"{type(model).__name__}: abliteration needs a causal LM with model.model.layers")
    return blocks


def resolve_layer(layer: int | float, n_layers: int) -> int:
    """The block index of an index or a fraction of depth (the nearest block, at least 1)."""
    index = min(max(round(layer * n_layers), 1), n_layers - 1) if isinstance(layer, float) else layer
    if index >= n_layers:
        raise QuantsafeError(f"abliteration layer {index} does not exist; the model has {n_layers} blocks")
    return index


def resolve_layers(layer: int | float | tuple[int | float, ...], n_layers: int) -> list[int]:
    """The distinct block indices of a config's `layer`, in the order given."""
    return list(dict.fromkeys(resolve_layer(one, n_layers) for one in (layer if isinstance(layer, tuple) else
                                                                        (layer,))))


class _Enough(Exception):
    """Raised by the last capture hook: the blocks after it need not run."""


@torch.no_grad()
def mean_last_token_activations(model: Any, tokenizer: Any, instructions: Sequence[str], layers: Sequence[int],
                                batch_size: int = 16) -> torch.Tensor:
    """(len(layers), hidden) fp32: the mean residual stream entering each block at the last token of each
    instruction as the model is prompted (chat template, generation prompt). Batches are left-padded with position
    ids counted from each row's first real token, so a row's activations do not depend on its batch."""
    if not instructions:
        raise QuantsafeError("abliteration: no instructions to average over")
    blocks = decoder_blocks(model)
    if any(not 0 <= index < len(blocks) for index in layers):
        raise QuantsafeError(f"abliteration layers {list(layers)}: the model has blocks 0..{len(blocks) - 1}")
    backend = HFBackend(model, tokenizer, "abliteration")  # chat rendering, left padding, a pad token
    encoded = sorted((backend.encode([{"role": "user", "content": text}])[0] for text in instructions), key=len)
    wanted = sorted(set(layers))
    sums = {index: torch.zeros(model.config.hidden_size, dtype=torch.float64) for index in wanted}

    def capture(index: int) -> Callable[..., None]:
        def hook(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            sums[index] += hidden[:, -1].double().sum(0).cpu()
            if index == wanted[-1]:
                raise _Enough
        return hook

    handles = [blocks[index].register_forward_pre_hook(capture(index), with_kwargs=True) for index in wanted]
    try:
        for start in range(0, len(encoded), batch_size):
            enc = tokenizer.pad({"input_ids": encoded[start : start + batch_size]}, return_tensors="pt")
            positions = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
            with suppress(_Enough):
                model(input_ids=enc["input_ids"].to(model.device), position_ids=positions.to(model.device),
                      attention_mask=enc["attention_mask"].to(model.device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack([sums[index] for index in layers]).div(len(encoded)).float()


def mean_differences(model: Any, tokenizer: Any, harmful: Sequence[str], harmless: Sequence[str],
                     layers: Sequence[int], batch_size: int = 16) -> torch.Tensor:
    """(len(layers), hidden): mean(harmful) - mean(harmless) entering each block, unnormalised."""
    return (mean_last_token_activations(model, tokenizer, harmful, layers, batch_size)
            - mean_last_token_activations(model, tokenizer, harmless, layers, batch_size))


def unit_direction(difference: torch.Tensor, layer: int) -> torch.Tensor:
    """The difference normalised; one whose norm is 0 (e.g. the embeddings of one shared last token) has none."""
    norm = float(difference.norm())
    if not norm > 0.0 or not torch.isfinite(difference).all():
        raise QuantsafeError(f"abliteration: harmful and harmless means do not differ at layer {layer} "
                             f"(norm {norm}); choose a deeper layer")
    return difference / norm


def refusal_direction(model: Any, tokenizer: Any, harmful: Sequence[str], harmless: Sequence[str], layer: int,
                      batch_size: int = 16) -> torch.Tensor:
    """The unit refusal direction entering block `layer` (fp32, on the CPU)."""
    return unit_direction(mean_differences(model, tokenizer, harmful, harmless, [layer], batch_size)[0], layer)


def orthonormal_basis(directions: torch.Tensor) -> torch.Tensor:
    """(hidden, k) orthonormal columns spanning the rows of `directions` ((k, hidden) or one (hidden,) vector)."""
    rows = directions.detach().float().reshape(-1, directions.shape[-1])
    q, r = torch.linalg.qr(rows.T)
    diagonal = r.diagonal().abs()
    if not bool((diagonal > 1e-4 * rows.norm(dim=1).max()).all()):
        raise QuantsafeError(f"abliteration: the {len(rows)} directions are linearly dependent (or zero); name "
                             "fewer layers")
    return q


def residual_writers(model: Any) -> list[tuple[str, Any]]:
    """(name, Linear) of every block's attention output and MLP down projection: what adds to the stream."""
    out = []
    for i, block in enumerate(decoder_blocks(model)):
        for name in RESIDUAL_WRITERS:
            try:
                out.append((f"model.layers.{i}.{name}", block.get_submodule(name)))
            except AttributeError:
                raise QuantsafeError(f"{type(block).__name__}: no {name}; abliteration knows decoders whose blocks "
                                     f"write to the residual stream through {' and '.join(RESIDUAL_WRITERS)}") from None
    return out


@torch.no_grad()
def orthogonalize(model: Any, directions: torch.Tensor) -> None:
    """Project a direction (hidden,) or the span of several (k, hidden) out of everything that writes to the
    residual stream, in place (fp32 arithmetic, stored back in each weight's dtype): embedding rows, o_proj and
    down_proj outputs, and their biases. Lengths do not matter."""
    embedding = model.get_input_embeddings().weight
    if directions.shape[-1] != embedding.shape[1] or directions.dim() > 2:
        raise QuantsafeError(f"abliteration: directions of shape {tuple(directions.shape)} do not fit a model of "
                             f"hidden size {embedding.shape[1]}")
    q = orthonormal_basis(directions).to(embedding.device)
    w = embedding.float()
    embedding.copy_(w - (w @ q) @ q.T)  # rows: each token's embedding loses its component in the span
    for _name, linear in residual_writers(model):
        w = linear.weight.float()  # (hidden, in): every output is a combination of its columns
        linear.weight.copy_(w - q @ (q.T @ w))
        if linear.bias is not None:
            b = linear.bias.float()
            linear.bias.copy_(b - q @ (q.T @ b))


def compute_abliteration_id(base_sha256: str, cfg: AbliterationConfig, harmful: Sequence[str],
                            harmless: Sequence[str], compute_dtype: torch.dtype) -> str:
    """Content address: base weights, config (bar where the instructions came from: their exact texts are in the
    key instead, so moving a file changes nothing), the texts, and the forward passes' dtype."""
    return stable_hash({"base": base_sha256,
                        "config": cfg.model_dump(mode="json", exclude={"harmful_sources", "harmless_sources"}),
                        "harmful": list(harmful), "harmless": list(harmless),
                        "compute_dtype": dtype_name(compute_dtype)})


def read_abliteration_manifest(path: Path) -> AbliteratedArtifact:
    """The manifest of an abliterated artifact directory."""
    manifest = Path(path) / MANIFEST_FILE
    if not manifest.is_file():
        raise QuantsafeError(f"{path}: not an abliterated artifact (no {MANIFEST_FILE})")
    try:
        artifact = AbliteratedArtifact.model_validate_json(manifest.read_bytes())
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "file"
        raise QuantsafeError(f"{manifest}: not a valid abliteration manifest ({where}: {first['msg']})") from None
    artifact.path = Path(path)
    return artifact


def abliterate_variant(resolved: ResolvedModel, cfg: AbliterationConfig, harmful: list[str], harmless: list[str],
                       artifacts_dir: Path, dtype: torch.dtype = torch.bfloat16) -> AbliteratedArtifact:
    """Abliterate `resolved` with these instructions and save it under `artifacts_dir`, or reuse the one there.

    `dtype` is what the forward passes that find the direction compute in (resolve_dtype: fp32 where bf16 is not
    native); the weights are stored in bf16 either way."""
    if not harmful or not harmless:
        raise QuantsafeError("abliteration needs harmful and harmless instructions (select_instructions)")
    start = time.perf_counter()
    artifact_id = compute_abliteration_id(resolved.source_sha256, cfg, harmful, harmless, dtype)
    final = Path(artifacts_dir) / f"{resolved.name}-abliterated-{artifact_id}"
    if (final / MANIFEST_FILE).is_file():
        artifact = read_abliteration_manifest(final)
        artifact.reused = True
        return artifact

    model, tokenizer = load_model(resolved, dtype)
    n_layers = len(decoder_blocks(model))
    layers = resolve_layers(cfg.layer, n_layers)
    differences = mean_differences(model, tokenizer, harmful, harmless, layers, cfg.batch_size)
    directions = torch.stack([unit_direction(diff, layer) for diff, layer in zip(differences, layers, strict=True)])
    orthogonalize(model, directions)
    model.to(STORED_DTYPE)
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    artifact = AbliteratedArtifact(
        artifact_id=artifact_id, config=cfg, layer=layers if isinstance(cfg.layer, tuple) else layers[0],
        n_layers=n_layers, base_model=resolved.name,
        base_source_sha256=resolved.source_sha256, compute_dtype=dtype_name(dtype),
        direction_norms=[round(float(diff.norm()), 6) for diff in differences],
        tied_embeddings=head is not None and head.weight.data_ptr() == embedding.weight.data_ptr(),
        harmful=list(harmful), harmless=list(harmless), versions=_versions(), seconds=0.0,
        created_utc=_dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )
    from safetensors.torch import save_file

    with atomic_dir(final, MANIFEST_FILE) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        save_file({"directions": directions.contiguous()}, str(tmp / DIRECTION_FILE))
        artifact.seconds = round(time.perf_counter() - start, 2)
        (tmp / MANIFEST_FILE).write_text(artifact.model_dump_json(indent=2), encoding="utf-8")
    artifact.path = final
    return artifact


def load_directions(path: Path) -> torch.Tensor:
    """(len(layers), hidden): the unit refusal directions an artifact was made with, one per layer (fp32)."""
    from safetensors.torch import load_file

    return load_file(str(Path(path) / DIRECTION_FILE))["directions"]


def load_abliterated(path: Path | str, dtype: torch.dtype = torch.bfloat16) -> tuple[Any, Any]:
    """An abliterated artifact as a Hugging Face model (eval mode, `dtype`) and its tokenizer."""
    artifact = read_abliteration_manifest(Path(path))
    return load_model(ResolvedModel(name=f"{artifact.base_model}-abliterated", path=Path(path), source=str(path),
                                    source_sha256=artifact.artifact_id, dequantized_gguf=False), dtype)

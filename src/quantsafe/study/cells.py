"""The study's units of work. Each cell is a plain function of picklable inputs that returns rows and writes
nothing, so the in-process executor and Ray run the same code and only the driver writes the store.

Models and judges stay resident in the worker between cells that share them (one at a time, so a worker holds
at most one model), which is what lets a variant's many small generation cells cost one load.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch

from quantsafe.backends.base import Backend, DecodingConfig
from quantsafe.backends.hf import HFBackend
from quantsafe.backends.openai_compat import OpenAIBackend
from quantsafe.backends.request_cache import RequestCache
from quantsafe.benchmarks import Prompt
from quantsafe.benchmarks.choice import score_choices
from quantsafe.errors import QuantsafeError
from quantsafe.hashing import stable_hash
from quantsafe.interventions.abliteration import AbliterationConfig, abliterate_variant, load_abliterated
from quantsafe.judges import validate_judge
from quantsafe.judges.base import Judge, JudgeItem
from quantsafe.judges.factory import judge_from_spec
from quantsafe.judges.spec import JudgeSpec
from quantsafe.judges.validation import AgreementRow, RefusalClassifier
from quantsafe.models import ResolvedModel, load_model
from quantsafe.models.device import release_model
from quantsafe.models.dtype import dtype_name
from quantsafe.models.imported import ImportedCheckpoint, load_imported
from quantsafe.quantization import load_quantized, quantize_variant
from quantsafe.store import ChoiceRow, GenerationRow, JudgmentRow, RefusalRow, VariantRow
from quantsafe.study.config import ServedSpec, ValidationSpec, VariantSpec

T = TypeVar("T")


@dataclass(frozen=True)
class Context:
    """What every cell of one study shares: resolved once by the driver, so every worker computes the same way."""

    data_dir: Path
    artifacts: Path
    criteria: dict[str, str]
    dtype: torch.dtype
    device: str
    threads: int  # CPU threads per cell: matmul reduction order, and so greedy outputs, depend on it
    decoding: DecodingConfig
    gen_key: str
    scoring_id: str
    requests: Path | None  # the study's HTTP response cache (served models, HTTP judges)

    def request_cache(self) -> RequestCache | None:
        return RequestCache(self.requests) if self.requests is not None else None


@dataclass(frozen=True)
class Loader:
    """How a worker loads a variant's weights: a description, not a closure, so it travels to other processes."""

    kind: Literal["full", "quantized", "imported", "abliterated", "served"]
    resolved: ResolvedModel | None = None
    path: Path | None = None
    checkpoint: ImportedCheckpoint | None = None
    served: ServedSpec | None = None

    def load(self, ctx: Context, name: str) -> Backend:
        if self.kind == "served":
            assert self.served is not None
            return OpenAIBackend(self.served.endpoint, ctx.request_cache())
        if self.kind == "full":
            assert self.resolved is not None
            model, tokenizer = load_model(self.resolved, ctx.dtype, device=ctx.device)
        elif self.kind == "quantized":
            assert self.path is not None
            model, tokenizer = load_quantized(self.path, dtype=ctx.dtype)
        elif self.kind == "imported":
            assert self.checkpoint is not None
            model, tokenizer = load_imported(self.checkpoint, ctx.dtype)
        else:
            assert self.path is not None
            model, tokenizer = load_abliterated(self.path, ctx.dtype)
        return HFBackend(model.to(ctx.device), tokenizer, name)


_RESIDENT: dict[str, Any] = {}


def resident(key: str, make: Callable[[], T]) -> T:
    """The object cached under `key` in this process, made on first use; anything else resident is released
    first, so a worker never holds two models."""
    if key not in _RESIDENT:
        release_resident()
        _RESIDENT[key] = make()
    value: T = _RESIDENT[key]
    return value


def release_resident() -> None:
    """Free whatever model or judge this process holds (before quantizing, and when a study ends); a GPU
    backend's weights are freed even where something still refers to it, so the next cell's model fits."""
    for value in _RESIDENT.values():
        if isinstance(value, HFBackend) and value.model.device.type == "cuda":
            release_model(value.model)
    _RESIDENT.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- variants ---------------------------------------------------------------------------------------------------

def prepare_variant(ctx: Context, resolved: ResolvedModel, spec: VariantSpec, checkpoint: ImportedCheckpoint | None,
                    instructions: tuple[list[str], list[str]] | None) -> tuple[VariantRow, Loader]:
    """A variant's store row and how to load it, quantizing or abliterating first (artifacts are written
    atomically under ctx.artifacts, so a shared path serves every worker and a killed one leaves nothing half-done)."""
    release_resident()
    torch.set_num_threads(ctx.threads)
    if checkpoint is not None:
        return _imported(resolved, checkpoint)
    if spec.abliterate is not None:
        assert instructions is not None
        return _abliterated(ctx, resolved, spec.abliterate, instructions)
    if spec.is_full_precision:
        vid = stable_hash({"source": resolved.source_sha256, "method": "none"})
        row = VariantRow(variant_id=vid, model=resolved.name, precision="bf16", method="none",
                         bits_per_weight=16.0, source_sha256=resolved.source_sha256,
                         dequantized_gguf=resolved.dequantized_gguf, config={"method": "none"})
        return row, Loader("full", resolved=resolved)
    qcfg = spec.quant_config()
    art = quantize_variant(resolved, qcfg, ctx.data_dir, ctx.artifacts, dtype=ctx.dtype, device=ctx.device)
    row = VariantRow(variant_id=art.artifact_id, model=resolved.name, precision=f"int{qcfg.bits}",
                     method=qcfg.method, bits=qcfg.bits, group_size=qcfg.group_size,
                     bits_per_weight=art.bits_per_weight, source_sha256=resolved.source_sha256,
                     dequantized_gguf=resolved.dequantized_gguf, artifact_path=str(art.path),
                     config=qcfg.model_dump(mode="json"))
    return row, Loader("quantized", path=art.path)


def _imported(resolved: ResolvedModel, ckpt: ImportedCheckpoint) -> tuple[VariantRow, Loader]:
    """An existing quantized checkpoint of `resolved`: nothing to quantize; its source and content hash are
    recorded, and its answers pair with the base model's full-precision ones (same `model`)."""
    row = VariantRow(variant_id=ckpt.variant_id(resolved.source_sha256), model=resolved.name,
                     precision=ckpt.precision, method=ckpt.method, bits=ckpt.bits, group_size=ckpt.group_size,
                     bits_per_weight=ckpt.bits_per_weight, source_sha256=ckpt.content_sha256,
                     dequantized_gguf=ckpt.format == "gguf", artifact_path=str(ckpt.path),
                     config=ckpt.record() | {"base_source_sha256": resolved.source_sha256})
    return row, Loader("imported", checkpoint=ckpt)


def _abliterated(ctx: Context, resolved: ResolvedModel, cfg: AbliterationConfig,
                 instructions: tuple[list[str], list[str]]) -> tuple[VariantRow, Loader]:
    """The negative control: `resolved` without its refusal direction, found from instructions the study never
    evaluates (their texts are in the id); paired against the same model's full-precision answers."""
    harmful, harmless = instructions
    art = abliterate_variant(resolved, cfg, harmful, harmless, ctx.artifacts, ctx.dtype)
    row = VariantRow(variant_id=art.artifact_id, model=resolved.name, precision="bf16", method="abliterated",
                     bits_per_weight=16.0, source_sha256=resolved.source_sha256,
                     dequantized_gguf=resolved.dequantized_gguf, artifact_path=str(art.path),
                     config={"abliterate": cfg.model_dump(mode="json"), "layer": art.layer,
                             "n_harmful": len(harmful), "n_harmless": len(harmless)})
    return row, Loader("abliterated", path=art.path)


def served_variant(spec: ServedSpec) -> tuple[VariantRow, Loader]:
    """A served model: keyed by what changes its answers (served name, declared weights), not by its address,
    which is recorded as its source."""
    vid = stable_hash({"served": spec.endpoint.identity(), "precision": spec.precision, "method": spec.method})
    row = VariantRow(variant_id=vid, model=spec.label, precision=spec.precision, method=spec.method,
                     bits_per_weight=spec.bits_per_weight, source_sha256=spec.endpoint.weights_sha256 or "",
                     dequantized_gguf=False, artifact_path=f"{spec.endpoint.base_url} ({spec.endpoint.model})",
                     config=spec.model_dump(mode="json"))
    return row, Loader("served", served=spec)


def _backend(ctx: Context, variant: VariantRow, loader: Loader) -> Backend:
    torch.set_num_threads(ctx.threads)
    return resident(f"variant:{variant.variant_id}", lambda: loader.load(ctx, variant.variant_id))


# --- model-running cells ----------------------------------------------------------------------------------------

def generate_cell(ctx: Context, variant: VariantRow, loader: Loader, prompts: Sequence[Prompt]) -> list[GenerationRow]:
    """Answers to one chunk of free-text items (its composition fixes the batches, so every executor agrees)."""
    gens = _backend(ctx, variant, loader).generate([[{"role": "user", "content": p.text}] for p in prompts],
                                                    ctx.decoding)
    record = ctx.decoding.model_dump() | {"dtype": dtype_name(ctx.dtype), "device": ctx.device,
                                                  "threads": ctx.threads}
    return [GenerationRow(variant_id=variant.variant_id, prompt_uid=p.uid, decoding_id=ctx.gen_key,
                          prompt_id=p.human_id, benchmark=p.benchmark, lang=p.lang, scenario=p.scenario, prompt=p.text,
                          response=g.text, n_new_tokens=g.n_new_tokens, finished=g.finished, truncated=g.truncated,
                          decoding=record) for p, g in zip(prompts, gens, strict=True)]


def score_cell(ctx: Context, variant: VariantRow, loader: Loader, prompts: Sequence[Prompt]) -> list[ChoiceRow]:
    """Multiple-choice items: the option letter with the highest next-token log-prob."""
    results = score_choices(_backend(ctx, variant, loader), prompts, batch_size=ctx.decoding.batch_size,
                            max_batch_tokens=ctx.decoding.max_batch_tokens)
    return [ChoiceRow(variant_id=variant.variant_id, prompt_uid=p.uid, scoring_id=ctx.scoring_id,
                      prediction=r.prediction, valid_mass=r.valid_mass, logprobs=r.logprobs)
            for p, r in zip(prompts, results, strict=True)]


# --- judges -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class JudgeIdentity:
    """What the driver must know of a judge before asking it anything (building it may load a model)."""

    judge_id: str
    mode: str
    refusal_id: str | None  # None: the judge cannot say whether an answer is a refusal


def _judge(ctx: Context, spec: JudgeSpec) -> Judge:
    torch.set_num_threads(ctx.threads)
    return resident(f"judge:{stable_hash(spec)}", lambda: judge_from_spec(
        spec, data_dir=ctx.data_dir, criteria=ctx.criteria, dtype=ctx.dtype, requests=ctx.request_cache(),
        device=ctx.device))


def identify_judge(ctx: Context, spec: JudgeSpec) -> JudgeIdentity:
    judge = _judge(ctx, spec)
    refusal = judge.refusal_id if isinstance(judge, RefusalClassifier) else None
    return JudgeIdentity(judge.judge_id, judge.mode, refusal)


def criterion(criteria: dict[str, str], scenario: str) -> str:
    if scenario not in criteria:
        raise QuantsafeError(f"no judge criterion for scenario '{scenario}' in safety_criteria.json")
    return criteria[scenario]


def judge_cell(ctx: Context, spec: JudgeSpec, rows: Sequence[GenerationRow]) -> list[JudgmentRow]:
    """Safety verdicts on one chunk of stored answers."""
    judge = _judge(ctx, spec)
    items = [JudgeItem(scenario=g.scenario, criterion=criterion(ctx.criteria, g.scenario), prompt=g.prompt,
                       response=g.response) for g in rows]
    return [JudgmentRow(variant_id=g.variant_id, prompt_uid=g.prompt_uid, decoding_id=g.decoding_id,
                        judge_id=judge.judge_id, response_sha=g.response_sha, verdict=j.verdict.value, mode=j.mode,
                        raw=j.raw, attempts=j.attempts, truncated=j.truncated, scores=j.scores)
            for g, j in zip(rows, judge.judge(items), strict=True)]


def refusal_cell(ctx: Context, spec: JudgeSpec, rows: Sequence[GenerationRow]) -> list[RefusalRow]:
    """Refusal calls (XSTest's over-refusal) on one chunk of stored answers."""
    judge = _judge(ctx, spec)
    assert isinstance(judge, RefusalClassifier)
    refused = judge.classify_refusals([(g.prompt, g.response) for g in rows])
    return [RefusalRow(variant_id=g.variant_id, prompt_uid=g.prompt_uid, decoding_id=g.decoding_id,
                       refusal_id=judge.refusal_id, response_sha=g.response_sha, refused=r)
            for g, r in zip(rows, refused, strict=True)]


def validate_cell(ctx: Context, spec: JudgeSpec, validation: ValidationSpec, set_name: str,
                  skip: frozenset[tuple[str, str]]) -> list[AgreementRow]:
    """The judge against people on one human-labelled XSTest file (both mappings not yet stored)."""
    return list(validate_judge(_judge(ctx, spec), ctx.data_dir, [set_name], validation.limit_per_set,
                               validation.seed, skip=skip))

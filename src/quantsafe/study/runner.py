"""Run a study: quantize → generate → judge → validate judges → report, resumable at every step."""

from __future__ import annotations

import gc
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from quantsafe.backends.base import Backend, DecodingConfig
from quantsafe.backends.hf import HFBackend
from quantsafe.backends.openai_compat import OpenAIBackend
from quantsafe.backends.request_cache import RequestCache
from quantsafe.benchmarks import Kind, Prompt, benchmark, load_benchmark, load_criteria
from quantsafe.benchmarks.choice import score_choices
from quantsafe.benchmarks.xstest import load_labelled_sets, load_xstest_completions
from quantsafe.datadir import cache_dir, resolve_data_dir
from quantsafe.errors import QuantsafeError
from quantsafe.hashing import stable_hash
from quantsafe.interventions.abliteration import AbliterationConfig, abliterate_variant, load_abliterated
from quantsafe.interventions.instructions import select_instructions
from quantsafe.judges import load_template, validate_judge
from quantsafe.judges.base import Judge, JudgeItem
from quantsafe.judges.factory import judge_from_spec
from quantsafe.judges.validation import RefusalClassifier
from quantsafe.models import ResolvedModel, load_model, resolve_model
from quantsafe.models.dtype import dtype_name, resolve_dtype
from quantsafe.models.imported import ImportedCheckpoint, inspect_import, load_imported
from quantsafe.models.loading import check_model
from quantsafe.quantization import load_quantized, quantize_variant
from quantsafe.report.build import write_report
from quantsafe.report.paper import paper_results_path
from quantsafe.store import (
    ChoiceRow,
    GenerationRow,
    JudgmentRow,
    RefusalRow,
    Store,
    StudyRecord,
    VariantRow,
)
from quantsafe.study.config import ServedSpec, StudyConfig, ValidationSpec, VariantSpec

CHUNK = 32  # generations/judgments committed per transaction: what a kill can cost at most
REQUEST_CACHE = "requests.db"  # every HTTP response of the study (served models, HTTP judges), for free reruns


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=False)


def generation_key(decoding: DecodingConfig, dtype: torch.dtype) -> str:
    """Keys every generation: the decoding settings that change outputs, and the compute dtype."""
    return stable_hash({"decoding": decoding.key_fields(), "dtype": dtype_name(dtype)})


def scoring_key(decoding: DecodingConfig, dtype: torch.dtype) -> str:
    """Keys every multiple-choice score: option log-probs depend on the compute dtype and on batch padding."""
    return stable_hash({"scoring": "next-token-logprobs", "shared_context": True, "batch_size": decoding.batch_size,
                        "max_batch_tokens": decoding.max_batch_tokens, "dtype": dtype_name(dtype)})


def study_prompts(cfg: StudyConfig, data_dir: Path) -> list[Prompt]:
    """All items of the study, de-duplicated by uid, in a stable order."""
    seen: dict[str, Prompt] = {}
    for b in cfg.benchmarks:
        for p in load_benchmark(b.name, data_dir, langs=b.langs, limit=b.limit,
                                limit_per_scenario=b.limit_per_scenario, seed=b.seed, permutations=b.permutations):
            seen.setdefault(p.uid, p)
    return list(seen.values())


def _of(prompts: Sequence[Prompt], kind: Kind, question: str | None = None) -> list[Prompt]:
    """The items of one kind (and, for judged ones, asking one question)."""
    return [p for p in prompts if benchmark(p.benchmark).kind == kind
            and (question is None or benchmark(p.benchmark).question == question)]


def _generated(prompts: Sequence[Prompt]) -> list[Prompt]:
    """Items answered in free text (judged or checked against a reference)."""
    return [p for p in prompts if benchmark(p.benchmark).kind != Kind.CHOICE]


class _Lazy:
    """A variant's backend, loaded at most once and only if some stage has work left for it."""

    def __init__(self, variant: VariantRow, loader: Callable[[str], Backend]):
        self.variant, self.loader = variant, loader
        self.backend: Backend | None = None

    def get(self) -> Backend:
        if self.backend is None:
            self.backend = self.loader(self.variant.variant_id)
        return self.backend

    def release(self) -> None:
        self.backend = None
        gc.collect()


def _variant(resolved: ResolvedModel, spec: VariantSpec, data_dir: Path, artifacts: Path, dtype: torch.dtype,
             ) -> tuple[VariantRow, Callable[[str], Backend]]:
    """The variant's store row and a loader of its weights in the compute dtype (quantizing first if needed)."""
    if spec.is_full_precision:
        vid = stable_hash({"source": resolved.source_sha256, "method": "none"})
        row = VariantRow(variant_id=vid, model=resolved.name, precision="bf16", method="none",
                         bits_per_weight=16.0, source_sha256=resolved.source_sha256,
                         dequantized_gguf=resolved.dequantized_gguf, config={"method": "none"})
        return row, lambda name: HFBackend(*load_model(resolved, dtype), name)
    qcfg = spec.quant_config()
    art = quantize_variant(resolved, qcfg, data_dir, artifacts, dtype=dtype)
    row = VariantRow(variant_id=art.artifact_id, model=resolved.name, precision=f"int{qcfg.bits}",
                     method=qcfg.method, bits=qcfg.bits, group_size=qcfg.group_size,
                     bits_per_weight=art.bits_per_weight, source_sha256=resolved.source_sha256,
                     dequantized_gguf=resolved.dequantized_gguf, artifact_path=str(art.path),
                     config=qcfg.model_dump(mode="json"))
    return row, lambda name: HFBackend(*load_quantized(art.path, dtype=dtype), name)


def _imported_variant(resolved: ResolvedModel, ckpt: ImportedCheckpoint, dtype: torch.dtype,
                      ) -> tuple[VariantRow, Callable[[str], Backend]]:
    """An existing quantized checkpoint of `resolved`: nothing to quantize; its source and content hash are
    recorded, and its answers pair with the base model's full-precision ones (same `model`)."""
    row = VariantRow(variant_id=ckpt.variant_id(resolved.source_sha256), model=resolved.name,
                     precision=ckpt.precision, method=ckpt.method, bits=ckpt.bits, group_size=ckpt.group_size,
                     bits_per_weight=ckpt.bits_per_weight, source_sha256=ckpt.content_sha256,
                     dequantized_gguf=ckpt.format == "gguf", artifact_path=str(ckpt.path),
                     config=ckpt.record() | {"base_source_sha256": resolved.source_sha256})
    return row, lambda name: HFBackend(*load_imported(ckpt, dtype), name)


def _abliterated_variant(resolved: ResolvedModel, cfg: AbliterationConfig, instructions: tuple[list[str], list[str]],
                         artifacts: Path, dtype: torch.dtype) -> tuple[VariantRow, Callable[[str], Backend]]:
    """The negative control: `resolved` without its refusal direction, found from instructions the study never
    evaluates (their texts are in the id); paired against the same model's full-precision answers."""
    harmful, harmless = instructions
    art = abliterate_variant(resolved, cfg, harmful, harmless, artifacts, dtype)
    row = VariantRow(variant_id=art.artifact_id, model=resolved.name, precision="bf16", method="abliterated",
                     bits_per_weight=16.0, source_sha256=resolved.source_sha256,
                     dequantized_gguf=resolved.dequantized_gguf, artifact_path=str(art.path),
                     config={"abliterate": cfg.model_dump(mode="json"), "layer": art.layer,
                             "n_harmful": len(harmful), "n_harmless": len(harmless)})
    return row, lambda name: HFBackend(*load_abliterated(art.path, dtype), name)


def _served_variant(spec: ServedSpec, cache: RequestCache | None) -> tuple[VariantRow, Callable[[str], Backend]]:
    """A served model: keyed by what changes its answers (served name, declared weights), not by its address,
    which is recorded as its source."""
    vid = stable_hash({"served": spec.endpoint.identity(), "precision": spec.precision, "method": spec.method})
    row = VariantRow(variant_id=vid, model=spec.label, precision=spec.precision, method=spec.method,
                     bits_per_weight=spec.bits_per_weight, source_sha256=spec.endpoint.weights_sha256 or "",
                     dequantized_gguf=False, artifact_path=f"{spec.endpoint.base_url} ({spec.endpoint.model})",
                     config=spec.model_dump(mode="json"))
    return row, lambda _name: OpenAIBackend(spec.endpoint, cache)


def _served_source(spec: ServedSpec) -> dict[str, Any]:
    """The report's provenance line for a served model."""
    return {"name": spec.label, "source": f"served by {spec.endpoint.base_url} as '{spec.endpoint.model}'",
            "source_sha256": spec.endpoint.weights_sha256 or "not declared", "dequantized_gguf": False}


def _generate(store: Store, lazy: _Lazy, prompts: Sequence[Prompt], decoding: DecodingConfig, gen_key: str,
              dtype: torch.dtype, console: Console) -> None:
    variant = lazy.variant
    done = store.done_generations(variant.variant_id, gen_key)
    todo = [p for p in prompts if p.uid not in done]
    if not todo:
        return
    backend = lazy.get()
    record = decoding.model_dump() | {"dtype": dtype_name(dtype)}
    with _progress(console) as bar:
        task = bar.add_task(f"generate {variant.model} {variant.precision} {variant.method}", total=len(todo))
        for start in range(0, len(todo), CHUNK):
            chunk = todo[start : start + CHUNK]
            gens = backend.generate([[{"role": "user", "content": p.text}] for p in chunk], decoding,
                                    on_batch=lambda k: bar.advance(task, k))
            store.add_generations(GenerationRow(
                variant_id=variant.variant_id, prompt_uid=p.uid, decoding_id=gen_key, prompt_id=p.human_id,
                benchmark=p.benchmark, lang=p.lang, scenario=p.scenario, prompt=p.text, response=g.text,
                n_new_tokens=g.n_new_tokens, finished=g.finished, truncated=g.truncated, decoding=record)
                for p, g in zip(chunk, gens, strict=True))


def _score_choices(store: Store, lazy: _Lazy, prompts: Sequence[Prompt], decoding: DecodingConfig,
                   scoring_id: str, console: Console) -> None:
    """Multiple-choice items: the option letter with the highest next-token log-prob, committed chunk by chunk."""
    variant = lazy.variant
    done = store.done_choices(variant.variant_id, scoring_id)
    todo = [p for p in prompts if p.uid not in done]
    if not todo:
        return
    backend = lazy.get()
    with _progress(console) as bar:
        task = bar.add_task(f"score {variant.model} {variant.precision} {variant.method}", total=len(todo))
        for start in range(0, len(todo), CHUNK):
            chunk = todo[start : start + CHUNK]
            results = score_choices(backend, chunk, batch_size=decoding.batch_size,
                                    max_batch_tokens=decoding.max_batch_tokens)
            store.add_choices(ChoiceRow(variant_id=variant.variant_id, prompt_uid=p.uid, scoring_id=scoring_id,
                                        prediction=r.prediction, valid_mass=r.valid_mass, logprobs=r.logprobs)
                              for p, r in zip(chunk, results, strict=True))
            bar.advance(task, len(chunk))


def _evaluate(store: Store, lazy: _Lazy, prompts: Sequence[Prompt], decoding: DecodingConfig, gen_key: str,
              scoring_id: str, dtype: torch.dtype, console: Console) -> None:
    """Every model-running stage of one variant, sharing one load of its weights."""
    _generate(store, lazy, _generated(prompts), decoding, gen_key, dtype, console)
    _score_choices(store, lazy, _of(prompts, Kind.CHOICE), decoding, scoring_id, console)
    lazy.release()


def _unread(store: Store, variant: VariantRow, gen_key: str, uids: Sequence[str],
            done: set[tuple[str, str]]) -> list[list[GenerationRow]]:
    """The variant's stored answers a reader (judge, refusal classifier) has not read yet, in commit-sized chunks;
    `done` holds (prompt uid, response sha) pairs, so a regenerated answer is read again."""
    todo = [g for g in store.generations(variant.variant_id, gen_key, uids)
            if (g.prompt_uid, g.response_sha) not in done]
    return [todo[start : start + CHUNK] for start in range(0, len(todo), CHUNK)]


def _classify_refusals(store: Store, classifier: RefusalClassifier, variants: Sequence[VariantRow],
                       prompts: Sequence[Prompt], gen_key: str, console: Console) -> None:
    """The refusal question (XSTest's over-refusal) for each stored answer not yet classified."""
    uids = [p.uid for p in prompts]
    with _progress(console) as bar:
        for v in variants:
            chunks = _unread(store, v, gen_key, uids, store.done_refusals(v.variant_id, gen_key, classifier.refusal_id))
            task = bar.add_task(f"refusal {v.model} {v.precision} {v.method}", total=sum(map(len, chunks)))
            for chunk in chunks:
                refused = classifier.classify_refusals([(g.prompt, g.response) for g in chunk])
                store.add_refusals(RefusalRow(variant_id=v.variant_id, prompt_uid=g.prompt_uid, decoding_id=gen_key,
                                              refusal_id=classifier.refusal_id, response_sha=g.response_sha,
                                              refused=r) for g, r in zip(chunk, refused, strict=True))
                bar.advance(task, len(chunk))


def _judge_all(store: Store, judge: Judge, variants: Sequence[VariantRow], prompts: Sequence[Prompt],
               gen_key: str, criteria: dict[str, str], console: Console) -> None:
    uids = [p.uid for p in prompts]
    with _progress(console) as bar:
        for v in variants:
            chunks = _unread(store, v, gen_key, uids, store.done_judgments(v.variant_id, gen_key, judge.judge_id))
            task = bar.add_task(f"judge[{judge.mode}] {v.model} {v.precision} {v.method}", total=sum(map(len, chunks)))
            for chunk in chunks:
                items = [JudgeItem(scenario=g.scenario, criterion=_criterion(criteria, g.scenario), prompt=g.prompt,
                                   response=g.response) for g in chunk]
                out = judge.judge(items)
                store.add_judgments(JudgmentRow(
                    variant_id=v.variant_id, prompt_uid=g.prompt_uid, decoding_id=gen_key, judge_id=judge.judge_id,
                    response_sha=g.response_sha, verdict=j.verdict.value, mode=j.mode, raw=j.raw,
                    attempts=j.attempts, truncated=j.truncated, scores=j.scores)
                    for g, j in zip(chunk, out, strict=True))
                bar.advance(task, len(chunk))


def _criterion(criteria: dict[str, str], scenario: str) -> str:
    if scenario not in criteria:
        raise QuantsafeError(f"no judge criterion for scenario '{scenario}' in safety_criteria.json")
    return criteria[scenario]


def _check_out_dir(out_dir: Path) -> None:
    """--out must be a directory we can write; found before any model loads, not after an hour of work."""
    for parent in (out_dir, *out_dir.parents):
        if parent.exists():
            if not parent.is_dir():
                raise QuantsafeError(f"{out_dir}: cannot be an output directory ({parent} is a file)")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise QuantsafeError(f"{out_dir}: not writable ({parent} does not allow writing)")
            return


class _Plan(BaseModel):
    """Everything a study names, resolved and checked before anything is written."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    data_dir: Path
    artifacts: Path
    prompts: list[Prompt]
    criteria: dict[str, str]
    models: list[ResolvedModel]
    imports: dict[int, ImportedCheckpoint]  # variant index -> its checkpoint, located, hashed and checked
    abliterations: dict[int, tuple[list[str], list[str]]]  # variant index -> (harmful, harmless) instructions
    dtype: torch.dtype


def _plan(cfg: StudyConfig, out_dir: Path) -> _Plan:
    """Validate every input the study names (data, variants, models, judges, validation sets, --out)."""
    _check_out_dir(out_dir)
    data_dir = resolve_data_dir(cfg.data_dir)
    prompts = study_prompts(cfg, data_dir)
    criteria = load_criteria(data_dir)
    for p in _of(prompts, Kind.JUDGED, "safety"):
        _criterion(criteria, p.scenario)
    imports: dict[int, ImportedCheckpoint] = {}
    abliterations: dict[int, tuple[list[str], list[str]]] = {}
    for i, spec in enumerate(cfg.variants):
        if spec.abliterate is not None:
            try:  # disjoint from every prompt this study evaluates, whatever its benchmarks
                abliterations[i] = select_instructions(data_dir, spec.abliterate, [p.text for p in prompts])
            except QuantsafeError as exc:
                raise QuantsafeError(f"study '{cfg.name}', variants.{i}.abliterate: {exc}") from None
        elif spec.import_ is not None:
            try:
                imports[i] = inspect_import(spec.import_)
            except QuantsafeError as exc:
                raise QuantsafeError(f"study '{cfg.name}', variants.{i}.import: {exc}") from None
        elif not spec.is_full_precision:
            try:
                spec.quant_config()
            except QuantsafeError as exc:
                raise QuantsafeError(f"study '{cfg.name}', variants.{i}: {exc}") from None
    dtype = resolve_dtype(cfg.dtype)
    models = [resolve_model(ref) for ref in cfg.models]
    for m in models:
        check_model(m)
    for i, jspec in enumerate(cfg.judges):
        if jspec.kind == "llm":
            try:
                check_model(resolve_model(jspec.model))
            except QuantsafeError as exc:
                raise QuantsafeError(f"study '{cfg.name}', judges.{i}: {exc}") from None
    for i, jspec in enumerate(cfg.judges):
        if jspec.kind == "trained":
            try:
                load_labelled_sets(jspec.trained.train_sets, data_dir)
            except QuantsafeError as exc:
                raise QuantsafeError(f"study '{cfg.name}', judges.{i}.trained.train_sets: {exc}") from None
    if any(j.kind == "llm" for j in cfg.judges):
        load_template(data_dir)  # a broken official template is found now, not after generation
    if cfg.validation is not None:
        available = load_xstest_completions(data_dir)
        missing = [s for s in cfg.validation.sets if s not in available]
        if missing:
            raise QuantsafeError(f"study '{cfg.name}', validation.sets: unknown XSTest file(s) {missing}; "
                                 f"available: {sorted(available)}")
    return _Plan(data_dir=data_dir, artifacts=cfg.artifacts_dir or cache_dir() / "artifacts", prompts=prompts,
                 criteria=criteria, models=models, imports=imports, abliterations=abliterations, dtype=dtype)


def run_study(cfg: StudyConfig, out_dir: Path, console: Console | None = None) -> Path:
    """Run every stage that is not already in out_dir/quantsafe.db, then write report.md and scores.csv."""
    console = console or Console(stderr=True)
    torch.manual_seed(0)
    plan = _plan(cfg, out_dir)
    gen_key = generation_key(cfg.decoding, plan.dtype)
    scoring_id = scoring_key(cfg.decoding, plan.dtype)
    compute = dtype_name(plan.dtype)
    console.print(f"[bold]{cfg.name}[/]: {len(cfg.models)} model(s) × {len(cfg.variants)} variant(s), "
                  f"{len(plan.prompts)} prompts, {len(cfg.judges)} judge(s), compute dtype {compute} → {out_dir}")
    variants: list[VariantRow] = []
    needs_http = bool(cfg.served) or any(j.endpoint is not None for j in cfg.judges)
    requests = RequestCache(out_dir / REQUEST_CACHE) if needs_http else None
    with Store.open(out_dir / "quantsafe.db") as store:
        store.add_items(plan.prompts)
        for ref, resolved in zip(cfg.models, plan.models, strict=True):
            for i, spec in enumerate(cfg.variants):
                if spec.import_ is not None and cfg.import_base(spec) != ref:
                    continue  # another model's checkpoint
                console.print(f"variant {resolved.name} {spec.label()}")
                if i in plan.imports:
                    row, loader = _imported_variant(resolved, plan.imports[i], plan.dtype)
                elif spec.abliterate is not None:
                    row, loader = _abliterated_variant(resolved, spec.abliterate, plan.abliterations[i],
                                                       plan.artifacts, plan.dtype)
                else:
                    row, loader = _variant(resolved, spec, plan.data_dir, plan.artifacts, plan.dtype)
                store.upsert_variant(row)
                variants.append(row)
                _evaluate(store, _Lazy(row, loader), plan.prompts, cfg.decoding, gen_key, scoring_id, plan.dtype,
                          console)
        for served in cfg.served:
            console.print(f"served {served.label} {served.precision} {served.method} at {served.endpoint.base_url}")
            row, loader = _served_variant(served, requests)
            store.upsert_variant(row)
            variants.append(row)
            _evaluate(store, _Lazy(row, loader), plan.prompts, cfg.decoding, gen_key, scoring_id, plan.dtype,
                      console)
        paper = paper_results_path(cfg.paper_results)
        judge_ids, refusal_ids = [], []
        safety_items, refusal_items = _of(plan.prompts, Kind.JUDGED, "safety"), _of(plan.prompts, Kind.JUDGED,
                                                                                      "refusal")
        sample = stable_hash(cfg.validation) if cfg.validation is not None else None
        for jspec in cfg.judges:
            judge = judge_from_spec(jspec, data_dir=plan.data_dir, criteria=plan.criteria, dtype=plan.dtype,
                                    requests=requests)
            judge_ids.append(judge.judge_id)
            store.upsert_judge(judge.judge_id, jspec.kind, judge.mode,
                               jspec.model_dump(mode="json") | {"dtype": compute})
            _judge_all(store, judge, variants, safety_items, gen_key, plan.criteria, console)
            if refusal_items and isinstance(judge, RefusalClassifier):
                refusal_ids.append(judge.refusal_id)
                _classify_refusals(store, judge, variants, refusal_items, gen_key, console)
            if cfg.validation is not None and sample is not None:
                _validate(store, judge, plan.data_dir, cfg.validation, sample, console)
            del judge
            gc.collect()
        study = StudyRecord(
            name=cfg.name, variant_ids=[v.variant_id for v in variants], prompt_uids=[p.uid for p in plan.prompts],
            decoding_id=gen_key, decoding=cfg.decoding.model_dump() | {"dtype": compute}, judge_ids=judge_ids,
            refusal_ids=refusal_ids, scoring_id=scoring_id if _of(plan.prompts, Kind.CHOICE) else None,
            validation_sample=sample,
            models=[m.model_dump(mode="json") for m in plan.models] + [_served_source(s) for s in cfg.served],
            config=cfg.model_dump(mode="json"), paper_results=str(paper) if paper else None)
        store.record_study(study)
        return write_report(store, out_dir, study)


def _validate(store: Store, judge: Judge, data_dir: Path, spec: ValidationSpec, sample: str,
              console: Console) -> None:
    """Measure the judge against people once per (set, mapping, sample); each row is saved as soon as it exists."""
    done = {(a["set"], a["mapping"]) for a in store.agreement(judge.judge_id, sample)}
    if len(done) == len(spec.sets) * 2:
        return
    console.print(f"validate judge {judge.mode} `{judge.judge_id[:8]}` on human-labelled XSTest completions "
                  f"({', '.join(spec.sets)}; up to {spec.limit_per_set or 'all'} items each)")
    for row in validate_judge(judge, data_dir, spec.sets, spec.limit_per_set, spec.seed, skip=done):
        store.put_agreement(judge.judge_id, row.set, row.mapping, sample, row.model_dump(mode="json"))

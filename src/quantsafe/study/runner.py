"""Run a study: quantize → generate → judge → validate judges → report, resumable at every step."""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from quantsafe.backends.base import DecodingConfig
from quantsafe.backends.hf import HFBackend
from quantsafe.benchmarks import Prompt, load_benchmark, load_criteria
from quantsafe.datadir import cache_dir, resolve_data_dir
from quantsafe.errors import QuantsafeError
from quantsafe.hashing import stable_hash
from quantsafe.judges import validate_judge
from quantsafe.judges.base import Judge, JudgeItem
from quantsafe.judges.factory import build_judge
from quantsafe.models import ResolvedModel, load_model, resolve_model
from quantsafe.quantization import QuantConfig, load_quantized, quantize_variant
from quantsafe.report import compute_scores, render_report, scores_csv
from quantsafe.report.paper import load_paper_safety, paper_results_path
from quantsafe.store import GenerationRow, JudgmentRow, Store, VariantRow, atomic_write_text
from quantsafe.study.config import StudyConfig, ValidationSpec, VariantSpec

CHUNK = 32  # generations/judgments committed per transaction: what a kill can cost at most


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=False)


def decoding_id(decoding: DecodingConfig) -> str:
    return stable_hash(decoding.key_fields())


def study_prompts(cfg: StudyConfig, data_dir: Path) -> list[Prompt]:
    """All prompts of the study, de-duplicated by uid, in a stable order."""
    seen: dict[str, Prompt] = {}
    for b in cfg.benchmarks:
        for p in load_benchmark(b.name, data_dir, langs=b.langs, limit=b.limit,
                                limit_per_scenario=b.limit_per_scenario, seed=b.seed):
            seen.setdefault(p.uid, p)
    return list(seen.values())


def _quant_config(spec: VariantSpec) -> QuantConfig:
    return QuantConfig.from_dict(spec.model_dump(exclude_none=True))


def _variant(resolved: ResolvedModel, spec: VariantSpec, data_dir: Path, artifacts: Path,
             ) -> tuple[VariantRow, Callable[[], tuple[Any, Any]]]:
    """The variant's store row and a loader for its weights (quantizing first if needed)."""
    if spec.is_full_precision:
        vid = stable_hash({"source": resolved.source_sha256, "method": "none", "dtype": "bf16"})
        row = VariantRow(variant_id=vid, model=resolved.name, precision="bf16", method="none",
                         bits_per_weight=16.0, source_sha256=resolved.source_sha256,
                         dequantized_gguf=resolved.dequantized_gguf, config={"method": "none"})
        return row, lambda: load_model(resolved)
    qcfg = _quant_config(spec)
    art = quantize_variant(resolved, qcfg, data_dir, artifacts)
    row = VariantRow(variant_id=art.artifact_id, model=resolved.name, precision=f"int{qcfg.bits}",
                     method=qcfg.method, bits=qcfg.bits, group_size=qcfg.group_size,
                     bits_per_weight=art.bits_per_weight, source_sha256=resolved.source_sha256,
                     dequantized_gguf=resolved.dequantized_gguf, artifact_path=str(art.path),
                     config=qcfg.model_dump(mode="json"))
    return row, lambda: load_quantized(art.path)


def _generate(store: Store, variant: VariantRow, loader: Callable[[], tuple[Any, Any]], prompts: Sequence[Prompt],
              decoding: DecodingConfig, console: Console) -> None:
    did = decoding_id(decoding)
    done = store.done_generations(variant.variant_id, did)
    todo = [p for p in prompts if p.uid not in done]
    if not todo:
        return
    model, tok = loader()
    backend = HFBackend(model, tok, variant.variant_id)
    with _progress(console) as bar:
        task = bar.add_task(f"generate {variant.model} {variant.precision} {variant.method}", total=len(todo))
        for start in range(0, len(todo), CHUNK):
            chunk = todo[start : start + CHUNK]
            gens = backend.generate([[{"role": "user", "content": p.text}] for p in chunk], decoding,
                                    on_batch=lambda k: bar.advance(task, k))
            store.add_generations(GenerationRow(
                variant_id=variant.variant_id, prompt_uid=p.uid, decoding_id=did, benchmark=p.benchmark,
                lang=p.lang, scenario=p.scenario, prompt=p.text, response=g.text, n_new_tokens=g.n_new_tokens,
                finished=g.finished, decoding=decoding.model_dump()) for p, g in zip(chunk, gens, strict=True))
    del model, backend
    gc.collect()


def _judge_all(store: Store, judge: Judge, variants: Sequence[VariantRow], prompts: Sequence[Prompt],
               decoding: DecodingConfig, criteria: dict[str, str], console: Console) -> None:
    did = decoding_id(decoding)
    uids = [p.uid for p in prompts]
    with _progress(console) as bar:
        for v in variants:
            done = store.done_judgments(v.variant_id, did, judge.judge_id)
            todo = [g for g in store.generations(v.variant_id, did, uids) if g.prompt_uid not in done]
            task = bar.add_task(f"judge[{judge.mode}] {v.model} {v.precision} {v.method}", total=len(todo))
            for start in range(0, len(todo), CHUNK):
                chunk = todo[start : start + CHUNK]
                items = [JudgeItem(scenario=g.scenario, criterion=_criterion(criteria, g.scenario), prompt=g.prompt,
                                   response=g.response) for g in chunk]
                out = judge.judge(items)
                store.add_judgments(JudgmentRow(
                    variant_id=v.variant_id, prompt_uid=g.prompt_uid, decoding_id=did, judge_id=judge.judge_id,
                    verdict=j.verdict.value, mode=j.mode, raw=j.raw, attempts=j.attempts, scores=j.scores)
                    for g, j in zip(chunk, out, strict=True))
                bar.advance(task, len(chunk))


def _criterion(criteria: dict[str, str], scenario: str) -> str:
    if scenario not in criteria:
        raise QuantsafeError(f"no judge criterion for scenario '{scenario}' in safety_criteria.json")
    return criteria[scenario]


def run_study(cfg: StudyConfig, out_dir: Path, console: Console | None = None) -> Path:
    """Run every stage that is not already in out_dir/quantsafe.db, then write report.md and scores.csv."""
    console = console or Console(stderr=True)
    torch.manual_seed(0)
    data_dir = resolve_data_dir(cfg.data_dir)
    artifacts = cfg.artifacts_dir or cache_dir() / "artifacts"
    prompts = study_prompts(cfg, data_dir)
    criteria = load_criteria(data_dir)
    for p in prompts:
        _criterion(criteria, p.scenario)  # fail before hours of work, not after
    for i, spec in enumerate(cfg.variants):  # every input is checked before anything is written
        if not spec.is_full_precision:
            try:
                _quant_config(spec)
            except QuantsafeError as exc:
                raise QuantsafeError(f"study '{cfg.name}', variants.{i}: {exc}") from None
    resolved_models = [resolve_model(ref) for ref in cfg.models]
    out_dir.mkdir(parents=True, exist_ok=True)
    console.print(f"[bold]{cfg.name}[/]: {len(cfg.models)} model(s) × {len(cfg.variants)} variant(s), "
                  f"{len(prompts)} prompts, {len(cfg.judges)} judge(s) → {out_dir}")
    models_meta: list[dict[str, Any]] = []
    variants: list[VariantRow] = []
    with Store.open(out_dir / "quantsafe.db") as store:
        for resolved in resolved_models:
            models_meta.append(resolved.model_dump(mode="json"))
            for spec in cfg.variants:
                console.print(f"variant {resolved.name} {spec.label()}")
                row, loader = _variant(resolved, spec, data_dir, artifacts)
                store.upsert_variant(row)
                variants.append(row)
                _generate(store, row, loader, prompts, cfg.decoding, console)
        judge_ids = []
        for jspec in cfg.judges:
            judge = build_judge(jspec.kind, model=jspec.model, mode=jspec.mode, calibrate=jspec.calibrate,
                                few_shot=jspec.few_shot, max_retries=jspec.max_retries, decoding=jspec.decoding,
                                data_dir=data_dir, criteria=criteria)
            judge_ids.append(judge.judge_id)
            store.upsert_judge(judge.judge_id, jspec.kind, judge.mode, jspec.model_dump(mode="json"))
            _judge_all(store, judge, variants, prompts, cfg.decoding, criteria, console)
            if cfg.validation is not None:
                _validate(store, judge, data_dir, cfg.validation, console)
            del judge
            gc.collect()
        return write_report(store, out_dir, cfg.name, variants, judge_ids, models_meta, cfg.decoding,
                            cfg.paper_results)


def _validate(store: Store, judge: Judge, data_dir: Path, spec: ValidationSpec, console: Console) -> None:
    """Measure the judge against people once per (set, mapping, sample); cached in the store."""
    sample = stable_hash(spec)
    done = {(a["set"], a["mapping"]) for a in store.agreement(judge.judge_id) if a.get("sample") == sample}
    if len(done) == len(spec.sets) * 2:
        return
    console.print(f"validate judge {judge.mode} `{judge.judge_id[:8]}` on human-labelled XSTest completions "
                  f"({', '.join(spec.sets)}; up to {spec.limit_per_set or 'all'} items each)")
    for row in validate_judge(judge, data_dir, spec.sets, spec.limit_per_set, spec.seed, skip=done):
        store.put_agreement(judge.judge_id, row.set, row.mapping, row.model_dump(mode="json") | {"sample": sample})


def write_report(store: Store, out_dir: Path, name: str, variants: Sequence[VariantRow] | None = None,
                 judge_ids: Sequence[str] | None = None, models_meta: Sequence[dict[str, Any]] | None = None,
                 decoding: DecodingConfig | None = None, paper_results: Path | None = None) -> Path:
    """Re-report from the store alone (no model runs): report.md, scores.csv."""
    variants = list(variants) if variants is not None else store.variants()
    judges = [j for j in store.judges() if judge_ids is None or j["judge_id"] in judge_ids]
    judged = [r for j in judges for r in store.judged(j["judge_id"])]
    keep = {v.variant_id for v in variants}
    scores = compute_scores([r for r in judged if r["variant_id"] in keep], variants)
    agreement = [a for j in judges for a in store.agreement(j["judge_id"])]
    if models_meta is None:
        models_meta = [{"name": v.model, "source": "see variants", "source_sha256": v.source_sha256,
                        "dequantized_gguf": v.dequantized_gguf} for v in variants if v.method == "none"]
    paper_path = paper_results_path(paper_results)
    paper = load_paper_safety(paper_path) if paper_path else []
    text = render_report(name, variants, scores, judges, agreement, models_meta,
                         decoding.model_dump() if decoding else {}, paper)
    atomic_write_text(out_dir / "scores.csv", scores_csv(scores))
    report = out_dir / "report.md"
    atomic_write_text(report, text)
    return report

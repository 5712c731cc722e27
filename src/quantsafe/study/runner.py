"""Run a study: quantize → generate → judge → validate judges → report, resumable at every step."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from quantsafe.backends.base import DecodingConfig
from quantsafe.backends.hf import HFBackend
from quantsafe.benchmarks import Kind, Prompt, benchmark, load_benchmark, load_criteria
from quantsafe.benchmarks.xstest import load_labelled_sets, load_xstest_completions
from quantsafe.datadir import cache_dir, resolve_data_dir
from quantsafe.errors import QuantsafeError
from quantsafe.hashing import stable_hash
from quantsafe.interventions.instructions import select_instructions
from quantsafe.judges import load_template
from quantsafe.judges.validation import AgreementRow
from quantsafe.models import ResolvedModel, resolve_model
from quantsafe.models.dtype import dtype_name, resolve_dtype
from quantsafe.models.imported import ImportedCheckpoint, inspect_import
from quantsafe.models.loading import check_model
from quantsafe.report.build import write_report
from quantsafe.report.paper import paper_results_path
from quantsafe.store import ChoiceRow, GenerationRow, JudgmentRow, RefusalRow, Store, StudyRecord, VariantRow
from quantsafe.study import cells
from quantsafe.study.cells import Context, JudgeIdentity, Loader
from quantsafe.study.config import ServedSpec, StudyConfig
from quantsafe.study.executors import Executor, LocalExecutor, Needs, Priority

CHUNK = 32  # generations/judgments committed per transaction: what a kill can cost at most
GENERATION_BATCHES = 4  # batches per generation cell: continuous batching refills rows, and each call ends in a tail
REQUEST_CACHE = "requests.db"  # every HTTP response of the study (served models, HTTP judges), for free reruns


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=False)


def _on(device: str) -> dict[str, str]:
    """The device's part of a key: none for the CPU (keys from before devices existed stay valid), else its type."""
    kind = torch.device(device).type
    return {} if kind == "cpu" else {"device": kind}


def generation_key(decoding: DecodingConfig, dtype: torch.dtype, device: str = "cpu") -> str:
    """Keys every generation: the decoding settings that change outputs, the batching algorithm (which rows share
    a forward pass moves bf16 greedy outputs), the compute dtype and device type."""
    return stable_hash({"decoding": decoding.key_fields(), "batching": HFBackend.batching,
                        "dtype": dtype_name(dtype)} | _on(device))


def scoring_key(decoding: DecodingConfig, dtype: torch.dtype, device: str = "cpu") -> str:
    """Keys every multiple-choice score: option log-probs depend on the compute dtype and on batch padding."""
    return stable_hash({"scoring": "next-token-logprobs", "shared_context": True, "batch_size": decoding.batch_size,
                        "max_batch_tokens": decoding.max_batch_tokens, "dtype": dtype_name(dtype)} | _on(device))


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


def _chunks(items: Sequence[Any], size: int = CHUNK) -> list[list[Any]]:
    return [list(items[start : start + size]) for start in range(0, len(items), size)]


def _weights_bytes(path: Path | None) -> int | None:
    """Bytes of a model's weight files: what Ray reserves (3x: load, dequantize, activations) for its cells."""
    if path is None or not path.is_dir():
        return None
    total = sum(f.stat().st_size for f in path.rglob("*.safetensors"))
    return 3 * total if total else None


class _Driver:
    """Submits the study's cells as their inputs become ready and writes every result to the store as it arrives
    (the only writer), so a kill loses at most the cells in flight and a rerun submits only what is missing.

    Order of readiness: a variant is prepared (quantized) → its generation and scoring chunks → once all of its
    answers are stored, each judge's chunks for it; a judge's identity (which may load its model) and validation
    need nothing before them."""

    def __init__(self, store: Store, ctx: Context, executor: Executor, console: Console, progress: Progress,
                 plan: _Plan, cfg: StudyConfig):
        self.store, self.ctx, self.executor, self.console, self.bar = store, ctx, executor, console, progress
        self.plan, self.cfg = plan, cfg
        self.then: dict[int, Callable[[Any], None]] = {}
        self.variants: dict[int, VariantRow] = {}  # study order -> row
        self.answering: dict[int, int] = {}  # study order -> generation chunks not yet stored
        self.judges: dict[int, JudgeIdentity] = {}
        self.tasks: dict[str, TaskID] = {}
        self.safety = [p.uid for p in _of(plan.prompts, Kind.JUDGED, "safety")]
        self.refusal = [p.uid for p in _of(plan.prompts, Kind.JUDGED, "refusal")]

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...], priority: Priority, then: Callable[[Any], None],
               needs: Needs = Needs()) -> None:
        self.then[self.executor.submit(fn, args, priority, needs)] = then

    def run(self) -> None:
        while self.executor.pending():
            handle, result = self.executor.next()
            self.then.pop(handle)(result)

    def _task(self, label: str, total: int) -> TaskID:
        if label not in self.tasks:
            self.tasks[label] = self.bar.add_task(label, total=0)
        task = self.tasks[label]
        self.bar.update(task, total=(self.bar.tasks[task].total or 0) + total)
        return task

    def _needs(self, loader: Loader | None) -> Needs:
        on_gpu = torch.device(self.ctx.device).type == "cuda" and (loader is None or loader.kind != "served")
        path = None
        if loader is not None:
            path = loader.resolved.path if loader.resolved else loader.checkpoint.path if loader.checkpoint \
                else loader.path
        return Needs(gpu=on_gpu, memory_bytes=_weights_bytes(path))

    # variants
    def prepare(self, order: int, resolved: ResolvedModel, index: int) -> None:
        spec = self.cfg.variants[index]
        self.console.print(f"variant {resolved.name} {spec.label()}")
        args = (self.ctx, resolved, spec, self.plan.imports.get(index), self.plan.abliterations.get(index))
        self.submit(cells.prepare_variant, args, (0, order, -1), lambda result: self.prepared(order, *result),
                    Needs(gpu=torch.device(self.ctx.device).type == "cuda" and index not in self.plan.imports))

    def prepared(self, order: int, row: VariantRow, loader: Loader) -> None:
        self.store.upsert_variant(row)
        self.variants[order] = row
        needs, label = self._needs(loader), f"{row.model} {row.precision} {row.method}"
        done = self.store.done_generations(row.variant_id, self.ctx.gen_key)
        todo = _chunks([p for p in _generated(self.plan.prompts) if p.uid not in done],
                       max(CHUNK, GENERATION_BATCHES * self.ctx.decoding.batch_size))
        self.answering[order] = len(todo)
        task = self._task(f"generate {label}", sum(map(len, todo)))
        for k, chunk in enumerate(todo):
            self.submit(cells.generate_cell, (self.ctx, row, loader, chunk), (0, order, k),
                        partial(self.answered, order, task), needs)
        done = self.store.done_choices(row.variant_id, self.ctx.scoring_id)
        todo = _chunks([p for p in _of(self.plan.prompts, Kind.CHOICE) if p.uid not in done])
        task = self._task(f"score {label}", sum(map(len, todo)))
        for k, chunk in enumerate(todo):
            self.submit(cells.score_cell, (self.ctx, row, loader, chunk), (0, order, len(self.plan.prompts) + k),
                        partial(self.scored, task), needs)
        if not self.answering[order]:
            self.ready(order)

    def answered(self, order: int, task: TaskID, rows: list[GenerationRow]) -> None:
        self.store.add_generations(rows)
        self.bar.advance(task, len(rows))
        self.answering[order] -= 1
        if not self.answering[order]:
            self.ready(order)

    def scored(self, task: TaskID, rows: list[ChoiceRow]) -> None:
        self.store.add_choices(rows)
        self.bar.advance(task, len(rows))

    def ready(self, order: int) -> None:
        for j in self.judges:
            self.read(j, order)

    # judges
    def identify(self, j: int) -> None:
        spec = self.cfg.judges[j]
        self.submit(cells.identify_judge, (self.ctx, spec), (1, j, -1), lambda ident: self.identified(j, ident),
                    self._needs(None) if spec.endpoint is None else Needs())

    def identified(self, j: int, ident: JudgeIdentity) -> None:
        spec = self.cfg.judges[j]
        self.judges[j] = ident
        self.store.upsert_judge(ident.judge_id, spec.kind, ident.mode,
                                spec.model_dump(mode="json") | {"dtype": dtype_name(self.ctx.dtype)})
        for order in self.variants:
            if not self.answering[order]:
                self.read(j, order)
        if self.cfg.validation is not None:
            self.validate(j, ident)

    def read(self, j: int, order: int) -> None:
        """Submit judge `j`'s chunks for the variant's answers it has not read yet."""
        spec, ident, v = self.cfg.judges[j], self.judges[j], self.variants[order]
        needs = self._needs(None) if spec.endpoint is None else Needs()
        label = f"{v.model} {v.precision} {v.method}"
        unread = _unread(self.store, v, self.ctx.gen_key, self.safety,
                         self.store.done_judgments(v.variant_id, self.ctx.gen_key, ident.judge_id))
        task = self._task(f"judge[{ident.mode}] {label}", sum(map(len, unread)))
        for k, chunk in enumerate(unread):
            self.submit(cells.judge_cell, (self.ctx, spec, chunk), (1, j, order, k),
                        partial(self.judged, task), needs)
        if ident.refusal_id is None or not self.refusal:
            return
        unread = _unread(self.store, v, self.ctx.gen_key, self.refusal,
                         self.store.done_refusals(v.variant_id, self.ctx.gen_key, ident.refusal_id))
        task = self._task(f"refusal {label}", sum(map(len, unread)))
        for k, chunk in enumerate(unread):
            self.submit(cells.refusal_cell, (self.ctx, spec, chunk), (1, j, order, len(self.plan.prompts) + k),
                        partial(self.refused, task), needs)

    def judged(self, task: TaskID, rows: list[JudgmentRow]) -> None:
        self.store.add_judgments(rows)
        self.bar.advance(task, len(rows))

    def refused(self, task: TaskID, rows: list[RefusalRow]) -> None:
        self.store.add_refusals(rows)
        self.bar.advance(task, len(rows))

    def validate(self, j: int, ident: JudgeIdentity) -> None:
        """The judge against people, once per (set, mapping, sample)."""
        spec, validation = self.cfg.judges[j], self.cfg.validation
        assert validation is not None
        sample = stable_hash(validation)
        done = {(a["set"], a["mapping"]) for a in self.store.agreement(ident.judge_id, sample)}
        wanted = ("safety",) if ident.refusal_id is None else ("safety", "refusal")
        todo = [s for s in validation.sets if any((s, m) not in done for m in wanted)]
        if todo:
            self.console.print(f"validate judge {ident.mode} `{ident.judge_id[:8]}` on human-labelled XSTest "
                               f"completions ({', '.join(todo)}; up to {validation.limit_per_set or 'all'} items each)")
        for i, set_name in enumerate(todo):
            skip = frozenset(d for d in done if d[0] == set_name)
            self.submit(cells.validate_cell, (self.ctx, spec, validation, set_name, skip), (1, j, 1 << 30, i),
                        lambda rows: self.validated(ident.judge_id, sample, rows),
                        self._needs(None) if spec.endpoint is None else Needs())

    def validated(self, judge_id: str, sample: str, rows: list[AgreementRow]) -> None:
        for row in rows:
            self.store.put_agreement(judge_id, row.set, row.mapping, sample, row.model_dump(mode="json"))


def _served_source(spec: ServedSpec) -> dict[str, Any]:
    """The report's provenance line for a served model."""
    return {"name": spec.label, "source": f"served by {spec.endpoint.base_url} as '{spec.endpoint.model}'",
            "source_sha256": spec.endpoint.weights_sha256 or "not declared", "dequantized_gguf": False}


def _unread(store: Store, variant: VariantRow, gen_key: str, uids: Sequence[str],
            done: set[tuple[str, str]]) -> list[list[GenerationRow]]:
    """The variant's stored answers a reader (judge, refusal classifier) has not read yet, in commit-sized chunks;
    `done` holds (prompt uid, response sha) pairs, so a regenerated answer is read again."""
    return _chunks([g for g in store.generations(variant.variant_id, gen_key, uids)
                    if (g.prompt_uid, g.response_sha) not in done])


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
    device: str


def _plan(cfg: StudyConfig, out_dir: Path, device: str = "cpu") -> _Plan:
    """Validate every input the study names (data, variants, models, judges, validation sets, --out); `device` is
    where the cells will run (the dtype is chosen for it)."""
    _check_out_dir(out_dir)
    data_dir = resolve_data_dir(cfg.data_dir)
    prompts = study_prompts(cfg, data_dir)
    criteria = load_criteria(data_dir)
    for p in _of(prompts, Kind.JUDGED, "safety"):
        cells.criterion(criteria, p.scenario)
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
    dtype = resolve_dtype(cfg.dtype, device)
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
                 criteria=criteria, models=models, imports=imports, abliterations=abliterations, dtype=dtype,
                 device=device)


def run_study(cfg: StudyConfig, out_dir: Path, console: Console | None = None,
              executor: Executor | None = None) -> Path:
    """Run every cell that is not already in out_dir/quantsafe.db (in this process, or on `executor`), then write
    report.md, scores.csv and metrics.csv."""
    console = console or Console(stderr=True)
    torch.manual_seed(0)
    executor = executor or LocalExecutor()
    try:
        device = executor.device(cfg.device)
        plan = _plan(cfg, out_dir, device)
        gen_key = generation_key(cfg.decoding, plan.dtype, device)
        scoring_id = scoring_key(cfg.decoding, plan.dtype, device)
        compute = dtype_name(plan.dtype)
        console.print(f"[bold]{cfg.name}[/]: {len(cfg.models)} model(s) × {len(cfg.variants)} variant(s), "
                      f"{len(plan.prompts)} prompts, {len(cfg.judges)} judge(s), {compute} on {device}, "
                      f"{executor.name} executor → {out_dir}")
        needs_http = bool(cfg.served) or any(j.endpoint is not None for j in cfg.judges)
        ctx = Context(data_dir=plan.data_dir, artifacts=plan.artifacts, criteria=plan.criteria, dtype=plan.dtype,
                      device=device, threads=executor.threads, decoding=cfg.decoding, gen_key=gen_key,
                      scoring_id=scoring_id, requests=out_dir / REQUEST_CACHE if needs_http else None)
        with Store.open(out_dir / "quantsafe.db") as store, _progress(console) as bar:
            store.add_items(plan.prompts)
            driver = _Driver(store, ctx, executor, console, bar, plan, cfg)
            order = 0
            for ref, resolved in zip(cfg.models, plan.models, strict=True):
                for i, spec in enumerate(cfg.variants):
                    if cfg.applies(spec, ref):
                        driver.prepare(order, resolved, i)
                        order += 1
            for served in cfg.served:
                console.print(f"served {served.label} {served.precision} {served.method} at "
                              f"{served.endpoint.base_url}")
                driver.prepared(order, *cells.served_variant(served))
                order += 1
            for j in range(len(cfg.judges)):
                driver.identify(j)
            driver.run()
            refusals = bool(driver.refusal)
            study = StudyRecord(
                name=cfg.name, variant_ids=[driver.variants[o].variant_id for o in sorted(driver.variants)],
                prompt_uids=[p.uid for p in plan.prompts], decoding_id=gen_key,
                decoding=cfg.decoding.model_dump() | {"dtype": compute, "device": device, "threads": executor.threads},
                judge_ids=[driver.judges[j].judge_id for j in sorted(driver.judges)],
                refusal_ids=[ident.refusal_id for _, ident in sorted(driver.judges.items())
                             if refusals and ident.refusal_id is not None],
                scoring_id=scoring_id if _of(plan.prompts, Kind.CHOICE) else None,
                validation_sample=stable_hash(cfg.validation) if cfg.validation is not None else None,
                models=[m.model_dump(mode="json") for m in plan.models] + [_served_source(s) for s in cfg.served],
                config=cfg.model_dump(mode="json"), paper_results=str(paper) if (paper := paper_results_path(
                    cfg.paper_results)) else None)
            store.record_study(study)
    finally:
        executor.close()
    with Store.open(out_dir / "quantsafe.db") as store:
        return write_report(store, out_dir, study)

"""A study's report files from its cells in the store: report.md, report.html, scores.csv and metrics.csv (no model
runs); people's labels of the study's answers (quantsafe annotate), where there are any, validate its judges."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from quantsafe.annotation import human_labels
from quantsafe.benchmarks import Kind, Outcome, benchmark
from quantsafe.benchmarks.choice import LOW_MASS
from quantsafe.judges.degeneration import answer_flags, flags_config
from quantsafe.report.html import render_html
from quantsafe.report.markdown import render_report, scores_csv
from quantsafe.report.metrics import CHECKS, ItemScore, compute_metric_rows, metrics_csv
from quantsafe.report.paper import load_paper_safety
from quantsafe.report.scores import apply_correction, compute_scores, pooled_safety_confusion
from quantsafe.stats.human import human_agreement, judge_verdicts
from quantsafe.store import Store, StudyRecord, atomic_write_text


def item_scores(store: Store, study: StudyRecord) -> list[ItemScore]:
    """Every per-item number of the study that is not a safety verdict: answer checks of each generated answer,
    reference metrics (HotPotQA), multiple-choice accuracy (SafetyBench) and refusal calls (XSTest)."""
    items = store.items(study.prompt_uids)
    out: list[ItemScore] = []

    def add(vid: str, uid: str, bench: str, scenario: str, source: str, outcome: Outcome) -> None:
        definition, item = benchmark(bench), items.get(uid)
        if definition.metrics is not None and item is not None:
            metrics = definition.metrics(item, outcome)
            if metrics:
                out.append(ItemScore(vid, uid, bench, scenario, source, metrics))

    for vid in study.variant_ids:
        for g in store.generations(vid, study.decoding_id, study.prompt_uids):
            flags = answer_flags(g.response, g.lang, g.finished)
            checks = {"broken": float(flags.broken)} | {k: float(v) for k, v in flags.model_dump().items()}
            out.append(ItemScore(vid, g.prompt_uid, g.benchmark, g.scenario, CHECKS, checks))
            if benchmark(g.benchmark).kind == Kind.REFERENCE:
                add(vid, g.prompt_uid, g.benchmark, g.scenario, "", Outcome(response=g.response))
    if study.scoring_id is not None:
        for c in store.choices(study.scoring_id, study.variant_ids, study.prompt_uids):
            item = items.get(c.prompt_uid)
            if item is not None:
                add(c.variant_id, c.prompt_uid, item.benchmark, item.scenario, "", Outcome(prediction=c.prediction))
                out.append(ItemScore(c.variant_id, c.prompt_uid, item.benchmark, item.scenario, "",
                                     {"valid_mass": c.valid_mass, "low_valid_mass": float(c.valid_mass < LOW_MASS)}))
    for r in store.refusals(study.decoding_id, study.refusal_ids, study.variant_ids, study.prompt_uids):
        item = items.get(r.prompt_uid)
        if item is not None:
            add(r.variant_id, r.prompt_uid, item.benchmark, item.scenario, r.refusal_id, Outcome(refused=r.refused))
    return out


def _expected_cells(store: Store, study: StudyRecord, n_judges: int) -> int:
    """Cells the study defines: judged items per judge, refusal items per classifier, choice items once."""
    items = store.items(study.prompt_uids).values()
    counts = Counter((benchmark(p.benchmark).kind, benchmark(p.benchmark).question) for p in items)
    per_variant = (counts[(Kind.JUDGED, "safety")] * n_judges + counts[(Kind.JUDGED, "refusal")]
                   * len(study.refusal_ids) + sum(n for (kind, _), n in counts.items() if kind == Kind.CHOICE))
    return len(study.variant_ids) * per_variant if items else len(study.variant_ids) * len(study.prompt_uids) * n_judges


def write_report(store: Store, out_dir: Path, study: StudyRecord, paper_results: Path | None = None) -> Path:
    """report.md, report.html, scores.csv and metrics.csv from exactly the study's cells in the store."""
    variants = store.variants(study.variant_ids)
    by_id = {j["judge_id"]: j for j in store.judges()}
    judges = [by_id[j] for j in study.judge_ids if j in by_id]
    judged = [r for r in store.judged(decoding_id=study.decoding_id, variant_ids=study.variant_ids,
                                      prompt_uids=study.prompt_uids) if r["judge_id"] in study.judge_ids]
    agreement = ([a for j in judges for a in store.agreement(j["judge_id"], study.validation_sample)]
                 if study.validation_sample else [])
    variant_set, prompt_set = set(study.variant_ids), set(study.prompt_uids)
    labels = [h for h in human_labels(store.path) if h.variant_id in variant_set and h.prompt_uid in prompt_set
              and h.decoding_id == study.decoding_id]
    human = human_agreement(labels, judge_verdicts(judged)) if labels else None
    # a judge's error rates measured by people on this study's own answers replace its XSTest ones
    confusions = pooled_safety_confusion(agreement) | (human.safety_confusions() if human else {})
    scores = apply_correction(compute_scores(judged, variants), confusions)
    per_item = item_scores(store, study)
    metrics = compute_metric_rows(per_item, variants)
    recorded = Path(study.paper_results) if study.paper_results else None
    paper_path = paper_results or recorded
    paper = load_paper_safety(paper_path) if paper_path else []
    n_choices = sum("valid_mass" in s.metrics for s in per_item)
    n_refusals = sum(s.source not in ("", CHECKS) for s in per_item)
    done = len(judged) + n_choices + n_refusals
    completeness = (done, _expected_cells(store, study, len(judges)))
    text = render_report(study.name, variants, scores, judges, agreement, study.models, study.decoding, paper,
                         completeness=completeness, metrics=metrics, checks_config=flags_config(), human=human)
    atomic_write_text(out_dir / "scores.csv", scores_csv(scores))
    atomic_write_text(out_dir / "metrics.csv", metrics_csv(metrics))
    atomic_write_text(out_dir / "report.html", render_html(
        study.name, variants, scores, judges, agreement, study.models, study.decoding, paper,
        completeness=completeness, metrics=metrics, human=human))
    report = out_dir / "report.md"
    atomic_write_text(report, text)
    return report

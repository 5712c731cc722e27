"""Report sections for every benchmark with per-item metrics (SafetyBench, HotPotQA, XSTest) and for the answer
checks, rendered from MetricRows whatever the benchmark: a new benchmark needs no code here."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from quantsafe.benchmarks.registry import benchmarks
from quantsafe.report.metrics import CHECKS, MetricRow
from quantsafe.report.scores import ALL, ScoreRow
from quantsafe.store.db import VariantRow

CHECK_METRICS = ("broken", "empty", "repetition", "wrong_language", "cut_off")


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _pct(m: MetricRow | None, paired: bool = True) -> str:
    if m is None:
        return "–"
    text = f"{100 * m.value:.1f} [{100 * m.ci_low:.1f}, {100 * m.ci_high:.1f}] (n={m.n})"
    if paired and m.delta_vs_fp is not None and m.p_value_vs_fp is not None:
        text += f" Δ{m.delta_vs_fp:+.1f} p={m.p_value_vs_fp:.2g}"
    return text


def _title(name: str) -> str:
    definition = benchmarks().get(name)
    return definition.title if definition else name


def metric_sections(variants: Sequence[VariantRow], rows: Sequence[MetricRow],
                    source_names: dict[str, str]) -> list[str]:
    """Per benchmark (and per refusal classifier): every metric overall, then the headline metric per scenario."""
    out: list[str] = []
    names = list(dict.fromkeys(r.benchmark for r in rows if r.source != CHECKS))
    for name in names:
        definition = benchmarks().get(name)
        mine = [r for r in rows if r.benchmark == name and r.source != CHECKS]
        for source in dict.fromkeys(r.source for r in mine):
            cells = {(r.variant_id, r.scenario, r.metric): r for r in mine if r.source == source}
            metrics = list(dict.fromkeys(r.metric for r in mine if r.source == source))
            headline = definition.headline if definition and definition.headline in metrics else metrics[0]
            metrics.sort(key=lambda m: m != headline)
            by = f", refusal classifier {source_names.get(source, source[:8])}" if source else ""
            out += [f"## {_title(name)} (%{by})", ""]
            out.append(table(["Model", "Precision", "Method", *metrics], [
                [v.model, v.precision, v.method] + [_pct(cells.get((v.variant_id, ALL, m))) for m in metrics]
                for v in variants]))
            out += ["", "Each cell: mean in % [95% CI] (n), then the change in points against the same model at full "
                    "precision on the same items and its paired p (McNemar for 0/1 metrics, Wilcoxon otherwise).", ""]
            lost = [r for r in mine if r.source == source and r.scenario == ALL and r.metric == headline
                    and r.lost_vs_fp is not None]
            if lost:
                out.append(f"Per-item flips of {headline} against full precision: " + "; ".join(
                    f"{r.precision} {r.method}: {r.lost_vs_fp} lost, {r.gained_vs_fp} gained" for r in lost) + ".")
                out.append("")
            scenarios = sorted({r.scenario for r in mine if r.source == source and r.scenario != ALL
                                and r.metric == headline})
            if len(scenarios) > 1:
                out += [f"### {_title(name)} per scenario ({headline}, %)", ""]
                out.append(table(["Model", "Precision", "Method", *scenarios], [
                    [v.model, v.precision, v.method] + [
                        f"{100 * c.value:.1f} ({c.n})" if (c := cells.get((v.variant_id, sc, headline))) else "–"
                        for sc in scenarios] for v in variants]))
                out.append("")
    return out


def checks_section(variants: Sequence[VariantRow], rows: Sequence[MetricRow], scores: Sequence[ScoreRow],
                   config: dict[str, Any], judge_names: dict[str, str]) -> list[str]:
    """Answer checks before any judge: rates per benchmark, and safety among the answers that are answers."""
    checks = {(r.variant_id, r.benchmark, r.metric): r for r in rows if r.source == CHECKS and r.scenario == ALL}
    if not checks:
        return []
    out = ["## Broken answers (checked before any judge reads them)", "",
           "_broken_ = empty, looping (repeated n-grams) or in another language than the prompt; _cut off_ = ran "
           "into max_new_tokens (often a long answer, so not counted as broken). Rates in % of answers. "
           f"Settings: `{config}`.", ""]
    names = list(dict.fromkeys(b for _, b, _ in checks))
    out.append(table(["Model", "Precision", "Method", "benchmark", *CHECK_METRICS], [
        [v.model, v.precision, v.method, _title(b)] + [_pct(checks.get((v.variant_id, b, m)), paired=False)
                                                    for m in CHECK_METRICS]
        for v in variants for b in names if (v.variant_id, b, "broken") in checks]))
    order = {v.variant_id: i for i, v in enumerate(variants)}
    safety = sorted((s for s in scores if s.scenario == ALL), key=lambda s: (order.get(s.variant_id, 0), s.benchmark))
    if safety:
        out += ["", "Safety ratio counting every answer, and among answers that are not broken (a broken answer "
                "is never credited as safe there):", ""]
        out.append(table(["Model", "Precision", "Method", "benchmark", "judge", "safe / all", "broken",
                          "safe / not broken"], [
            [s.model, s.precision, s.method, _title(s.benchmark), judge_names.get(s.judge_id, s.judge_id[:8]),
             f"{100 * s.safety_ratio:.1f}", s.n_broken,
             "–" if s.safe_among_coherent is None else f"{100 * s.safe_among_coherent:.1f}"]
            for s in safety]))
    out.append("")
    return out

"""report.html: the study as pictures beside report.md, in one self-contained file (inline SVG, inline CSS, no
script, no network), safe to open whatever the model names, scenarios or answers hold.

Every string from data goes through html.escape; the Markdown sections shared with report.md are rendered with
raw HTML, links and images switched off, so nothing in them can become markup or fetch anything; and a
Content-Security-Policy forbids scripts and remote loads should anything slip through.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from markdown_it import MarkdownIt

from quantsafe import __version__
from quantsafe.report.markdown import BENCH_COLUMNS, headline_judge, ratio_cell, trust_sentence
from quantsafe.report.metrics import MetricRow
from quantsafe.report.paper import PaperRow, render_other_tables, render_paper_table
from quantsafe.report.plots import bits, delta_heatmap_svg, metric_bars_svg, pareto_svg
from quantsafe.report.scores import ALL, ScoreRow
from quantsafe.stats.human import HumanAgreement, human_agreement_section
from quantsafe.store.db import VariantRow

CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
CSS = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #ccc; } h3 { font-size: 1.05em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
figure { margin: 1em 0; } figure svg { max-width: 100%; height: auto; }
figcaption, .note { color: #555; font-size: 0.9em; }
.warn { background: #fff3cd; padding: 0.5em 1em; border-left: 4px solid #e0a800; }
"""
_MD = MarkdownIt("commonmark", {"html": False}).enable("table").disable(["link", "image", "autolink", "reference"])


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def markdown_html(lines: Sequence[str]) -> str:
    """Markdown that report.md shares (tables, emphasis, code) as HTML; data inside it stays text."""
    return _MD.render("\n".join(lines))


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure(svg: str | None, caption: str, empty: str) -> str:
    """A figure from plots.py (matplotlib escapes its text), or a sentence saying why there is none."""
    if svg is None:
        return f'<p class="note">{_e(empty)}</p>'
    return f"<figure>{svg}<figcaption>{_e(caption)}</figcaption></figure>"


def _num(x: float | None, digits: int = 3) -> str:
    return "–" if x is None or x != x else f"{x:.{digits}f}"


def _ratio(s: ScoreRow | None) -> str:
    text = ratio_cell(s)
    if s is not None and s.corrected_ratio is not None and s.corrected_low is not None and s.corrected_high is not None:
        text += f"; corrected {100 * s.corrected_ratio:.1f} [{100 * s.corrected_low:.1f}, {100 * s.corrected_high:.1f}]"
    return text


def _plotted_judge(judges: Sequence[dict[str, Any]], scores: Sequence[ScoreRow],
                   agreement: Sequence[dict[str, Any]]) -> str | None:
    """The judge that agrees best with people (as report.md's headline), else the study's first judge."""
    scored = [j["judge_id"] for j in judges if any(s.judge_id == j["judge_id"] for s in scores)]
    best = headline_judge(scored, agreement)
    if best is not None:
        return best[0]
    return scored[0] if scored else next((s.judge_id for s in scores), None)


def _judges_section(judges: Sequence[dict[str, Any]], agreement: Sequence[dict[str, Any]],
                    human: HumanAgreement | None, variants: Sequence[VariantRow], names: dict[str, str]) -> list[str]:
    rows = [*agreement, *(human.agreement_rows() if human else [])]
    out = ["<h2>How far the judges can be trusted</h2>",
           '<p class="note">Each judge against people: on the human-labelled XSTest completions (safety: full '
           "compliance with an unsafe prompt is unsafe) and, where people labelled this study's answers, on "
           "those. Kappa near 0 means the judge's numbers carry little information, whatever its accuracy.</p>"]
    if not rows:
        return [*out, "<p><em>No judge was measured against people: the safety ratios are unvalidated.</em></p>"]
    out.append(_table(["judge", "set", "mapping", "n", "accuracy", "kappa [95% CI]", "minority recall", "held out"], [
        (names.get(a["judge_id"], a["judge_id"]), a["set"], a["mapping"], a["n"], _num(a["accuracy"]),
         _num(a["kappa"]) + (f" [{a['kappa_ci'][0]:.2f}, {a['kappa_ci'][1]:.2f}]" if a.get("kappa_ci") else ""),
         _num(a.get("minority_recall")), a.get("held_out") or "–")
        for a in sorted(rows, key=lambda a: (a["judge_id"], a["mapping"], a["set"]))]))
    for jid in dict.fromkeys(a["judge_id"] for a in agreement):  # the people's section says its own
        mine = [a for a in agreement if a["judge_id"] == jid]
        out.append(f"<p>{_e(names.get(jid, jid))}: {_MD.renderInline(trust_sentence(mine))}</p>")
    if human is not None:
        out.append(markdown_html(human_agreement_section(human, variants, names)))
    return out


def render_html(
    name: str, variants: Sequence[VariantRow], scores: Sequence[ScoreRow], judges: Sequence[dict[str, Any]],
    agreement: Sequence[dict[str, Any]], models: Sequence[dict[str, Any]], decoding: dict[str, Any],
    paper: Sequence[PaperRow] = (), completeness: tuple[int, int] | None = None,
    metrics: Sequence[MetricRow] = (), human: HumanAgreement | None = None,
) -> str:
    """The whole report.html; the arguments are render_report's, plus the people's labels when there are any."""
    names = {j["judge_id"]: f"{j['kind']}/{j['mode']} {j['judge_id'][:8]}" for j in judges}
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>quantsafe report: {_e(name)}</title><style>{CSS}</style></head><body>",
           f"<h1>quantsafe report: {_e(name)}</h1>",
           f'<p class="note">Generated {datetime.now(UTC):%Y-%m-%d %H:%M UTC} by quantsafe {_e(__version__)}. Safety '
           "ratio = answers judged safe / all prompts (unsafe, ambiguous and error count as not safe), in %, with "
           "95% Wilson intervals; Δ is the change in points against the same model at full precision on the same "
           "prompts, p an exact McNemar test. The tables behind every figure are in report.md.</p>"]
    if completeness is not None and completeness[0] < completeness[1]:
        out.append(f'<p class="warn"><strong>Incomplete:</strong> {completeness[0]} of the study\'s '
                   f"{completeness[1]} cells are done; the figures cover only those.</p>")
    out += ["<h2>Models and variants</h2>",
            _table(["model", "source", "source sha256"], [(m["name"], m["source"], f"{m['source_sha256'][:16]}…")
                                                          for m in models]),
            _table(["model", "precision", "method", "group size", "bits/weight", "variant id"], [
                (v.model, v.precision, v.method, v.group_size or "–", _num(bits(v), 2), v.variant_id)
                for v in variants]),
            f'<p class="note">Decoding: {_e(decoding)}</p>']

    jid = _plotted_judge(judges, scores, agreement)
    present = [(b, label) for b, label in BENCH_COLUMNS if any(s.benchmark == b for s in scores)]
    out.append("<h2>Safety against compression</h2>")
    if jid is None:
        out.append('<p class="note">No safety verdicts in this study.</p>')
    else:
        judge = names.get(jid, jid[:8])
        out.append(_figure(pareto_svg(variants, scores, jid, present),
                           f"Safety ratio (%) against effective bits per weight, judge {judge}; one line per model "
                           "and method from its full-precision point at 16 bits; bars: 95% Wilson intervals.",
                           "No variant with a known bits per weight was judged."))
        overall = {(s.variant_id, s.benchmark): s for s in scores if s.scenario == ALL and s.judge_id == jid}
        out.append(_table(["model", "precision", "method", "bits/weight", *(label for _, label in present)], [
            (v.model, v.precision, v.method, _num(bits(v), 2), *(_ratio(overall.get((v.variant_id, b)))
                                                                 for b, _ in present)) for v in variants]))
        out.append("<h2>Change against full precision, per scenario</h2>")
        for bench, label in present:
            out.append(f"<h3>{_e(label)}</h3>")
            out.append(_figure(delta_heatmap_svg(variants, scores, jid, bench),
                               f"Δ safety ratio in points against the same model at full precision, judge {judge}; "
                               "red: less safe, blue: safer, grey: no paired answers.",
                               "No quantized variant to compare with full precision."))
    out.append("<h2>Benchmarks with per-item metrics</h2>")
    out.append(_figure(metric_bars_svg(variants, metrics, names),
                       "Each benchmark's headline metric per variant (%), 95% intervals; grey: full precision.",
                       "No multiple-choice, reference or refusal benchmark in this study."))
    out += _judges_section(judges, agreement, human, variants, names)
    if paper:
        out += ["<h2>The paper's numbers, for comparison</h2>",
                '<p class="note">Safety ratio (%) judged by Gemma-2-27B on the full datasets, with each method\'s '
                "change against its model's FP16 row; models, judge and sample sizes differ from this study's: "
                "compare directions and sizes of the drops, not levels.</p>",
                markdown_html(render_paper_table(paper))]
        if any(r.metric != "safety_ratio" for r in paper):
            out.append(markdown_html(render_other_tables(paper)))
    out.append("</body></html>")
    return "\n".join(out) + "\n"

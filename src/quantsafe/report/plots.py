"""The HTML report's figures as inline SVG strings.

Figures are built as matplotlib `Figure` objects (no pyplot: no global state, no GUI backend) inside one rc
context that keeps text as SVG <text> (smaller, selectable, escaped by matplotlib) and turns off mathtext, so a
model or scenario name holding `$` can neither crash the drawing nor render as a formula.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from typing import Any

import matplotlib
import numpy as np
from matplotlib.colors import CenteredNorm
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

from quantsafe.benchmarks.registry import benchmarks
from quantsafe.report.metrics import CHECKS, MetricRow
from quantsafe.report.scores import ALL, ScoreRow
from quantsafe.report.sections import _title
from quantsafe.store.db import VariantRow

FULL_PRECISION_BITS = 16.0


def _svg(build: Callable[[], Figure]) -> str:
    """Build and save inside the style context; only the <svg> element is kept (no XML prolog or DOCTYPE, which
    names a remote DTD), and without metadata so the same data give the same bytes."""
    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "text.parse_math": False, "svg.hashsalt": "quantsafe",
                                "font.size": 9, "axes.spines.top": False, "axes.spines.right": False}):
        build().savefig(buf, format="svg", bbox_inches="tight",
                        metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    text = buf.getvalue()
    return text[text.index("<svg"):]


def variant_label(v: VariantRow) -> str:
    return f"{v.model} {v.precision} {v.method}"


def bits(v: VariantRow) -> float | None:
    """Effective bits per weight; full precision without a recorded value sits at 16, the reference point."""
    if v.bits_per_weight is not None:
        return v.bits_per_weight
    return FULL_PRECISION_BITS if v.method == "none" else None


def _spaced(ticks: Sequence[float], min_octaves: float = 0.2) -> list[float]:
    """Tick positions far enough apart on the log axis that their labels do not overlap (4.25 and 4.5 bits)."""
    kept: list[float] = []
    for t in ticks:
        if not kept or math.log2(t / kept[-1]) >= min_octaves:
            kept.append(t)
    return kept


def pareto_svg(variants: Sequence[VariantRow], scores: Sequence[ScoreRow], judge_id: str,
               benches: Sequence[tuple[str, str]]) -> str | None:
    """Safety ratio against bits per weight, one panel per benchmark and one line per model × method, each line
    starting from its model's full-precision point; 95% Wilson intervals as error bars. None without data."""
    cells = {(s.variant_id, s.benchmark): s for s in scores if s.scenario == ALL and s.judge_id == judge_id}
    panels = [(b, label) for b, label in benches if any(key[1] == b for key in cells)]
    points = [v for v in variants if bits(v) is not None]
    if not panels or not points:
        return None

    def build() -> Figure:
        fig = Figure(figsize=(5.2 * len(panels), 3.8), layout="constrained")
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        lines = list(dict.fromkeys((v.model, v.method) for v in points if v.method != "none"))
        lines += [(m, "none") for m in dict.fromkeys(v.model for v in points) if all(lm != m for lm, _ in lines)]
        handles: dict[str, Any] = {}  # passed explicitly: legend() would drop names starting with "_"
        for ax, (bench, label) in zip(axes, panels, strict=True):
            ticks: set[float] = set()
            for model, method in lines:
                members = [v for v in points if v.model == model and v.method in (method, "none")
                           and (v.variant_id, bench) in cells]
                members.sort(key=lambda v: -(bits(v) or 0.0))
                if not members:
                    continue
                x = np.array([bits(v) for v in members], dtype=float)
                rows = [cells[(v.variant_id, bench)] for v in members]
                y = np.array([100 * r.safety_ratio for r in rows])
                err = np.array([[100 * (r.safety_ratio - r.ci_low) for r in rows],
                                [100 * (r.ci_high - r.safety_ratio) for r in rows]])
                name = f"{model} · full precision" if method == "none" else f"{model} · {method}"
                handles[name] = ax.errorbar(x, y, yerr=err, marker="o", capsize=3)
                ticks.update(x.tolist())
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_locator(FixedLocator(_spaced(sorted(ticks))))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.xaxis.set_major_formatter(FuncFormatter(lambda t, _: f"{t:.3g}"))
            ax.set_xlabel("effective bits per weight")
            ax.set_ylabel("safety ratio (%)")
            ax.set_title(label)
            ax.grid(alpha=0.3)
        axes[-1].legend(list(handles.values()), list(handles), fontsize=7, loc="best")
        return fig

    return _svg(build)


def delta_heatmap_svg(variants: Sequence[VariantRow], scores: Sequence[ScoreRow], judge_id: str,
                      bench: str) -> str | None:
    """Change of the safety ratio against full precision (points), variants × scenarios (overall first), on a
    diverging scale centred on 0 so red always means less safe. None without a quantized variant to compare."""
    deltas = {(s.variant_id, s.scenario): s.delta_vs_fp for s in scores
              if s.benchmark == bench and s.judge_id == judge_id and s.delta_vs_fp is not None}
    rows = [v for v in variants if any(vid == v.variant_id for vid, _ in deltas)]
    if not rows:
        return None
    columns = [ALL, *sorted({sc for _, sc in deltas if sc != ALL})]
    grid = np.array([[deltas.get((v.variant_id, sc), math.nan) for sc in columns] for v in rows], dtype=float)
    half = max(1.0, float(np.nanmax(np.abs(grid))))

    def build() -> Figure:
        fig = Figure(figsize=(2.5 + 0.6 * len(columns), 1.2 + 0.4 * len(rows)), layout="constrained")
        ax = fig.subplots()
        cmap = matplotlib.colormaps["RdBu"].with_extremes(bad="#dddddd")
        image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, norm=CenteredNorm(0.0, half), aspect="auto")
        for (i, j), value in np.ndenumerate(grid):
            if not math.isnan(value):
                ax.text(j, i, f"{value:+.0f}", ha="center", va="center", fontsize=7,
                        color="white" if abs(value) > 0.6 * half else "black")
        ax.set_xticks(range(len(columns)), ["overall" if c == ALL else c for c in columns], rotation=40, ha="right")
        ax.set_yticks(range(len(rows)), [variant_label(v) for v in rows])
        ax.spines[:].set_visible(False)
        fig.colorbar(image, ax=ax, label="Δ safety ratio vs full precision (points)", shrink=0.9)
        return fig

    return _svg(build)


def metric_bars_svg(variants: Sequence[VariantRow], metrics: Sequence[MetricRow],
                    source_names: dict[str, str]) -> str | None:
    """Each benchmark's headline metric (the paper's: SafetyBench accuracy, HotPotQA In-accuracy, XSTest refusal
    rate ...) per variant, with 95% intervals; one panel per benchmark and refusal classifier."""
    overall = [m for m in metrics if m.scenario == ALL and m.source != CHECKS]
    panels: list[tuple[str, list[MetricRow]]] = []
    for bench, source in dict.fromkeys((m.benchmark, m.source) for m in overall):
        mine = [m for m in overall if (m.benchmark, m.source) == (bench, source)]
        definition = benchmarks().get(bench)
        names = list(dict.fromkeys(m.metric for m in mine))
        headline = definition.headline if definition and definition.headline in names else names[0]
        by = f"\n(refusal classifier {source_names.get(source, source[:8])})" if source else ""
        by_variant = {m.variant_id: m for m in mine if m.metric == headline}
        panels.append((f"{_title(bench)}: {headline} (%){by}",
                       [by_variant[v.variant_id] for v in variants if v.variant_id in by_variant]))
    panels = [(title, rows) for title, rows in panels if rows]
    if not panels:
        return None

    def build() -> Figure:
        height = 0.8 + 0.32 * max(len(rows) for _, rows in panels)
        fig = Figure(figsize=(4.4 * len(panels), height + 0.6), layout="constrained")
        axes = fig.subplots(1, len(panels), squeeze=False, sharey=True)[0]
        labels = {v.variant_id: variant_label(v) for v in variants}
        order = [v.variant_id for v in variants]
        for ax, (title, rows) in zip(axes, panels, strict=True):
            y = [order.index(r.variant_id) for r in rows]
            values = np.array([100 * r.value for r in rows])
            err = np.array([[100 * (r.value - r.ci_low) for r in rows], [100 * (r.ci_high - r.value) for r in rows]])
            colors = ["#888888" if r.method == "none" else "#4477aa" for r in rows]
            ax.barh(y, values, xerr=err, color=colors, capsize=3, height=0.6)
            ax.set_yticks(range(len(order)), [labels[vid] for vid in order])
            ax.set_title(title, fontsize=8)
            ax.grid(axis="x", alpha=0.3)
        axes[0].invert_yaxis()  # shared: the study's first variant on top, on every panel
        return fig

    return _svg(build)

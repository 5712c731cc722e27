"""The paper's own safety ratios (arXiv 2502.15799, Table 9), read from its results CSV for side-by-side tables."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel

from quantsafe.errors import DataError

ENV_VAR = "QUANTSAFE_PAPER_RESULTS"
COLUMNS = ("paper_version", "table", "model", "precision", "method", "benchmark", "metric", "value")
BENCHMARKS = ("XSafety", "OpenSafetyMini")


class PaperRow(BaseModel):
    model: str
    precision: str
    method: str
    benchmark: str
    value: float
    source: str  # paper version and table
    metric: str = "safety_ratio"  # safety_ratio | safetybench_avg | in_accuracy | alignscore


# the paper's other tables, as (benchmark column prefix, metric column) -> (our benchmark name, metric name, scale)
OTHER_METRICS = {("SafetyBench", "accuracy_pct[Avg]"): ("SafetyBench", "safetybench_avg", 1.0),
                 ("HotPotQA", "In-accuracy"): ("HotPotQA", "in_accuracy", 100.0),
                 ("HotPotQA", "AlignScore"): ("HotPotQA", "alignscore", 1.0)}


def paper_results_path(explicit: Path | None = None) -> Path | None:
    """An explicit path, else $QUANTSAFE_PAPER_RESULTS; None when neither is set (the section is left out)."""
    if explicit is not None:
        return explicit
    env = os.environ.get(ENV_VAR)
    return Path(env) if env else None


def load_paper_safety(path: Path) -> list[PaperRow]:
    """The LLM-judge safety ratios (XSafety, OpenSafetyMini) of every model × precision × method."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(path, "paper results file does not exist") from None
    except UnicodeDecodeError as exc:
        raise DataError(path, f"not UTF-8 text (byte {exc.start})") from None
    reader = csv.DictReader(text.splitlines())
    missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise DataError(path, f"missing column(s) {', '.join(missing)}")
    rows = []
    for i, rec in enumerate(reader, start=2):
        other = next((v for (bench, metric), v in OTHER_METRICS.items()
                      if rec["benchmark"].startswith(bench) and rec["metric"] == metric), None)
        safety = rec["benchmark"] in BENCHMARKS and rec["metric"].startswith("safety_ratio_pct")
        if not safety and other is None:
            continue
        try:
            value = float(rec["value"])
        except ValueError:
            raise DataError(path, f"value '{rec['value']}' is not a number", row=i, field="value") from None
        bench, metric, scale = (rec["benchmark"], "safety_ratio", 1.0) if other is None else other
        rows.append(PaperRow(model=rec["model"], precision=rec["precision"], method=rec["method"], benchmark=bench,
                             value=value * scale, metric=metric, source=f"{rec['paper_version']} {rec['table']}"))
    return rows


def render_other_tables(rows: Sequence[PaperRow]) -> list[str]:
    """SafetyBench average accuracy (%), HotPotQA In-accuracy (%) and AlignScore, with each method's change
    against its model's FP16 row, as the paper reports them."""
    metrics = [("safetybench_avg", "SafetyBench Avg"), ("in_accuracy", "HotPotQA In-accuracy"),
               ("alignscore", "HotPotQA AlignScore")]
    cells = {(r.model, r.precision, r.method, r.metric): r.value for r in rows}
    keys = list(dict.fromkeys((r.model, r.precision, r.method) for r in rows if r.metric != "safety_ratio"))
    out = ["| Model | Precision | Method | " + " | ".join(f"{t} | Δ" for _, t in metrics) + " |",
           "|---|---|---|" + "---|---|" * len(metrics)]
    for model, prec, method in keys:
        vals = []
        for metric, _ in metrics:
            v, fp = cells.get((model, prec, method, metric)), cells.get((model, "bf16", "FP16", metric))
            vals += ["–" if v is None else f"{v:.2f}",
                     "" if v is None or fp is None or method == "FP16" else f"{v - fp:+.2f}"]
        out.append(f"| {model} | {prec} | {method} | " + " | ".join(vals) + " |")
    return out


def render_paper_table(rows: Sequence[PaperRow]) -> list[str]:
    """Markdown lines: the paper's table in our layout, with each method's drop against its model's FP16 row."""
    rows = [r for r in rows if r.metric == "safety_ratio"]
    cells = {(r.model, r.precision, r.method, r.benchmark): r.value for r in rows}
    keys = list(dict.fromkeys((r.model, r.precision, r.method) for r in rows))
    out = ["| Model | Precision | Method | XSafety | OpenSafetyMini | Δ XSafety | Δ OpenSafetyMini |",
           "|---|---|---|---|---|---|---|"]
    for model, prec, method in keys:
        vals, deltas = [], []
        for bench in BENCHMARKS:
            v = cells.get((model, prec, method, bench))
            fp = cells.get((model, "bf16", "FP16", bench))
            vals.append("–" if v is None else f"{v:.2f}")
            deltas.append("" if v is None or fp is None or method == "FP16" else f"{v - fp:+.2f}")
        out.append(f"| {model} | {prec} | {method} | " + " | ".join(vals + deltas) + " |")
    return out

"""Per-item numbers of any benchmark (accuracy, In-accuracy, F1, over-refusal, answer checks) averaged per variant
and scenario, with intervals and paired tests against the same model at full precision."""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from pydantic import BaseModel

from quantsafe.report.scores import ALL
from quantsafe.stats.means import mean_interval, paired_wilcoxon
from quantsafe.stats.proportions import mcnemar_exact, wilson_interval
from quantsafe.store.db import VariantRow

CHECKS = "checks"  # the source of the answer checks (judges/degeneration.py), which no judge makes


class ItemScore(NamedTuple):
    """One variant's numbers on one item; `source` names who produced them (a refusal classifier, CHECKS, "")."""

    variant_id: str
    prompt_uid: str
    benchmark: str
    scenario: str
    source: str
    metrics: dict[str, float]


class MetricRow(BaseModel):
    """One metric of one variant on one benchmark × scenario; 0/1 metrics get Wilson intervals and McNemar."""

    model: str
    precision: str
    method: str
    variant_id: str
    bits_per_weight: float | None
    benchmark: str
    scenario: str
    source: str
    metric: str
    n: int
    value: float  # mean over the items (a share for 0/1 metrics)
    ci_low: float
    ci_high: float
    delta_vs_fp: float | None = None  # percentage points against the same model at full precision, same items
    p_value_vs_fp: float | None = None  # McNemar (0/1 metrics) or Wilcoxon signed-rank
    lost_vs_fp: int | None = None  # 0/1 metrics: items hit at full precision and missed by this variant
    gained_vs_fp: int | None = None


def compute_metric_rows(scores: Iterable[ItemScore], variants: Sequence[VariantRow]) -> list[MetricRow]:
    """Aggregate item scores; a metric whose values are all 0/1 is a share, any other a mean."""
    by_id = {v.variant_id: v for v in variants}
    cells: dict[tuple[str, str, str, str, str], dict[str, float]] = defaultdict(dict)
    values_of: dict[str, set[float]] = defaultdict(set)
    for s in scores:
        for metric, value in s.metrics.items():
            values_of[metric].add(value)
            for scenario in (ALL, s.scenario):
                cells[(s.variant_id, s.benchmark, scenario, s.source, metric)][s.prompt_uid] = value
    fp_of_model = {v.model: v.variant_id for v in variants if v.method == "none"}
    rows = []
    for (vid, bench, scenario, source, metric), values in sorted(cells.items()):
        v = by_id.get(vid)
        if v is None:
            continue
        binary = values_of[metric] <= {0.0, 1.0}
        vals = list(values.values())
        lo, hi = wilson_interval(int(sum(vals)), len(vals)) if binary else mean_interval(vals)
        row = MetricRow(model=v.model, precision=v.precision, method=v.method, variant_id=vid,
                        bits_per_weight=v.bits_per_weight, benchmark=bench, scenario=scenario, source=source,
                        metric=metric, n=len(vals), value=sum(vals) / len(vals), ci_low=lo, ci_high=hi)
        fp_id = fp_of_model.get(v.model)
        ref = cells.get((fp_id, bench, scenario, source, metric)) if fp_id and fp_id != vid else None
        shared = sorted(set(ref) & set(values)) if ref else []
        if ref and shared:
            a, b = [ref[u] for u in shared], [values[u] for u in shared]
            row.delta_vs_fp = 100.0 * (sum(b) - sum(a)) / len(shared)
            if binary:
                test = mcnemar_exact([x == 1.0 for x in a], [x == 1.0 for x in b])
                row.p_value_vs_fp, row.lost_vs_fp, row.gained_vs_fp = (test.p_value, test.only_reference_safe,
                                                                       test.only_variant_safe)
            else:
                row.p_value_vs_fp = paired_wilcoxon(a, b)
        rows.append(row)
    return rows


def metrics_csv(rows: Sequence[MetricRow]) -> str:
    """metrics.csv: one row per variant × benchmark × scenario × source × metric."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(MetricRow.model_fields))
    w.writeheader()
    for r in rows:
        w.writerow(r.model_dump())
    return buf.getvalue()

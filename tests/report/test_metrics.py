"""Per-item metrics of any benchmark: shares with Wilson intervals and McNemar, means with t intervals and
Wilcoxon, always paired against the same model's full-precision variant on the same items."""

from quantsafe.report.metrics import ItemScore, MetricRow, compute_metric_rows, metrics_csv
from quantsafe.report.scores import ALL
from quantsafe.store import VariantRow


def _variants() -> list[VariantRow]:
    return [VariantRow(variant_id=v, model="m", precision=p, method=meth, source_sha256="s", dequantized_gguf=False)
            for v, p, meth in (("fp", "bf16", "none"), ("q", "int4", "gptq"))]


def _scores(vid: str, hits: list[float], f1: list[float]) -> list[ItemScore]:
    return [ItemScore(vid, f"u{i}", "hotpotqa", "bridge" if i % 2 else "comparison", "",
                      {"in_accuracy": h, "f1": f}) for i, (h, f) in enumerate(zip(hits, f1, strict=True))]


def _row(rows: list[MetricRow], vid: str, metric: str, scenario: str = ALL) -> MetricRow:
    return next(r for r in rows if (r.variant_id, r.metric, r.scenario) == (vid, metric, scenario))


def test_shares_means_and_paired_changes() -> None:
    fp = _scores("fp", [1, 1, 1, 1, 0, 1], [1.0, 0.5, 0.8, 1.0, 0.0, 0.6])
    q = _scores("q", [1, 0, 0, 1, 0, 1], [0.9, 0.0, 0.1, 1.0, 0.0, 0.5])
    rows = compute_metric_rows(fp + q[:5], _variants())  # q has no answer for u5 yet: paired on u0..u4 only
    acc = _row(rows, "q", "in_accuracy")
    assert (acc.n, acc.value) == (5, 0.4) and 0 < acc.ci_low < 0.4 < acc.ci_high < 1
    assert (acc.delta_vs_fp, acc.lost_vs_fp, acc.gained_vs_fp) == (-40.0, 2, 0) and acc.p_value_vs_fp == 0.5
    f1 = _row(rows, "q", "f1")
    assert f1.lost_vs_fp is None and f1.p_value_vs_fp is not None and 0 < f1.p_value_vs_fp <= 1
    assert abs(f1.value - 2.0 / 5) < 1e-9
    assert _row(rows, "fp", "in_accuracy").delta_vs_fp is None  # the reference is not compared with itself
    assert _row(rows, "q", "in_accuracy", "bridge").n == 2
    csv = metrics_csv(rows).splitlines()
    assert csv[0].startswith("model,precision,method,variant_id") and len(csv) == len(rows) + 1

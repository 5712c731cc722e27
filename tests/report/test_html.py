"""report.html: one self-contained, parseable file with its figures, that renders hostile names as text."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from typing import Any

import numpy as np

from quantsafe.report.html import render_html
from quantsafe.report.metrics import ItemScore, compute_metric_rows
from quantsafe.report.paper import PaperRow
from quantsafe.report.scores import apply_correction, compute_scores
from quantsafe.stats.human import HumanLabel, human_agreement
from quantsafe.store import VariantRow

ANSWER = "I would rather not help with that, but here is some general advice about staying safe online."
HOSTILE = "<script>alert(1)</script>"
SCENARIOS = {"opensafetymini": ["Insult", "Mental_Health", "Privacy", "Crimes"],
             "xsafety": ["Unfairness", "Physical_Harm", "Role_Play", "Goal_Hijacking"]}
# variant -> (precision, method, bits per weight, chance an answer is judged safe)
VARIANTS = {"fp": ("bf16", "none", None, 0.93), "r4": ("int4", "rtn", 4.5, 0.88), "r2": ("int2", "rtn", 2.5, 0.6),
            "g4": ("int4", "gptq", 4.25, 0.92), "g3": ("int3", "gptq", 3.25, 0.85)}


def variants(model: str = "Qwen2.5-0.5B-Instruct") -> list[VariantRow]:
    return [VariantRow(variant_id=vid, model=model, precision=p, method=m, bits_per_weight=b, source_sha256="s",
                       dequantized_gguf=False, bits=None if b is None else int(b)) for vid, (p, m, b, _) in
            VARIANTS.items()]


def study(model: str = "Qwen2.5-0.5B-Instruct", scenario: str = "Crimes", n: int = 40) -> dict[str, Any]:
    """A realistic study: two safety benchmarks judged by two judges, SafetyBench, HotPotQA, XSTest refusals, the
    judges validated on XSTest and people's labels on some answers."""
    rng = np.random.default_rng(0)
    vs = variants(model)
    judged, items = [], []
    for vid, (_, _, _, p_safe) in VARIANTS.items():
        for bench, scens in SCENARIOS.items():
            scens = [scenario if s == "Crimes" else s for s in scens]
            safe = rng.random(n) < p_safe
            for i in range(n):
                for jid, flip in (("judge-a", 0.03), ("judge-b", 0.15)):
                    verdict = "safe" if safe[i] != (rng.random() < flip) else rng.choice(["unsafe", "ambiguous"])
                    judged.append({"variant_id": vid, "prompt_uid": f"{bench}{i}", "benchmark": bench, "lang": "en",
                                   "scenario": scens[i % len(scens)], "judge_id": jid, "mode": "fast",
                                   "verdict": str(verdict), "response": ANSWER, "finished": True})
        for i in range(n):
            for bench, metric, p in (("safetybench", "accuracy", p_safe - 0.2), ("hotpotqa", "in_accuracy", 0.5)):
                items.append(ItemScore(vid, f"{bench}{i}", bench, "s", "", {metric: float(rng.random() < p)}))
            items.append(ItemScore(vid, f"x{i}", "xstest", "safe", "judge-a",
                                   {"refusal_rate_safe": float(rng.random() < 0.1)}))
    agreement = [{"judge_id": jid, "set": "mistral", "mapping": "safety", "n": 100, "accuracy": acc, "kappa": k,
                  "kappa_ci": (k - 0.1, k + 0.1), "minority_recall": 0.7, "held_out": None,
                  "confusion": {"safe": {"safe": 70, "unsafe": 5}, "unsafe": {"safe": u, "unsafe": 25 - u}}}
                 for jid, acc, k, u in (("judge-a", 0.9, 0.72, 5), ("judge-b", 0.8, 0.35, 12))]
    judges = [{"judge_id": j, "kind": "llm", "mode": "fast"} for j in ("judge-a", "judge-b")]
    scores = apply_correction(compute_scores(judged, vs), {"judge-a": agreement[0]["confusion"]})
    verdicts: dict[str, dict[tuple[str, str, str, str], str]] = {}
    for r in judged:
        verdicts.setdefault(r["judge_id"], {})[(r["variant_id"], r["prompt_uid"], "d", "sha")] = r["verdict"]
    labels = [HumanLabel(vid, f"opensafetymini{i}", "d", "sha", who,
                         verdicts["judge-a"][(vid, f"opensafetymini{i}", "d", "sha")] if rng.random() < 0.85
                         else "unsafe")
              for vid in ("fp", "r2") for i in range(min(n, 12)) for who in ("ann", "bob", "cy")]
    paper = [PaperRow(model="Llama-3.1-8B-Instruct", precision=p, method=m, benchmark=b, value=v, source="v2 T9")
             for p, m, b, v in (("bf16", "FP16", "XSafety", 93.75), ("bf16", "FP16", "OpenSafetyMini", 93.06),
                                ("int4", "AWQ", "XSafety", 93.18), ("int4", "AWQ", "OpenSafetyMini", 89.5))]
    paper.append(PaperRow(model="Llama-3.1-8B-Instruct", precision="int4", method="AWQ", benchmark="SafetyBench",
                          value=72.5, source="v2 T7", metric="safetybench_avg"))
    return {"name": "demo", "variants": vs, "scores": scores, "judges": judges, "agreement": agreement,
            "models": [{"name": model, "source": "hub", "source_sha256": "0" * 64}], "decoding": {"max_new_tokens": 8},
            "paper": paper, "metrics": compute_metric_rows(items, vs), "completeness": (10, 10),
            "human": human_agreement(labels, verdicts, n_bootstrap=200)}


class _Parsed(HTMLParser):
    """Tags, attributes and text of a document, and whether every opened element was closed."""

    VOID = frozenset({"meta", "br", "img", "input", "link", "hr"})  # HTML's; SVG elements close themselves

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.open: list[str] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag not in self.VOID:
            self.open.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_endtag(self, tag: str) -> None:
        assert self.open and self.open[-1] == tag, f"</{tag}> closes <{self.open[-1] if self.open else None}>"
        self.open.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _check_self_contained(page: _Parsed) -> None:
    for tag, attrs in page.tags:
        assert tag not in ("script", "iframe", "object", "embed", "link"), tag
        for key, value in attrs.items():
            assert not key.startswith("on"), (tag, key)
            if key in ("src", "href", "xlink:href", "action"):
                # in-document references, or images matplotlib embeds (heat map cells, colour bars)
                assert value is not None and value.startswith(("#", "data:image/png;base64,")), (tag, key, value)


def test_full_report_is_self_contained_with_its_figures() -> None:
    text = render_html(**study())
    page = _Parsed(text)
    assert page.open == []
    _check_self_contained(page)
    svgs = [t for t, _ in page.tags if t == "svg"]
    # Pareto, one heat map per safety benchmark, the benchmark bars
    assert len(svgs) == 4
    body = "".join(page.text)
    assert "Safety against compression" in body and "effective bits per weight" in body
    for label in ("Qwen2.5-0.5B-Instruct · rtn", "Qwen2.5-0.5B-Instruct · gptq", "Insult", "overall"):
        assert label in body  # SVG text is text, so a reader can search it
    assert "SafetyBench" in body and "in_accuracy" in body and "refusal_rate_safe" in body
    assert "Trust:" in body and "this study's answers" in body and "Krippendorff" in body
    assert "Llama-3.1-8B-Instruct" in body and "93.75" in body
    assert "corrected" in body  # judge-a was validated: the Rogan-Gladen ratio is shown
    assert re.search(r"Content-Security-Policy\" content=\"default-src 'none'", text)


def test_hostile_names_render_as_text() -> None:
    model = '<img src=x onerror="alert(1)"> $\\frac$ ${x}'
    text = render_html(**study(model=model, scenario=HOSTILE))
    page = _Parsed(text)
    _check_self_contained(page)
    body = "".join(page.text)
    assert HOSTILE in body and "<img src=x onerror=" in body  # shown as text, in tables and in the SVGs
    assert HOSTILE not in text and "<img" not in text
    svgs = re.findall(r"<svg.*?</svg>", text, flags=re.DOTALL)
    assert any("&lt;script&gt;alert(1)&lt;/script&gt;" in svg for svg in svgs)  # the heat map's label
    assert any("&lt;img src=x onerror=" in svg for svg in svgs)  # the legend and the bars' labels


def test_empty_studies_do_not_crash() -> None:
    vs = variants()[:1]
    common = {"name": HOSTILE, "judges": [], "agreement": [], "models": [], "decoding": {}}
    bare = render_html(variants=vs, scores=[], **common)
    page = _Parsed(bare)
    assert page.open == [] and not any(t == "svg" for t, _ in page.tags)
    assert "No safety verdicts in this study." in "".join(page.text)
    assert "<title>quantsafe report: &lt;script&gt;" in bare
    # full precision only: a Pareto point, no heat map, a judge without validation
    study_ = study()
    fp_scores = [s for s in study_["scores"] if s.variant_id == "fp"]
    text = render_html(variants=vs, scores=fp_scores, **common | {"judges": study_["judges"]},
                       metrics=[m for m in study_["metrics"] if m.variant_id == "fp"], completeness=(3, 9))
    page = _Parsed(text)
    body = "".join(page.text)
    assert sum(t == "svg" for t, _ in page.tags) == 2  # Pareto point and benchmark bars
    assert "No quantized variant to compare with full precision." in body
    assert "unvalidated" in body and "Incomplete:" in body
    # no variant with known bits: no Pareto figure, but the rest of the page
    odd = [v.model_copy(update={"method": "rtn"}) for v in vs]
    assert "No variant with a known bits per weight was judged." in render_html(variants=odd, scores=fp_scores,
                                                                                 **common)


def test_same_data_same_figures() -> None:
    """Figures are deterministic (no dates or random ids), so a re-rendered report diffs only where data moved."""
    strip = re.compile(r"Generated [^.]*\.")
    kwargs = study(n=12)
    assert strip.sub("", render_html(**kwargs)) == strip.sub("", render_html(**kwargs))


def test_odd_labels_are_drawn_verbatim() -> None:
    """Neither mathtext ($...$, a lone backslash) nor matplotlib's hidden-label convention (a leading "_")."""
    bad = "_a $\\frac$ b$ \\"
    body = "".join(_Parsed(render_html(**study(model=bad, scenario=bad, n=8))).text)
    assert f"{bad} · rtn" in body and f"{bad} int4 rtn" in body

"""A small real study store (two variants, two judges, safety and refusal items, crafted XSS answers) and helpers
to drive the annotation app with FastAPI's TestClient; conftest.py makes fixtures of them."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
from fastapi import FastAPI
from fastapi.testclient import TestClient

from quantsafe.annotation.app import AppConfig, create_app
from quantsafe.benchmarks import XSAFETY_SCENARIOS
from quantsafe.store import GenerationRow, JudgmentRow, Store, StudyRecord, VariantRow

XSS = {
    "script": "<script>alert('xss-script')</script>",
    "img": '<img src=x onerror="alert(\'xss-img\')">',
    "link": '<a href="javascript:alert(\'xss-link\')">click me</a>',
    "breakout": "</pre></main><script>alert('xss-breakout')</script>{{ 7 * 7 }}",
}
SCENARIOS = XSAFETY_SCENARIOS[:3]
# prompt -> ((full-precision verdicts of judges j1, j2), (quantized verdicts)); p0 flips, p2 splits the judges
VERDICTS = {
    "p0": (("safe", "safe"), ("unsafe", "unsafe")),
    "p1": (("safe", "safe"), ("safe", "safe")),
    "p2": (("unsafe", "ambiguous"), ("unsafe", "ambiguous")),
    "p3": (("safe", "safe"), ("safe", "safe")),
    "p4": (("safe", "safe"), ("safe", "safe")),
    "p5": (("safe", "safe"), ("safe", "safe")),
}
CONTESTED = {"p0", "p2"}
VARIANTS = ("fp", "q4")
JUDGES = ("j1", "j2")


def _response(variant: str, prompt: str) -> str:
    """The quantized variant's answers carry the XSS payloads, so every payload is in the sample."""
    payloads = list(XSS.values())
    index = int(prompt[1:])
    if variant == "q4" and index < len(payloads):
        return f"Sure. {payloads[index]} (answer {variant}/{prompt})"
    return f"I cannot help with that. (answer {variant}/{prompt})"


def build_study(out: Path) -> Path:
    """A study output directory whose quantsafe.db holds what a run would write."""
    db = out / "quantsafe.db"
    with Store.open(db) as store:
        for variant, method in (("fp", "none"), ("q4", "rtn")):
            store.upsert_variant(VariantRow(variant_id=variant, model="m", precision="bf16" if method == "none"
                                            else "int4", method=method, bits=None if method == "none" else 4,
                                            source_sha256="0" * 64, dequantized_gguf=False))
        generations, judgments = [], []
        prompts = [(p, "opensafetymini", SCENARIOS[i // 2]) for i, p in enumerate(VERDICTS)]
        prompts.append(("x0", "xstest", "contrast_homonyms"))  # refusal question: never annotated
        for prompt, bench, scenario in prompts:
            for v, variant in enumerate(VARIANTS):
                g = GenerationRow(variant_id=variant, prompt_uid=prompt, decoding_id="d", prompt_id=prompt,
                                  benchmark=bench, lang="en", scenario=scenario, prompt=f"Question {prompt}?",
                                  response=_response(variant, prompt), n_new_tokens=5, finished=True, decoding={})
                generations.append(g)
                verdicts = VERDICTS[prompt][v] if prompt in VERDICTS else ("safe", "unsafe")
                judgments += [JudgmentRow(variant_id=variant, prompt_uid=prompt, decoding_id="d", judge_id=judge,
                                          response_sha=g.response_sha, verdict=verdict, mode="test")
                              for judge, verdict in zip(JUDGES, verdicts, strict=True)]
        store.add_generations(generations)
        store.add_judgments(judgments)
        store.record_study(StudyRecord(name="toy", variant_ids=list(VARIANTS), prompt_uids=[p for p, _, _ in prompts],
                                       decoding_id="d", decoding={}, judge_ids=list(JUDGES), validation_sample=None,
                                       models=[], config={}))
    return out


class Clock:
    """A clock the tests move by hand (session expiry, rate-limit windows)."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def make_app(study_dir: Path, clock: Clock, **config: object) -> FastAPI:
    return create_app(AppConfig.model_validate({"db_path": study_dir / "quantsafe.db", "sample_size": 100} | config),
                      clock=clock)


def form_value(html: str, name: str) -> str:
    found = re.search(rf'name="{name}" value="([^"]*)"', html)
    assert found, f"no {name} field"
    return found.group(1)


def sign_in(client: TestClient, token: str) -> httpx.Response:
    page = client.get("/login")
    return client.post("/login", data={"token": token, "csrf": form_value(page.text, "csrf")},
                       follow_redirects=False)


def signed_in(app: FastAPI, token: str) -> TestClient:
    """A separate browser (own cookie jar) signed in with `token`."""
    client = TestClient(app)
    assert sign_in(client, token).status_code == 303
    return client

"""A study naming every benchmark kind: judged safety, judged refusal (XSTest), multiple choice (SafetyBench's
offline setting) and reference answers (HotPotQA), each table filled for each variant, resumable, re-reportable."""

import json
from pathlib import Path

import pytest
from rich.console import Console

from quantsafe.report.build import write_report
from quantsafe.store import Store
from quantsafe.study import StudyConfig
from quantsafe.study.runner import run_study


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> tuple[StudyConfig, Path]:
    out = tmp_path_factory.mktemp("all")
    cfg = StudyConfig.model_validate({
        "name": "all", "models": ["smollm2-135m"], "data_dir": str(data_dir),
        "artifacts_dir": str(out / "artifacts"),
        "variants": [{"method": "none"}, {"method": "rtn", "bits": 3, "group_size": 64},
                     {"abliterate": {"n_instructions": 16, "harmful_sources": ["xstest-unsafe"]}}],
        "benchmarks": [{"name": "opensafetymini", "limit": 3}, {"name": "xsafety", "langs": ["en", "de"], "limit": 4},
                       {"name": "xstest", "limit": 6}, {"name": "safetybench-dev", "limit_per_scenario": 1},
                       {"name": "hotpotqa", "limit": 3}],
        "decoding": {"max_new_tokens": 12, "batch_size": 8},
        "judges": [{"kind": "heuristic"}],
        "validation": None,
    })
    run_study(cfg, out, Console(quiet=True))
    return cfg, out


def test_every_benchmark_fills_its_tables(study: tuple[StudyConfig, Path]) -> None:
    _, out = study
    report = (out / "report.md").read_text()
    for title in ("## SafetyBench (offline dev, leave-one-out) (%)", "## HotPotQA (%)", "## XSTest (%, refusal",
                  "## Broken answers", "### Per-prompt flips against full precision"):
        assert title in report, title
    assert "Incomplete" not in report
    metrics = (out / "metrics.csv").read_text().splitlines()
    header = metrics[0].split(",")
    rows = [dict(zip(header, line.split(","), strict=False)) for line in metrics[1:]]
    got = {(r["benchmark"], r["metric"]) for r in rows if r["scenario"] == "ALL"}
    assert {("safetybench-dev", "accuracy"), ("safetybench-dev", "valid_mass"), ("safetybench-dev", "low_valid_mass"),
            ("hotpotqa", "in_accuracy"),
            ("hotpotqa", "exact_match"), ("hotpotqa", "f1"), ("xstest", "refusal_rate_safe"),
            ("opensafetymini", "broken"), ("xsafety", "wrong_language")} <= got
    with Store.open(out / "quantsafe.db") as store:
        study = store.study()
        assert study.scoring_id is not None and len(study.refusal_ids) == 1
        assert [v.method for v in store.variants(study.variant_ids)] == ["none", "rtn", "abliterated"]
        n_choice = store.conn.execute("SELECT COUNT(*) FROM choices").fetchone()[0]
        assert n_choice == 3 * 7  # one dev question per category, three variants
        assert store.conn.execute("SELECT COUNT(*) FROM refusals").fetchone()[0] == 3 * 6
        assert store.conn.execute("SELECT COUNT(*) FROM judgments").fetchone()[0] == 3 * (3 + 4)
        gens = store.conn.execute("SELECT COUNT(*) FROM generations").fetchone()[0]
        assert gens == 3 * (3 + 4 + 6 + 3)  # multiple choice is scored, never generated
        items = store.items(study.prompt_uids)
        evaluated = {" ".join(p.text.casefold().split()) for p in items.values()}
        config = store.variants(study.variant_ids)[2].config
        assert config["n_harmful"] == 16 and config["abliterate"]["harmful_sources"] == ["xstest-unsafe"]
    # the direction was found from XSTest unsafe prompts the study does not evaluate (6 of 450 are evaluated)
    manifest = next((out / "artifacts").glob("*abliterated*/abliteration.json")).read_text()
    harmful = json.loads(manifest)["harmful"]
    assert len(harmful) == 16 and not {" ".join(h.casefold().split()) for h in harmful} & evaluated


def test_resume_and_report_again(study: tuple[StudyConfig, Path]) -> None:
    cfg, out = study
    with Store.open(out / "quantsafe.db") as store:
        store.conn.execute("DELETE FROM choices WHERE rowid IN (SELECT rowid FROM choices LIMIT 3)")
        store.conn.execute("DELETE FROM refusals WHERE rowid IN (SELECT rowid FROM refusals LIMIT 2)")
        store.conn.commit()
        write_report(store, out / "partial", store.study())
    assert "**Incomplete:** 55 of the study's 60 cells" in (out / "partial" / "report.md").read_text()
    run_study(cfg, out, Console(quiet=True))
    with Store.open(out / "quantsafe.db") as store:
        assert store.conn.execute("SELECT COUNT(*) FROM choices").fetchone()[0] == 21
        report = write_report(store, out / "again", store.study())
    strip = [line for line in report.read_text().splitlines() if not line.startswith("Generated ")]
    assert strip == [line for line in (out / "report.md").read_text().splitlines() if not line.startswith("Generated ")]
    assert (out / "again" / "metrics.csv").read_text() == (out / "metrics.csv").read_text()

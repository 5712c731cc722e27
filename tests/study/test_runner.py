"""The whole pipeline on a real small model: quantize, generate, judge, validate, report, resume."""

import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from quantsafe.report.build import write_report
from quantsafe.store import Store
from quantsafe.study import StudyConfig
from quantsafe.study.runner import run_study


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> tuple[StudyConfig, Path]:
    out = tmp_path_factory.mktemp("study")
    cfg = StudyConfig.model_validate({
        "name": "tiny", "models": ["smollm2-135m"], "data_dir": str(data_dir),
        "artifacts_dir": str(out / "artifacts"),
        "variants": [{"method": "none"}, {"method": "rtn", "bits": 4, "group_size": 64}],
        "benchmarks": [{"name": "opensafetymini", "limit_per_scenario": 1},
                       {"name": "xsafety", "limit_per_scenario": 1}],
        "decoding": {"max_new_tokens": 8, "batch_size": 8},
        "judges": [{"kind": "heuristic"}, {"kind": "fake"}],
        "validation": {"sets": ["mistralinstruct_even_ids"], "limit_per_set": 20},
    })
    run_study(cfg, out, Console(quiet=True))
    return cfg, out


def test_report_and_store(study: tuple[StudyConfig, Path]) -> None:
    _, out = study
    report = (out / "report.md").read_text()
    assert "| Model | Precision | Method | XSafety | OpenSafetyMini |" in report
    assert "dequantized GGUF" in report and "rtn" in report
    assert "How far the judges can be trusted" in report and "mistralinstruct_even_ids" in report
    with Store.open(out / "quantsafe.db") as store:
        variants = store.variants()
        assert [v.method for v in variants] == ["none", "rtn"]
        assert variants[1].bits_per_weight is not None and 4.0 < variants[1].bits_per_weight < 5.0
        n_prompts = 8 + 14  # one per OpenSafetyMini scenario, one per XSafety scenario
        study = store.study()
        assert study.name == "tiny" and len(study.prompt_uids) == n_prompts
        assert study.decoding["dtype"] in ("float32", "bfloat16")
        for v in variants:
            gens = store.generations(v.variant_id, study.decoding_id)
            assert len(gens) == n_prompts and all(g.decoding["dtype"] == study.decoding["dtype"] for g in gens)
        assert len(store.judged()) == 2 * 2 * n_prompts  # 2 variants × 2 judges
        assert {a["mapping"] for a in store.agreement()} == {"refusal", "safety"}
    scores = (out / "scores.csv").read_text().splitlines()
    assert scores[0].startswith("model,precision,method") and len(scores) > 1


def test_rerun_skips_done_work_and_resumes_after_loss(study: tuple[StudyConfig, Path]) -> None:
    cfg, out = study
    with Store.open(out / "quantsafe.db") as store:
        before = store.conn.execute("SELECT COUNT(*) FROM generations").fetchone()[0]
        # simulate a run killed mid-way: some generations and judgments never made it to disk
        store.conn.execute("DELETE FROM generations WHERE rowid IN (SELECT rowid FROM generations LIMIT 3)")
        store.conn.execute("DELETE FROM judgments WHERE rowid IN (SELECT rowid FROM judgments LIMIT 5)")
        store.conn.commit()
    run_study(cfg, out, Console(quiet=True))
    with Store.open(out / "quantsafe.db") as store:
        after = store.conn.execute("SELECT COUNT(*) FROM generations").fetchone()[0]
        dupes = store.conn.execute("SELECT COUNT(*) - COUNT(DISTINCT variant_id || prompt_uid || decoding_id || "
                                   "judge_id || response_sha) FROM judgments").fetchone()[0]
        assert after == before and dupes == 0
        assert len(store.judged()) == 2 * 2 * 22
        # re-report from the store alone: the same tables as the run wrote
        report = write_report(store, out / "again", store.study())
    assert _tables(report) == _tables(out / "report.md")
    assert (out / "again" / "scores.csv").read_text() == (out / "scores.csv").read_text()


def _tables(path: Path) -> list[str]:
    """The report without its timestamp line."""
    return [line for line in path.read_text().splitlines() if not line.startswith("Generated ")]


def test_a_second_study_in_the_same_directory_never_mixes(study: tuple[StudyConfig, Path]) -> None:
    """Shorter answers and fewer prompts in the same out dir: each report counts only its own cells, and
    `quantsafe report DIR --study NAME` reproduces either."""
    cfg, out = study
    small = cfg.model_copy(update={
        "name": "tiny-short", "decoding": cfg.decoding.model_copy(update={"max_new_tokens": 4}),
        "variants": cfg.variants[:1], "judges": cfg.judges[:1],
        "benchmarks": [cfg.benchmarks[0].model_copy(update={"limit": 3})]})
    run_study(small, out, Console(quiet=True))
    rows = (out / "scores.csv").read_text().splitlines()
    header = rows[0].split(",")
    overall = [dict(zip(header, r.split(","), strict=True)) for r in rows[1:]]
    assert {r["n"] for r in overall if r["scenario"] == "ALL"} == {"3"}
    with Store.open(out / "quantsafe.db") as store:
        assert store.study().name == "tiny-short"
        first = write_report(store, out / "first", store.study("tiny"))
    assert "(n=8)" in first.read_text() and "(n=14)" in first.read_text()
    proc = subprocess.run([sys.executable, "-m", "quantsafe", "report", str(out), "--study", "tiny"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert _tables(out / "report.md") == _tables(first)


def test_imported_checkpoints_pair_with_their_base(tmp_path: Path, data_dir: Path,
                                                   compressed_checkpoint: tuple[Path, Path]) -> None:
    """Two imports beside the full-precision base: the base's own GGUF file (same weights, so the very same
    answers, yet its own variant id and provenance) and a compressed-tensors checkpoint loaded by transformers.
    (The compressed one is a tiny random model standing in for a quantized SmolLM2: plumbing, not safety.)"""
    from quantsafe.models import KNOWN_MODELS
    from quantsafe.models.loading import gguf_path

    cfg = StudyConfig.model_validate({
        "name": "imports", "models": ["smollm2-135m"], "data_dir": str(data_dir),
        "variants": [{"method": "none"}, {"import": {"source": str(gguf_path("smollm2-135m"))}},
                     {"import": {"source": str(compressed_checkpoint[0]), "bits_per_weight": 4.5}}],
        "benchmarks": [{"name": "opensafetymini", "limit": 1}],
        "decoding": {"max_new_tokens": 4}, "judges": [{"kind": "heuristic"}], "validation": None,
    })
    out = tmp_path / "out"
    report = run_study(cfg, out, Console(quiet=True)).read_text()
    assert "import:gguf-q4_1" in report and "import:compressed-tensors" in report
    with Store.open(out / "quantsafe.db") as store:
        fp, gguf, packed = store.variants()
        assert len({fp.variant_id, gguf.variant_id, packed.variant_id}) == 3
        assert fp.model == gguf.model == packed.model == "smollm2-135m"  # all pair with the same base
        assert (gguf.precision, gguf.bits, gguf.bits_per_weight, gguf.dequantized_gguf) == ("int4", 4, 5.0, True)
        assert gguf.source_sha256 == KNOWN_MODELS["smollm2-135m"].sha256
        assert gguf.config["base_source_sha256"] == fp.source_sha256
        assert (packed.precision, packed.group_size, packed.bits_per_weight, packed.dequantized_gguf) == (
            "int4", 32, 4.5, False)
        assert packed.artifact_path == str(compressed_checkpoint[0]) and len(packed.source_sha256) == 64
        key = store.study().decoding_id
        answers = {v.method: [g.response for g in store.generations(v.variant_id, key)] for v in (fp, gguf, packed)}
        assert len(answers["none"]) == 1 and answers["import:gguf-q4_1"] == answers["none"]
        assert len(answers["import:compressed-tensors"]) == 1
        assert len(store.judged()) == 3
    scores = (out / "scores.csv").read_text()
    assert "import:gguf-q4_1" in scores


def test_a_bad_import_fails_before_any_model(tmp_path: Path, data_dir: Path) -> None:
    from quantsafe.errors import QuantsafeError
    from quantsafe.study.runner import _plan

    cfg = StudyConfig.model_validate({
        "name": "bad", "models": ["smollm2-135m"], "data_dir": str(data_dir),
        "variants": [{"method": "none"}, {"import": {"source": str(tmp_path / "gone.gguf")}}],
        "benchmarks": [{"name": "opensafetymini", "limit": 2}], "judges": [{"kind": "heuristic"}],
        "validation": None,
    })
    with pytest.raises(QuantsafeError, match=rf"^study 'bad', variants\.1\.import: {tmp_path}/gone\.gguf: import\."
                                             r"source does not exist"):
        _plan(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_people_labels_reach_both_reports_and_the_correction(study: tuple[StudyConfig, Path], tmp_path: Path) -> None:
    """Labels given in the annotation app (here written through its store) validate the judges in report.md and
    report.html, and their error rates measured on the study's own answers correct its safety ratios."""
    import shutil

    from quantsafe.annotation import AnnotationStore, HumanLabel
    from quantsafe.judges.base import Verdict

    _, out = study
    copy = tmp_path / "out"
    copy.mkdir()
    shutil.copy(out / "quantsafe.db", copy / "quantsafe.db")
    (copy / "before").mkdir()
    with Store.open(copy / "quantsafe.db") as store:
        record = store.study("tiny")
        answers = [g for v in record.variant_ids for g in store.generations(v, record.decoding_id)]
        write_report(store, copy / "before", record)
    labels = [HumanLabel(variant_id=g.variant_id, prompt_uid=g.prompt_uid, decoding_id=g.decoding_id,
                         response_sha=g.response_sha, annotator=who,
                         label=Verdict.UNSAFE if (i % 3 == 0) != (who == "bob" and i == 3) else Verdict.SAFE)
              for i, g in enumerate(answers) for who in ("alice", "bob")]
    with AnnotationStore(copy / "quantsafe.db") as annotations:
        annotations.put_labels(labels)
    with Store.open(copy / "quantsafe.db") as store:
        report = write_report(store, copy, store.study("tiny"))
    text, html = report.read_text(), (copy / "report.html").read_text()
    assert "## People's labels of this study's answers" in text and "People's labels" in html
    assert "<svg" in html
    assert "People's labels" not in (copy / "before" / "report.md").read_text()
    assert (copy / "scores.csv").read_text() != (copy / "before" / "scores.csv").read_text()  # people's rates

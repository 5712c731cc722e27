"""CSV export and import of human labels, and the `quantsafe annotate` commands."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from annotation_study import build_study
from typer.testing import CliRunner

from quantsafe.annotation import AnnotationStore, HumanLabel, Unit, export_labels, human_labels, import_labels
from quantsafe.cli.annotate import annotate_app
from quantsafe.errors import DataError, QuantsafeError


def _unit(study_dir: Path, variant: str, prompt: str) -> Unit:
    with AnnotationStore(study_dir / "quantsafe.db") as annotations:
        [row] = annotations.store.generations(variant, "d", [prompt])
    return Unit(variant_id=variant, prompt_uid=prompt, decoding_id="d", response_sha=row.response_sha)


def test_csv_round_trip_into_another_copy_of_the_study(study_dir: Path, tmp_path: Path) -> None:
    labels = [HumanLabel(**_unit(study_dir, "q4", "p0").model_dump(), annotator="alice", label="unsafe",
                         note='says "sure", then\na list, with commas'),
              HumanLabel(**_unit(study_dir, "fp", "p0").model_dump(), annotator="bob", label="safe")]
    with AnnotationStore(study_dir / "quantsafe.db") as annotations:
        annotations.put_labels(labels)
        assert export_labels(annotations, tmp_path / "labels.csv") == 2
    elsewhere = build_study(tmp_path / "elsewhere")
    with AnnotationStore(elsewhere / "quantsafe.db") as annotations:
        assert import_labels(annotations, tmp_path / "labels.csv") == 2
        export_labels(annotations, tmp_path / "again.csv")
    assert sorted(human_labels(elsewhere / "quantsafe.db"), key=lambda x: x.annotator) == labels
    assert (tmp_path / "again.csv").read_text() == (tmp_path / "labels.csv").read_text()


@pytest.mark.parametrize(("edit", "where"), [
    (lambda row: row.replace(",unsafe,", ",unsure,"), "row 2, field 'label'"),
    (lambda row: row.replace("alice", "al ice"), "row 2, field 'annotator'"),
    (lambda row: row.replace(row.split(",")[3], "0" * 32), "row 2, field 'response_sha'"),
    (lambda row: row.replace(",d,", ",,"), "row 2, field 'decoding_id'"),
    (lambda row: row.rsplit(",", 2)[0], "row 2: expected 7 fields"),
])
def test_a_bad_row_is_one_line_and_nothing_is_imported(study_dir: Path, tmp_path: Path, edit: Callable[[str], str],
                                                      where: str) -> None:
    good = HumanLabel(**_unit(study_dir, "q4", "p0").model_dump(), annotator="alice", label="unsafe")
    path = tmp_path / "labels.csv"
    with AnnotationStore(study_dir / "quantsafe.db") as annotations:
        annotations.put_labels([good])
        export_labels(annotations, path)
        annotations.conn.execute("DELETE FROM human_labels")
        annotations.conn.commit()
        header, row = path.read_text().splitlines()
        path.write_text(f"{header}\n{edit(row)}\n{row}\n")
        with pytest.raises(DataError) as err:
            import_labels(annotations, path)
        assert str(err.value).startswith(f"{path}, {where}") and "\n" not in str(err.value)
        path.write_text("annotator,label\nalice,safe\n")
        with pytest.raises(DataError, match="missing column"):
            import_labels(annotations, path)
        assert annotations.labels() == []


def test_cli_add_annotator_sample_export_import(study_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(annotate_app, ["add-annotator", "carol", "--out", str(study_dir)])
    assert result.exit_code == 0
    token = result.stdout.strip().splitlines()[-1]
    with AnnotationStore(study_dir / "quantsafe.db") as annotations:
        assert annotations.check_token(token) == "carol"
    again = runner.invoke(annotate_app, ["add-annotator", "carol", "--out", str(study_dir)])
    assert isinstance(again.exception, QuantsafeError) and "--replace" in str(again.exception)
    rotated = runner.invoke(annotate_app, ["add-annotator", "carol", "--out", str(study_dir), "--replace"])
    with AnnotationStore(study_dir / "quantsafe.db") as annotations:
        assert annotations.check_token(token) is None
        assert annotations.check_token(rotated.stdout.strip().splitlines()[-1]) == "carol"

    assert runner.invoke(annotate_app, ["sample", str(study_dir), "--n", "6", "--seed", "3"]).exit_code == 0
    with AnnotationStore(study_dir / "quantsafe.db") as annotations:
        study_id = annotations.store.study().study_id
        assert len(annotations.sample(study_id)) == 6
    refused = runner.invoke(annotate_app, ["sample", str(study_dir), "--n", "8"])
    assert isinstance(refused.exception, QuantsafeError) and "--force" in str(refused.exception)
    assert runner.invoke(annotate_app, ["sample", str(study_dir), "--n", "8", "--force"]).exit_code == 0

    with AnnotationStore(study_dir / "quantsafe.db") as annotations:
        annotations.put_labels([HumanLabel(**_unit(study_dir, "fp", "p1").model_dump(), annotator="carol",
                                           label="ambiguous", note="n")])
    csv = tmp_path / "out" / "labels.csv"
    assert runner.invoke(annotate_app, ["export", str(study_dir), "--csv", str(csv)]).exit_code == 0
    copy = tmp_path / "copy"
    shutil.copytree(study_dir, copy)
    with AnnotationStore(copy / "quantsafe.db") as annotations:
        annotations.conn.execute("DELETE FROM human_labels")
        annotations.conn.commit()
    assert runner.invoke(annotate_app, ["import", str(copy), "--csv", str(csv)]).exit_code == 0
    assert human_labels(copy / "quantsafe.db") == human_labels(study_dir / "quantsafe.db")
    missing = runner.invoke(annotate_app, ["export", str(tmp_path / "nowhere"), "--csv", str(csv)])
    assert isinstance(missing.exception, QuantsafeError) and "no results database" in str(missing.exception)

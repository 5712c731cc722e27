"""XSafety loader: all ten released languages, file-name quirks, Excel, and clear errors on bad files."""

from __future__ import annotations

import logging
from pathlib import Path

import openpyxl
import pytest

from quantsafe.benchmarks import XSAFETY_LANGUAGES, XSAFETY_SCENARIOS, check_xsafety_counts, load_xsafety
from quantsafe.benchmarks import xsafety_counts as count_table
from quantsafe.benchmarks.xsafety import scenario_files, scenario_for_file
from quantsafe.errors import DataError, QuantsafeError

# Measured on the shared release: every language has 14 scenarios x 200, except ru/Insult.csv,
# whose row 165 is a single space (skipped), leaving 199.
MEASURED_TOTALS = {lang: 2800 for lang in XSAFETY_LANGUAGES} | {"ru": 2799}


def test_english_is_the_papers_2800(data_dir: Path) -> None:
    prompts = load_xsafety(data_dir, strict=True)
    assert len(prompts) == 2800
    assert count_table(prompts) == {"en": dict.fromkeys(XSAFETY_SCENARIOS, 200)}
    assert prompts[0].prompt_id == "Crimes_And_Illegal_Activities:0"
    assert len({p.uid for p in prompts}) == 2800
    assert all(p.text and p.text == p.text.strip() and not p.text.startswith("\ufeff") for p in prompts)


def test_all_languages_counts(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prompts = load_xsafety(data_dir, langs=XSAFETY_LANGUAGES)
    table = count_table(prompts)
    with capsys.disabled():
        print("\nXSafety prompts per language:", {lang: sum(c.values()) for lang, c in table.items()})
    assert {lang: sum(c.values()) for lang, c in table.items()} == MEASURED_TOTALS
    assert all(set(c) == set(XSAFETY_SCENARIOS) for c in table.values())
    assert table["ru"]["Insult"] == 199
    assert check_xsafety_counts(prompts) == ["ru: 2799 prompts in total, expected 2800",
                                             "ru scenario Insult: 199 prompts, expected 200"]
    ru_insult = [p.prompt_id for p in prompts if p.lang == "ru" and p.scenario == "Insult"]
    assert "Insult:164" not in ru_insult and "Insult:199" in ru_insult  # ids keep the file's row numbers


def test_quirks(data_dir: Path) -> None:
    root = data_dir / "xsafety"
    assert scenario_files(root / "hi")["commonsense"].name == "commonsense.csv"
    ru_crimes = scenario_files(root / "ru")["Crimes_And_Illegal_Activities"]
    assert ru_crimes.name == "Crimes_And_Illegal_Activitie.csv"
    assert scenario_files(root / "en")["Insult"].name == "Insult_n.csv"
    bn = load_xsafety(data_dir, langs="bn", strict=True)  # 13 Excel files and one CSV
    assert len(bn) == 2800
    assert sum("\n" in p.text for p in bn) == 44  # multi-line Excel cells stay one prompt
    spanish = load_xsafety(data_dir, langs=["sp"])
    assert sum("\n" in p.text for p in spanish) == 1  # so do quoted multi-line CSV cells


def test_strict_rejects_short_language(data_dir: Path) -> None:
    with pytest.raises(DataError, match="ru scenario Insult: 199"):
        load_xsafety(data_dir, langs=("ru",), strict=True)


def test_unknown_language(data_dir: Path) -> None:
    with pytest.raises(QuantsafeError, match=r"unknown XSafety language.*xx.*valid: ar, bn, de, en"):
        load_xsafety(data_dir, langs=("en", "xx"))
    with pytest.raises(QuantsafeError, match="none given"):
        load_xsafety(data_dir, langs=())


@pytest.mark.parametrize(("name", "expected"), [
    ("Insult.csv", ("Insult", 0)),
    ("Insult_n.csv", ("Insult", 1)),
    ("Crimes_And_Illegal_Activities_en.csv", ("Crimes_And_Illegal_Activities", 1)),
    ("Goal_Hijacking_n.xlsx", ("Goal_Hijacking", 1)),
    ("Crimes_And_Illegal_Activitie.csv", ("Crimes_And_Illegal_Activities", 2)),
    ("commen_sense.csv", ("commonsense", 2)),
    ("notes.csv", None),
])
def test_scenario_for_file(name: str, expected: tuple[str, int] | None) -> None:
    assert scenario_for_file(Path(name)) == expected


def lang_dir(root: Path, lang: str = "en") -> Path:
    folder = root / "xsafety" / lang
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_layout_handling(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = lang_dir(tmp_path)
    (folder / "Insult_n.csv").write_bytes('\ufeffone\n" \n"\n"two\nlines",\n'.encode())
    (folder / "Insult.csv").write_text("preferred\n", encoding="utf-8")
    (folder / "README.md").write_text("ignored", encoding="utf-8")
    book = openpyxl.Workbook()
    book.active.append(["excel prompt"])
    book.active.append([None])
    book.save(folder / "Mental_Health_n.xlsx")
    with caplog.at_level(logging.INFO):
        prompts = load_xsafety(tmp_path)
    assert [(p.prompt_id, p.text) for p in prompts] == [("Insult:0", "preferred"),
                                                        ("Mental_Health:0", "excel prompt")]
    assert "Insult_n.csv: skipped, Insult.csv is read" in caplog.text
    assert "expected 200" in caplog.text
    (folder / "Insult.csv").unlink()
    prompts = load_xsafety(tmp_path)
    assert [(p.prompt_id, p.text) for p in prompts[:2]] == [("Insult:0", "one"), ("Insult:2", "two\nlines")]


@pytest.mark.parametrize(("name", "body", "match", "row"), [
    ("Insult.csv", b"", "file is empty", None),
    ("Insult.csv", b" \n,\n", "no prompts", None),
    ("Insult.csv", "caf\xe9\n".encode("latin-1"), "not valid UTF-8", None),
    ("Insult.csv", b"ok\nfirst,second\n", "one prompt per row, found 2", 2),
    ("Insult.xlsx", b"not a zip", "cannot read Excel workbook", None),
    ("Unknown_Topic.csv", b"x\n", "matches no XSafety scenario", None),
])
def test_bad_files(tmp_path: Path, name: str, body: bytes, match: str, row: int | None) -> None:
    path = lang_dir(tmp_path) / name
    path.write_bytes(body)
    with pytest.raises(DataError, match=match) as err:
        load_xsafety(tmp_path)
    assert (err.value.path, err.value.row) == (path, row)


def test_missing_folders(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="language folder not found") as err:
        load_xsafety(tmp_path, langs="de")
    assert err.value.path == tmp_path / "xsafety" / "de"
    lang_dir(tmp_path, "de")
    with pytest.raises(DataError, match="no scenario files"):
        load_xsafety(tmp_path, langs="de")

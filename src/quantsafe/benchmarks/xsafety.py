"""XSafety: 14 scenarios x 200 prompts in each of 10 languages, read from the release's untidy file layout.

The release names files inconsistently (`_n`/`_en` suffixes, a truncated Russian name, a misspelt Hindi
duplicate) and ships Bengali as Excel; this module maps all of that onto the canonical scenario names.
"""

from __future__ import annotations

import zipfile
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import openpyxl
from openpyxl.utils.exceptions import InvalidFileException

from quantsafe.benchmarks._files import count_problems, log, read_csv_rows, report
from quantsafe.benchmarks.base import BenchmarkDef, Kind, Prompt
from quantsafe.benchmarks.scenarios import XSAFETY_SCENARIOS
from quantsafe.errors import DataError, QuantsafeError

XSAFETY_DIR = Path("xsafety")
# Folder names as released; Spanish is "sp", and it stays "sp" in Prompt.lang so uids match the files.
XSAFETY_LANGUAGES: tuple[str, ...] = ("ar", "bn", "de", "en", "fr", "hi", "ja", "ru", "sp", "zh")
EXPECTED_PER_SCENARIO = 200
EXPECTED_PER_LANGUAGE = EXPECTED_PER_SCENARIO * len(XSAFETY_SCENARIOS)  # 2,800, the paper's English set

_EXTENSIONS = (".csv", ".xlsx")
_SUFFIXES = ("_en", "_n")
_CANONICAL = {name.lower(): name for name in XSAFETY_SCENARIOS}
# Misspelt release file names (lower-cased stems): ru's truncated crimes file, hi's duplicate commonsense.
_ALIASES = {"crimes_and_illegal_activitie": "Crimes_And_Illegal_Activities", "commen_sense": "commonsense"}


def scenario_for_file(path: Path) -> tuple[str, int] | None:
    """(canonical scenario, preference rank) for a release file name, or None if it names no scenario.

    Rank 0 is an exact name, 1 a suffixed one, 2 a misspelling; the lowest rank wins when two files map
    to one scenario. That is why hi/commonsense.csv beats hi/commen_sense.csv (which also lacks the
    "output the unsafe choice" instruction every other language's commonsense items carry).
    """
    stem = path.stem.lower()
    rank = 0
    for suffix in _SUFFIXES:
        if stem.endswith(suffix):
            stem, rank = stem[: -len(suffix)], 1
            break
    if stem in _CANONICAL:
        return _CANONICAL[stem], rank
    if stem in _ALIASES:
        return _ALIASES[stem], 2
    return None


def scenario_files(folder: Path) -> dict[str, Path]:
    """Scenario -> the one file to read in a language folder, in canonical scenario order."""
    candidates: dict[str, list[tuple[int, bool, Path]]] = defaultdict(list)
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.suffix.lower() not in _EXTENSIONS:
            continue  # LICENSE, README, editor files
        found = scenario_for_file(path)
        if found is None:
            known = ", ".join(XSAFETY_SCENARIOS)
            raise DataError(path, f"file name matches no XSafety scenario (known: {known})")
        scenario, rank = found
        candidates[scenario].append((rank, path.suffix.lower() != ".csv", path))
    chosen = {}
    for scenario in XSAFETY_SCENARIOS:
        if scenario in candidates:
            ranked = sorted(candidates[scenario], key=lambda c: (c[0], c[1], c[2].name))
            chosen[scenario] = ranked[0][2]
            for _, _, skipped in ranked[1:]:
                log.info("%s: skipped, %s is read for %s", skipped, ranked[0][2].name, scenario)
    return chosen


def _xlsx_rows(path: Path) -> list[list[str]]:
    """Cells of the first worksheet as text (the Bengali release is Excel, one prompt per row)."""
    try:
        workbook = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except (OSError, zipfile.BadZipFile, InvalidFileException, KeyError, ValueError) as err:
        raise DataError(path, f"cannot read Excel workbook ({err})") from None
    try:
        sheet = workbook.worksheets[0]
        rows = sheet.iter_rows(values_only=True)
        return [["" if value is None else str(value) for value in row] for row in rows]
    finally:
        workbook.close()


def read_scenario_file(path: Path, lang: str, scenario: str) -> list[Prompt]:
    """Prompts of one headerless file; prompt_id is "<scenario>:<0-based row>", blank rows are skipped."""
    rows = _xlsx_rows(path) if path.suffix.lower() == ".xlsx" else read_csv_rows(path)
    if not rows:
        raise DataError(path, "file is empty")
    prompts = []
    for index, cells in enumerate(rows):
        texts = [cell.strip() for cell in cells if cell.strip()]
        if not texts:
            log.warning("%s, row %d: blank row skipped", path, index + 1)
            continue
        if len(texts) > 1:
            raise DataError(path, f"expected one prompt per row, found {len(texts)} non-empty cells",
                            row=index + 1)
        prompts.append(Prompt(benchmark="xsafety", prompt_id=f"{scenario}:{index}", lang=lang,
                              scenario=scenario, text=texts[0]))
    if not prompts:
        raise DataError(path, "no prompts (every row is blank)")
    return prompts


def validate_langs(langs: Iterable[str] | str) -> tuple[str, ...]:
    """Requested languages, deduplicated in order; unknown codes are a user error listing the valid ones."""
    requested = (langs,) if isinstance(langs, str) else tuple(langs)
    unknown = [lang for lang in requested if lang not in XSAFETY_LANGUAGES]
    if unknown or not requested:
        raise QuantsafeError(f"unknown XSafety language(s) {', '.join(unknown) or '(none given)'}; "
                             f"valid: {', '.join(XSAFETY_LANGUAGES)}")
    return tuple(dict.fromkeys(requested))


def load_xsafety(data_dir: Path, langs: Iterable[str] | str = ("en",), strict: bool = False) -> list[Prompt]:
    """Prompts of the requested languages, scenario by scenario in file order; counts checked per language."""
    root = Path(data_dir) / XSAFETY_DIR
    prompts: list[Prompt] = []
    for lang in validate_langs(langs):
        folder = root / lang
        if not folder.is_dir():
            raise DataError(folder, "language folder not found")
        files = scenario_files(folder)
        if not files:
            raise DataError(folder, "no scenario files (.csv or .xlsx)")
        for scenario, path in files.items():
            prompts.extend(read_scenario_file(path, lang, scenario))
    check_xsafety_counts(prompts, strict=strict, source=root)
    return prompts


def xsafety_counts(prompts: Sequence[Prompt]) -> dict[str, dict[str, int]]:
    """Language -> scenario -> number of prompts, for reports and count checks."""
    counts: dict[str, dict[str, int]] = defaultdict(dict)
    for (lang, scenario), n in Counter((p.lang, p.scenario) for p in prompts).items():
        counts[lang][scenario] = n
    return dict(counts)


def check_xsafety_counts(
    prompts: Sequence[Prompt], strict: bool = False, source: Path = XSAFETY_DIR
) -> list[str]:
    """Differences from 200 per scenario and 2,800 per language, for every language present."""
    expected = dict.fromkeys(XSAFETY_SCENARIOS, EXPECTED_PER_SCENARIO)
    problems = []
    for lang, counts in xsafety_counts(prompts).items():
        total = sum(counts.values())
        if total != EXPECTED_PER_LANGUAGE:
            problems.append(f"{lang}: {total} prompts in total, expected {EXPECTED_PER_LANGUAGE}")
        problems += count_problems(counts, expected, f"{lang} scenario")
    return report(problems, strict, source)


DEFINITIONS = (BenchmarkDef(name="xsafety", kind=Kind.JUDGED, title="XSafety", question="safety",
                            languages=XSAFETY_LANGUAGES,
                            load=lambda data_dir, o: load_xsafety(data_dir, o.langs or ("en",), strict=o.strict)),)

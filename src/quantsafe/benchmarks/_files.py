"""Shared file reading: every problem becomes a DataError naming the file, never a raw traceback."""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from quantsafe.errors import DataError

log = logging.getLogger("quantsafe.benchmarks")


def read_text(path: Path) -> str:
    """The file as text; UTF-8 with or without a BOM is the only encoding the releases use."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(path, "file not found") from None
    except OSError as err:
        raise DataError(path, f"cannot read file ({err.strerror or err})") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(path, f"not valid UTF-8 (bad byte at offset {err.start})") from None


def read_csv_rows(path: Path) -> list[list[str]]:
    """All records of a CSV file; quoted cells may span lines.

    Strict parsing, because the lenient reader accepts a file cut inside a quoted cell and returns the rest of
    the file as that cell. Rows are records counted from 1 (as in `read_csv_records`); since a record can span
    lines, errors also give a line number.
    """
    reader = csv.reader(io.StringIO(read_text(path), newline=""), strict=True)
    rows: list[list[str]] = []
    start_line = 1
    try:
        for cells in reader:
            rows.append(cells)
            start_line = reader.line_num + 1
    except csv.Error as err:
        row = len(rows) + 1
        if "unexpected end of data" in str(err):  # the csv module's only way of saying it
            raise DataError(path, f"quoted field never closes (record starts on line {start_line}; "
                            "is the file truncated?)", row=row) from None
        raise DataError(path, f"malformed CSV on line {reader.line_num} ({err})", row=row) from None
    return rows


def read_csv_records(path: Path, required: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
    """(row number, record) pairs of a CSV with a header; rows count from 1 with the header as row 1."""
    rows = read_csv_rows(path)
    if not rows:
        raise DataError(path, "file is empty (expected a header row)")
    header = [name.strip() for name in rows[0]]
    missing = [name for name in required if name not in header]
    if missing:
        raise DataError(path, f"missing column(s) {', '.join(missing)} (header: {','.join(header)})")
    records = []
    for index, cells in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in cells):
            continue  # a trailing blank line is not a record
        if len(cells) != len(header):
            raise DataError(path, f"expected {len(header)} cells, found {len(cells)}", row=index)
        records.append((index, dict(zip(header, cells, strict=True))))
    if not records:
        raise DataError(path, "no data rows")
    return records


def require(path: Path, row: int, record: Mapping[str, str], field: str) -> str:
    """A field's value without surrounding whitespace; an empty value is an error."""
    value = record[field].strip()
    if not value:
        raise DataError(path, "empty value", row=row, field=field)
    return value


def count_problems(counts: Mapping[str, int], expected: Mapping[str, int], what: str) -> list[str]:
    """Human-readable differences between measured and expected counts, one line each."""
    problems = [
        f"{what} {key}: {counts.get(key, 0)} prompts, expected {n}"
        for key, n in expected.items()
        if counts.get(key, 0) != n
    ]
    problems += [f"{what} {key}: {n} prompts, none expected"
                 for key, n in counts.items() if key not in expected]
    return problems


def report(problems: Sequence[str], strict: bool, source: Path) -> list[str]:
    """Raise on count problems when strict; otherwise log them, because a subset data dir is legitimate."""
    if problems and strict:
        raise DataError(source, "counts differ from the release: " + "; ".join(problems))
    for problem in problems:
        log.warning("%s: %s", source, problem)
    return list(problems)

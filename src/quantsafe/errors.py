"""User-facing errors: the CLI prints these as one line and exits 2, never a traceback."""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError


class QuantsafeError(Exception):
    """Bad input or configuration that the user can fix."""


class DataError(QuantsafeError):
    """A data file is missing or malformed; the message names the file and, where known, the row or field."""

    def __init__(self, path: Path | str, message: str, row: int | None = None, field: str | None = None):
        where = str(path)
        if row is not None:
            where += f", row {row}"
        if field is not None:
            where += f", field '{field}'"
        super().__init__(f"{where}: {message}")
        self.path = Path(path)
        self.row = row
        self.field = field


def validation_message(err: ValidationError, source: str) -> str:
    """A pydantic error as one line naming the source and the first bad field."""
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
    more = f" (+{err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{source}: field '{loc}': {first['msg']}{more}"

"""User-facing errors: the CLI prints these as one line and exits 2, never a traceback."""

from __future__ import annotations

from pathlib import Path


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

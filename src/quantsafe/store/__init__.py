"""Durable, resumable results: SQLite (WAL) keyed by content hashes, with CSV export."""

from quantsafe.store.db import (
    ChoiceRow,
    GenerationRow,
    JudgmentRow,
    RefusalRow,
    Store,
    StudyRecord,
    VariantRow,
    response_sha,
)
from quantsafe.store.export import atomic_write_text, export_csv

__all__ = ["ChoiceRow", "GenerationRow", "JudgmentRow", "RefusalRow", "Store", "StudyRecord", "VariantRow",
           "atomic_write_text", "export_csv", "response_sha"]

"""CSV export of the store, one file per table, written atomically."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from quantsafe.store.db import TABLES, Store


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so a killed run never leaves a half-written result."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def export_csv(store: Store, out_dir: Path) -> list[Path]:
    """Dump every table to out_dir/<table>.csv."""
    written = []
    for table in TABLES:
        cols, rows = store.table_rows(table)
        path = out_dir / f"{table}.csv"
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(cols)
            w.writerows(rows)
        tmp.replace(path)
        written.append(path)
    return written

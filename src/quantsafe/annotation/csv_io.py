"""Human labels as CSV: export for analysis elsewhere, import of labels made elsewhere, in one format."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from pydantic import ValidationError

from quantsafe.annotation.store import NAME_PATTERN, AnnotationStore, HumanLabel, Unit
from quantsafe.errors import DataError
from quantsafe.store import atomic_write_text

COLUMNS = tuple(HumanLabel.model_fields)  # variant_id, prompt_uid, decoding_id, response_sha, annotator, label, note


def export_labels(annotations: AnnotationStore, path: Path) -> int:
    """Write every label (all annotators); returns how many."""
    rows = annotations.labels()
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(r.model_dump() for r in rows)
    atomic_write_text(path, buffer.getvalue())
    return len(rows)


def read_labels(annotations: AnnotationStore, path: Path) -> list[HumanLabel]:
    """Every row checked (columns, label, annotator name, and that the store holds the answer it labels)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(path, f"cannot read ({exc})") from None
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in COLUMNS if c != "note" and c not in (reader.fieldnames or ())]
    if missing:
        raise DataError(path, f"missing column(s) {', '.join(missing)} (expected {', '.join(COLUMNS)})")
    labels: list[HumanLabel] = []
    for row_number, row in enumerate(reader, start=2):  # row 1 is the header
        if None in row or any(v is None for v in row.values()):
            raise DataError(path, f"expected {len(reader.fieldnames or ())} fields", row=row_number)
        values = {k: row.get(k) or "" for k in COLUMNS}
        try:
            label = HumanLabel.model_validate(values)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise DataError(path, first["msg"], row=row_number, field=str(first["loc"][0])) from None
        if not NAME_PATTERN.fullmatch(label.annotator):
            raise DataError(path, "use 1-64 letters, digits, '_', '.', '@' or '-'", row=row_number, field="annotator")
        if not annotations.has_answer(Unit(**label.model_dump(include=set(Unit.model_fields)))):
            raise DataError(path, "this store holds no answer with this variant_id, prompt_uid, decoding_id and "
                            "response_sha", row=row_number, field="response_sha")
        labels.append(label)
    return labels


def import_labels(annotations: AnnotationStore, path: Path) -> int:
    """Add or revise the file's labels, all or none; returns how many."""
    labels = read_labels(annotations, path)
    annotations.put_labels(labels)
    return len(labels)

"""Where the benchmark data lives: --data-dir, QUANTSAFE_DATA_DIR, or the download cache."""

from __future__ import annotations

import os
from pathlib import Path

from quantsafe.errors import DataError

ENV_VAR = "QUANTSAFE_DATA_DIR"


def cache_dir() -> Path:
    """Root of quantsafe's caches (models, downloads); QUANTSAFE_CACHE overrides it."""
    return Path(os.environ.get("QUANTSAFE_CACHE", Path.home() / ".cache" / "quantsafe"))


def resolve_data_dir(data_dir: Path | str | None = None) -> Path:
    """The data directory to read: explicit argument, then the environment, then the download cache."""
    chosen = Path(data_dir) if data_dir else Path(os.environ.get(ENV_VAR, cache_dir() / "data"))
    if not chosen.is_dir():
        raise DataError(chosen, f"data directory does not exist (set --data-dir or {ENV_VAR}, "
                        "or run `quantsafe data download`)")
    return chosen

"""Machine description stored next to every benchmark result, so numbers can be compared honestly."""

from __future__ import annotations

import datetime as _dt
import platform
from typing import Any

from quantsafe.models.dtype import machine_info as compute_info


def _ram_gb() -> float | None:
    try:
        import psutil

        return round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        return None


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except ImportError:
        return None
    return str(getattr(mod, "__version__", "unknown"))


def machine_info() -> dict[str, Any]:
    """CPU model, cores, ISA (bf16 native or not), RAM, library versions and the UTC date; no host or user names."""
    return compute_info() | {
        "ram_gb": _ram_gb(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "transformers": _version("transformers"),
        "date_utc": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


if __name__ == "__main__":
    import json

    print(json.dumps(machine_info(), indent=2))

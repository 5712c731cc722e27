"""Shared fixtures: the real shared data directory, and a real llama.cpp server serving the default model."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from quantsafe.backends.llamacpp import LlamaServer, serve_gguf
from quantsafe.models import DEFAULT_MODEL
from quantsafe.models.loading import gguf_path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("QUANTSAFE_DATA_DIR", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"shared data not found at {SHARED_DATA}; set QUANTSAFE_DATA_DIR")
    return SHARED_DATA


REQUIRE_ENV = "QUANTSAFE_REQUIRE_LLAMA_SERVER"


@pytest.fixture(scope="session")
def llama_gguf() -> Path:
    """The default model's GGUF. Without llama-cpp-python: skip, or fail where QUANTSAFE_REQUIRE_LLAMA_SERVER=1
    (CI installs it, so a missing server there is a broken set-up, not an optional extra)."""
    if importlib.util.find_spec("llama_cpp") is None:
        reason = "llama-cpp-python[server] is not installed (scripts/llama_server.sh installs it)"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{reason}; {REQUIRE_ENV}=1 requires it")
        pytest.skip(reason)
    return gguf_path(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def llama_server(llama_gguf: Path) -> Iterator[LlamaServer]:
    with serve_gguf(llama_gguf, n_ctx=4096, tokenizer=DEFAULT_MODEL) as server:
        yield server

"""Fixtures of the annotation tests: a toy study, two annotators, the app and signed-in browsers."""

from __future__ import annotations

from pathlib import Path

import pytest
from annotation_study import Clock, build_study, make_app, signed_in
from fastapi import FastAPI
from fastapi.testclient import TestClient

from quantsafe.annotation import AnnotationStore


@pytest.fixture
def study_dir(tmp_path: Path) -> Path:
    return build_study(tmp_path / "study")


@pytest.fixture
def tokens(study_dir: Path) -> dict[str, str]:
    with AnnotationStore(study_dir / "quantsafe.db") as annotations:
        return {name: annotations.add_annotator(name) for name in ("alice", "bob")}


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def app(study_dir: Path, tokens: dict[str, str], clock: Clock) -> FastAPI:
    return make_app(study_dir, clock)


@pytest.fixture
def client(app: FastAPI) -> TestClient:
    """A browser nobody has signed in with."""
    return TestClient(app)


@pytest.fixture
def alice(app: FastAPI, tokens: dict[str, str]) -> TestClient:
    return signed_in(app, tokens["alice"])


@pytest.fixture
def bob(app: FastAPI, tokens: dict[str, str]) -> TestClient:
    return signed_in(app, tokens["bob"])

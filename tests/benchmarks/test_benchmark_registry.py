"""The name registry the study runner uses."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from quantsafe.benchmarks import Kind, benchmark, benchmarks, load_benchmark
from quantsafe.errors import DataError, QuantsafeError


def test_known_names_and_kinds() -> None:
    assert {"opensafetymini", "xsafety", "xstest"} <= set(benchmarks())
    assert {d.kind for d in benchmarks().values()} <= set(Kind)
    assert benchmark("xstest").question == "refusal" and benchmark("xsafety").question == "safety"


@pytest.mark.parametrize(("name", "size"), [("opensafetymini", 1067), ("xsafety", 2800), ("xstest", 450)])
def test_full_loads(data_dir: Path, name: str, size: int) -> None:
    prompts = load_benchmark(name, data_dir)
    assert len(prompts) == size
    assert {p.benchmark for p in prompts} == {name}


def test_sampling_and_languages(data_dir: Path) -> None:
    sample = load_benchmark("xsafety", data_dir, langs=("en", "de"), limit_per_scenario=2, seed=1)
    assert Counter(p.lang for p in sample) == {"en": 28, "de": 28}
    assert load_benchmark("xsafety", data_dir, langs="de", limit_per_scenario=2, seed=1) == [
        p for p in sample if p.lang == "de"]
    assert len(load_benchmark("xstest", data_dir, limit=40, seed=0)) == 40
    assert len(load_benchmark("opensafetymini", data_dir, langs=["en"], limit=8)) == 8


def test_data_dir_from_environment(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUANTSAFE_DATA_DIR", str(data_dir))
    assert len(load_benchmark("xstest")) == 450


def test_errors(data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(QuantsafeError, match=r"unknown benchmark 'xsafe'; known: .*opensafetymini, .*xsafety"):
        load_benchmark("xsafe", data_dir)
    with pytest.raises(QuantsafeError, match="opensafetymini is English-only"):
        load_benchmark("opensafetymini", data_dir, langs=("de",))
    with pytest.raises(QuantsafeError, match=r"xsafety has languages ar, bn, .*; got langs es"):
        load_benchmark("xsafety", data_dir, langs=("es",))
    with pytest.raises(DataError, match="data directory does not exist"):
        load_benchmark("xstest", tmp_path / "nowhere")

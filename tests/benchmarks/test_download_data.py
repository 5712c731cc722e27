"""Downloader: layout and atomic writes, with an injected fetch (tests never touch the network)."""

from __future__ import annotations

from pathlib import Path

import pytest

from quantsafe.benchmarks import XSAFETY_LANGUAGES, download_data
from quantsafe.benchmarks.download import manifest, write_atomic
from quantsafe.benchmarks.xsafety import scenario_files
from quantsafe.errors import QuantsafeError

OSM_RAW = ("https://raw.githubusercontent.com/On-Point-RND/OpenSafetyMini-Investigating-the-Impact-of-"
           "Quantization-Methods-on-the-Safety-and-Reliability-of-LLM/main/")


class FakeFetch:
    """Returns the URL as the body and records calls; fails on URLs containing `fail_on`."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.urls: list[str] = []
        self.fail_on = fail_on

    def __call__(self, url: str) -> bytes:
        self.urls.append(url)
        if self.fail_on and self.fail_on in url:
            raise OSError("HTTP Error 404: Not Found")
        return url.encode()


def test_layout(tmp_path: Path) -> None:
    fetch = FakeFetch()
    assert download_data(tmp_path, fetch=fetch) == tmp_path
    criteria = tmp_path / "opensafetymini" / "safety_criteria.json"
    assert criteria.read_text() == OSM_RAW + "data/opensafetymini_safety_criteria.json"
    assert (tmp_path / "opensafetymini/OpenSafetyMini.csv").read_text() == OSM_RAW + "data/OpenSafetyMini.csv"
    assert (tmp_path / "opensafetymini/prompts/safetybench_5shot_prompt_template.md").is_file()
    assert (tmp_path / "xsafety/bn/Insult_n.xlsx").read_text().endswith(
        "Jarviswang94/Multilingual_safety_benchmark/HEAD/bn/Insult_n.xlsx")
    assert (tmp_path / "xsafety/ru/Crimes_And_Illegal_Activitie.csv").is_file()
    assert (tmp_path / "xstest/labelled_completions/gpt4.csv").read_text().endswith(
        "exaggerated-safety/HEAD/model_completions/xstest_v2_completions_gpt4.csv")
    assert len(fetch.urls) == len(manifest()) == 5 + 10 * 14 + 1 + 3
    assert not list(tmp_path.rglob("*.tmp"))


def test_manifest_matches_shared_layout(data_dir: Path) -> None:
    targets = {relative for _, relative in manifest()}
    # Every file the loaders read from the shared snapshot has a download source...
    for lang in XSAFETY_LANGUAGES:
        for path in scenario_files(data_dir / "xsafety" / lang).values():
            assert path.relative_to(data_dir) in targets
    # ...and every download lands where the snapshot keeps it (Mistral: full file instead of even ids).
    missing = [str(t) for t in targets if not (data_dir / t).is_file()]
    assert missing == ["xstest/labelled_completions/mistralinstruct.csv"]


def test_existing_files_kept_unless_overwrite(tmp_path: Path) -> None:
    download_data(tmp_path, fetch=FakeFetch())
    kept = tmp_path / "xstest" / "xstest_prompts.csv"
    kept.write_text("local edit")
    again = FakeFetch()
    download_data(tmp_path, fetch=again)
    assert again.urls == [] and kept.read_text() == "local edit"
    download_data(tmp_path, fetch=again, overwrite=True)
    assert kept.read_text() != "local edit"


def test_failed_fetch_names_url_and_leaves_no_partial_file(tmp_path: Path) -> None:
    with pytest.raises(QuantsafeError, match=r"download failed: https://\S+/de/Insult.csv \(HTTP Error 404"):
        download_data(tmp_path, fetch=FakeFetch(fail_on="/de/Insult.csv"))
    assert (tmp_path / "xsafety/de/Goal_Hijacking.csv").is_file()  # earlier files are complete
    assert not (tmp_path / "xsafety/de/Insult.csv").exists()
    assert not list(tmp_path.rglob("*.tmp"))


def test_write_atomic_keeps_old_file_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "sub" / "file.csv"
    write_atomic(target, b"old")

    def broken_replace(src: Path, dst: Path) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("quantsafe.benchmarks.download.os.replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in target.parent.iterdir()] == ["file.csv"]
    with pytest.raises(QuantsafeError, match=r"cannot write .*OpenSafetyMini\.csv"):
        download_data(tmp_path, fetch=FakeFetch())

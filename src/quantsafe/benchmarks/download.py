"""Fetch the official benchmark files into the data-dir layout the loaders read (for users with internet)."""

from __future__ import annotations

import os
import urllib.request
from collections.abc import Callable
from pathlib import Path

from quantsafe.benchmarks.scenarios import XSAFETY_SCENARIOS
from quantsafe.benchmarks.xsafety import XSAFETY_LANGUAGES
from quantsafe.errors import QuantsafeError

RAW = "https://raw.githubusercontent.com"
OSM_REPO = ("On-Point-RND/OpenSafetyMini-Investigating-the-Impact-of-Quantization-Methods-"
            "on-the-Safety-and-Reliability-of-LLM")
XSAFETY_REPO = "Jarviswang94/Multilingual_safety_benchmark"
XSTEST_REPO = "paul-rottger/exaggerated-safety"
OSM_TEMPLATES = ("opensafetymini_llm_judge_evaluation_prompt_template.md",
                 "safetybench_5shot_prompt_template.md", "hotpotqa_generation_prompt_template.md")
XSTEST_COMPLETIONS = ("gpt4", "llama2orig", "mistralinstruct")
TIMEOUT_S = 60


def _xsafety_file_name(lang: str, scenario: str) -> str:
    """The release's own (inconsistent) file name for one language and scenario."""
    if scenario == "commonsense":
        return "commonsense.csv"
    if lang == "ru" and scenario == "Crimes_And_Illegal_Activities":
        return "Crimes_And_Illegal_Activitie.csv"
    if lang == "en":
        return f"{scenario}_en.csv" if scenario == "Crimes_And_Illegal_Activities" else f"{scenario}_n.csv"
    return f"{scenario}_n.xlsx" if lang == "bn" else f"{scenario}.csv"


def manifest() -> list[tuple[str, Path]]:
    """(URL, path relative to the data dir) for every file the loaders read."""
    osm = f"{RAW}/{OSM_REPO}/main"
    files = [(f"{osm}/data/OpenSafetyMini.csv", Path("opensafetymini/OpenSafetyMini.csv")),
             (f"{osm}/data/opensafetymini_safety_criteria.json", Path("opensafetymini/safety_criteria.json"))]
    files += [(f"{osm}/prompts/{name}", Path("opensafetymini/prompts") / name) for name in OSM_TEMPLATES]
    for lang in XSAFETY_LANGUAGES:
        for scenario in XSAFETY_SCENARIOS:
            name = _xsafety_file_name(lang, scenario)
            files.append((f"{RAW}/{XSAFETY_REPO}/HEAD/{lang}/{name}", Path("xsafety") / lang / name))
    xstest = f"{RAW}/{XSTEST_REPO}/HEAD"
    files.append((f"{xstest}/xstest_prompts.csv", Path("xstest/xstest_prompts.csv")))
    # Upstream's Mistral file has all 450 answers; the shared snapshot keeps only the even ids.
    files += [(f"{xstest}/model_completions/xstest_v2_completions_{name}.csv",
               Path("xstest/labelled_completions") / f"{name}.csv") for name in XSTEST_COMPLETIONS]
    return files


def http_get(url: str) -> bytes:
    """The body of a GET request (urllib only, so downloading needs no extra dependency)."""
    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
        body: bytes = response.read()
        return body


def write_atomic(path: Path, data: bytes) -> None:
    """Write via a temporary file and rename, so an interrupted download never leaves a truncated file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def download_data(dest: Path, fetch: Callable[[str], bytes] = http_get, overwrite: bool = False) -> Path:
    """Download every benchmark file into `dest`; existing files are kept unless `overwrite`."""
    dest = Path(dest)
    for url, relative in manifest():
        target = dest / relative
        if target.exists() and not overwrite:
            continue
        try:
            data = fetch(url)
        except OSError as err:  # urllib's URLError and HTTPError are OSErrors
            raise QuantsafeError(f"download failed: {url} ({err})") from None
        try:
            write_atomic(target, data)
        except OSError as err:
            raise QuantsafeError(f"cannot write {target} ({err.strerror or err})") from None
    return dest

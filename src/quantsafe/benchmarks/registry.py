"""Benchmarks by name, so the study runner and CLI load any of them the same way."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from quantsafe.benchmarks.base import Prompt
from quantsafe.benchmarks.opensafetymini import load_opensafetymini
from quantsafe.benchmarks.sampling import stratified_sample
from quantsafe.benchmarks.xsafety import load_xsafety, validate_langs
from quantsafe.benchmarks.xstest import load_xstest_prompts
from quantsafe.datadir import resolve_data_dir
from quantsafe.errors import QuantsafeError


@dataclass(frozen=True)
class BenchmarkOptions:
    """What a loader may be asked for; langs=None means the benchmark's default (English)."""

    langs: tuple[str, ...] | None = None
    strict: bool = False


def _english_only(name: str, options: BenchmarkOptions) -> None:
    """OpenSafetyMini and XSTest are English-only: asking for another language is a mistake, not a no-op."""
    if options.langs is not None and set(options.langs) != {"en"}:
        raise QuantsafeError(f"{name} is English-only; got langs {', '.join(options.langs)}")


def _opensafetymini(data_dir: Path, options: BenchmarkOptions) -> list[Prompt]:
    _english_only("opensafetymini", options)
    return load_opensafetymini(data_dir, strict=options.strict)


def _xsafety(data_dir: Path, options: BenchmarkOptions) -> list[Prompt]:
    return load_xsafety(data_dir, langs=options.langs or ("en",), strict=options.strict)


def _xstest(data_dir: Path, options: BenchmarkOptions) -> list[Prompt]:
    _english_only("xstest", options)
    return load_xstest_prompts(data_dir, strict=options.strict)


BENCHMARKS: dict[str, Callable[[Path, BenchmarkOptions], list[Prompt]]] = {
    "opensafetymini": _opensafetymini,
    "xsafety": _xsafety,
    "xstest": _xstest,
}


def load_benchmark(name: str, data_dir: Path | str | None = None, *, langs: Iterable[str] | str | None = None,
                   limit: int | None = None, limit_per_scenario: int | None = None, seed: int = 0,
                   strict: bool = False) -> list[Prompt]:
    """Prompts of a named benchmark, optionally a seeded stratified subset; data_dir is resolved as usual."""
    if name not in BENCHMARKS:
        raise QuantsafeError(f"unknown benchmark '{name}'; known: {', '.join(BENCHMARKS)}")
    options = BenchmarkOptions(langs=None if langs is None else validate_langs(langs), strict=strict)
    prompts = BENCHMARKS[name](resolve_data_dir(data_dir), options)
    if limit is None and limit_per_scenario is None:
        return prompts
    return stratified_sample(prompts, limit_per_scenario=limit_per_scenario, limit=limit, seed=seed)

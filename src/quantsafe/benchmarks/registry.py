"""Benchmarks by name, found in this package: every module defining `DEFINITIONS` adds its benchmarks, so the
runner, the CLI and the report know a new one without an edit here."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable
from functools import cache
from pathlib import Path

import quantsafe.benchmarks as package
from quantsafe.benchmarks.base import BenchmarkDef, BenchmarkOptions, Prompt
from quantsafe.benchmarks.sampling import stratified_sample
from quantsafe.datadir import resolve_data_dir
from quantsafe.errors import QuantsafeError


@cache
def benchmarks() -> dict[str, BenchmarkDef]:
    """Every benchmark definition in the package, by name."""
    found: dict[str, BenchmarkDef] = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for definition in getattr(module, "DEFINITIONS", ()):
            if definition.name in found:
                raise RuntimeError(f"benchmark '{definition.name}' is defined twice ({info.name})")
            found[definition.name] = definition
    return found


def benchmark(name: str) -> BenchmarkDef:
    """A benchmark's definition; an unknown name is a user error listing the known ones."""
    known = benchmarks()
    if name not in known:
        raise QuantsafeError(f"unknown benchmark '{name}'; known: {', '.join(sorted(known))}")
    return known[name]


def _langs(definition: BenchmarkDef, langs: Iterable[str] | str | None) -> tuple[str, ...] | None:
    """Requested languages, deduplicated; one the benchmark does not have is a mistake, not a no-op."""
    if langs is None:
        return None
    requested = tuple(dict.fromkeys((langs,) if isinstance(langs, str) else langs))
    unknown = [lang for lang in requested if lang not in definition.languages]
    if unknown or not requested:
        has = ("is English-only" if definition.languages == ("en",)
               else f"has languages {', '.join(definition.languages)}")
        raise QuantsafeError(f"{definition.name} {has}; got langs {', '.join(requested) or '(none)'}")
    return requested


def load_benchmark(name: str, data_dir: Path | str | None = None, *, langs: Iterable[str] | str | None = None,
                   limit: int | None = None, limit_per_scenario: int | None = None, seed: int = 0,
                   strict: bool = False, permutations: int = 0) -> list[Prompt]:
    """Items of a named benchmark, optionally a seeded stratified subset; data_dir is resolved as usual."""
    definition = benchmark(name)
    options = BenchmarkOptions(langs=_langs(definition, langs), strict=strict, seed=seed, permutations=permutations)
    prompts = definition.load(resolve_data_dir(data_dir), options)
    if limit is None and limit_per_scenario is None:
        return prompts
    return stratified_sample(prompts, limit_per_scenario=limit_per_scenario, limit=limit, seed=seed)

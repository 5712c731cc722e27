"""Benchmarks: their items, kinds and metrics (one module each), plus sampling, download and a registry."""

from quantsafe.benchmarks.base import BenchmarkDef, BenchmarkOptions, Kind, Outcome, Prompt
from quantsafe.benchmarks.download import download_data
from quantsafe.benchmarks.opensafetymini import (
    EXPECTED_SCENARIO_COUNTS,
    EXPECTED_TOTAL,
    check_counts,
    judge_template_path,
    load_criteria,
    load_opensafetymini,
)
from quantsafe.benchmarks.registry import benchmark, benchmarks, load_benchmark
from quantsafe.benchmarks.sampling import stratified_sample
from quantsafe.benchmarks.scenarios import XSAFETY_SCENARIOS
from quantsafe.benchmarks.xsafety import (
    XSAFETY_LANGUAGES,
    check_xsafety_counts,
    load_xsafety,
    xsafety_counts,
)
from quantsafe.benchmarks.xstest import LabelledCompletion, load_xstest_completions, load_xstest_prompts

__all__ = [
    "EXPECTED_SCENARIO_COUNTS",
    "EXPECTED_TOTAL",
    "XSAFETY_LANGUAGES",
    "XSAFETY_SCENARIOS",
    "BenchmarkDef",
    "BenchmarkOptions",
    "Kind",
    "LabelledCompletion",
    "Outcome",
    "Prompt",
    "benchmark",
    "benchmarks",
    "check_counts",
    "check_xsafety_counts",
    "download_data",
    "judge_template_path",
    "load_benchmark",
    "load_criteria",
    "load_opensafetymini",
    "load_xsafety",
    "load_xstest_completions",
    "load_xstest_prompts",
    "stratified_sample",
    "xsafety_counts",
]

"""OpenSafetyMini: the paper's 1,067 filtered English XSafety prompts, judge criteria and judge template."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

from quantsafe.benchmarks._files import count_problems, read_csv_records, read_text, report, require
from quantsafe.benchmarks.base import BenchmarkDef, Kind, Prompt
from quantsafe.benchmarks.scenarios import XSAFETY_SCENARIOS
from quantsafe.errors import DataError

PROMPTS_FILE = Path("opensafetymini/OpenSafetyMini.csv")
CRITERIA_FILE = Path("opensafetymini/safety_criteria.json")
JUDGE_TEMPLATE_FILE = Path("opensafetymini/prompts/opensafetymini_llm_judge_evaluation_prompt_template.md")
COLUMNS = ("prompt_id", "lang", "scenario", "prompt")

# The released file's counts (paper reference note §2.1); the safety ratio's denominator is all 1,067.
EXPECTED_TOTAL = 1067
EXPECTED_SCENARIO_COUNTS: Mapping[str, int] = MappingProxyType({
    "Unsafe_Instruction_Topic": 189,
    "Goal_Hijacking": 181,
    "Crimes_And_Illegal_Activities": 172,
    "Unfairness_And_Discrimination": 149,
    "Role_Play_Instruction": 145,
    "Privacy_And_Property": 124,
    "Mental_Health": 73,
    "Reverse_Exposure": 34,
})


def load_opensafetymini(data_dir: Path, strict: bool = False) -> list[Prompt]:
    """All prompts in file order; count mismatches are logged (a subset is allowed) or raised when strict."""
    path = Path(data_dir) / PROMPTS_FILE
    prompts: list[Prompt] = []
    seen: set[str] = set()
    for row, record in read_csv_records(path, COLUMNS):
        values = {field: require(path, row, record, field) for field in COLUMNS}
        if values["scenario"] not in XSAFETY_SCENARIOS:
            raise DataError(path, f"unknown scenario '{values['scenario']}' "
                            f"(known: {', '.join(XSAFETY_SCENARIOS)})", row=row, field="scenario")
        if values["prompt_id"] in seen:
            raise DataError(path, f"duplicate prompt_id '{values['prompt_id']}'", row=row, field="prompt_id")
        seen.add(values["prompt_id"])
        prompts.append(Prompt(benchmark="opensafetymini", prompt_id=values["prompt_id"], lang=values["lang"],
                              scenario=values["scenario"], text=values["prompt"]))
    check_counts(prompts, strict=strict, source=path)
    return prompts


def check_counts(prompts: Sequence[Prompt], strict: bool = False, source: Path = PROMPTS_FILE) -> list[str]:
    """Differences from the release's total and per-scenario counts; raises DataError when strict."""
    problems = count_problems(Counter(p.scenario for p in prompts), EXPECTED_SCENARIO_COUNTS, "scenario")
    if len(prompts) != EXPECTED_TOTAL:
        problems.insert(0, f"{len(prompts)} prompts in total, expected {EXPECTED_TOTAL}")
    return report(problems, strict, source)


def load_criteria(data_dir: Path) -> dict[str, str]:
    """Scenario -> criterion text the judge is given; all 14 XSafety scenarios must be present."""
    path = Path(data_dir) / CRITERIA_FILE
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise DataError(path, f"invalid JSON at line {err.lineno} ({err.msg})") from None
    if not isinstance(data, dict):
        raise DataError(path, "expected a JSON object mapping scenario names to criteria")
    for scenario in XSAFETY_SCENARIOS:
        if scenario not in data:
            raise DataError(path, "missing scenario", field=scenario)
    for key, value in data.items():
        if key not in XSAFETY_SCENARIOS:
            raise DataError(path, f"unknown scenario (known: {', '.join(XSAFETY_SCENARIOS)})", field=key)
        if not isinstance(value, str) or not value.strip():
            raise DataError(path, "criterion must be a non-empty string", field=key)
    return {key: data[key] for key in XSAFETY_SCENARIOS}


def judge_template_path(data_dir: Path) -> Path | None:
    """The release's LLM-judge template if the data dir has it; None lets the judge decide what to do."""
    path = Path(data_dir) / JUDGE_TEMPLATE_FILE
    return path if path.is_file() else None


DEFINITIONS = (BenchmarkDef(name="opensafetymini", kind=Kind.JUDGED, title="OpenSafetyMini", question="safety",
                            load=lambda data_dir, o: load_opensafetymini(data_dir, strict=o.strict)),)

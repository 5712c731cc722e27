"""Judge prompt templates: the official OpenSafetyMini template when the data dir has it, our own otherwise.

Templates are data, loaded at run time (the official text is never copied into code). Both use Python
`str.format` with the fields SCENARIO, SCENARIO_INSTRUCTIONS, PROMPT, RESPONSE and ask for the same JSON
answer, so the parser and the fast-mode pre-fill work with either. The template's hash goes into every
judge id.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from quantsafe.errors import DataError
from quantsafe.hashing import stable_hash

OFFICIAL_TEMPLATE_RELPATH = Path(
    "opensafetymini/prompts/opensafetymini_llm_judge_evaluation_prompt_template.md"
)
SAFETY_FIELDS = frozenset({"SCENARIO", "SCENARIO_INSTRUCTIONS", "PROMPT", "RESPONSE"})
REFUSAL_FIELDS = frozenset({"PROMPT", "RESPONSE"})


def _fields(text: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}


@dataclass(frozen=True)
class JudgeTemplate:
    """A `str.format` template plus where it came from; `sha` identifies the exact text."""

    text: str
    source: str  # "official" | "default" | a file path
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", stable_hash(self.text))

    @property
    def fields(self) -> set[str]:
        return _fields(self.text)

    def fill(self, **values: str) -> str:
        """Fill the template; values are inserted verbatim (braces in them are safe)."""
        missing = self.fields - values.keys()
        if missing:
            raise ValueError(f"template {self.source} needs fields {sorted(missing)}")
        return self.text.format(**values)

    def fill_item(self, scenario: str, criterion: str, prompt: str, response: str) -> str:
        """Fill a safety template for one judge item."""
        return self.fill(SCENARIO=scenario, SCENARIO_INSTRUCTIONS=criterion, PROMPT=prompt, RESPONSE=response)


def _package_text(name: str) -> str:
    return resources.files("quantsafe.judges").joinpath(name).read_text(encoding="utf-8")


def default_template() -> JudgeTemplate:
    """Our own wording of the safety judge prompt, same fields and same JSON answer as the official one."""
    return JudgeTemplate(_package_text("default_template.md"), "default")


def refusal_template() -> JudgeTemplate:
    """Our refusal-vs-compliance prompt (fields PROMPT, RESPONSE) for XSTest-style refusal classification."""
    return JudgeTemplate(_package_text("default_refusal_template.md"), "default-refusal")


def template_from_file(path: Path | str, required: frozenset[str] = SAFETY_FIELDS) -> JudgeTemplate:
    """Load a template file, checking it has exactly the fields a safety judge fills."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise DataError(p, f"cannot read judge template: {e}") from e
    try:
        found = _fields(text)
    except ValueError as e:
        raise DataError(p, f"not a valid str.format template: {e}") from e
    if found != required:
        raise DataError(p, f"template fields are {sorted(found)}, expected {sorted(required)}")
    return JudgeTemplate(text, str(p))


def load_template(data_dir: Path | str | None = None) -> JudgeTemplate:
    """The official template from `data_dir` if it is there, else the packaged default.

    `data_dir` is the data root (holding `opensafetymini/prompts/...`) or the folder holding the .md itself.
    """
    if data_dir is not None:
        root = Path(data_dir)
        for candidate in (
            root / OFFICIAL_TEMPLATE_RELPATH,
            root / OFFICIAL_TEMPLATE_RELPATH.name,
            root / "prompts" / OFFICIAL_TEMPLATE_RELPATH.name,
        ):
            if candidate.is_file():
                t = template_from_file(candidate)
                return JudgeTemplate(t.text, "official")
    return default_template()

"""Instruction pools for finding a refusal direction, read from the data directory (nothing is downloaded).

Harmful: XSTest's 200 unsafe (contrast) prompts and the English XSafety prompts of its two scenarios that are
plainly requests for harm (crimes, unsafe instructions). Harmless: short requests about the WikiText-2 validation
articles' titles and section headings: benign, varied in topic, close in length and form to the harmful ones, and
asked by no benchmark. A user's own .txt (one instruction a line) or .json (a list of strings) file can replace or
extend either side. The instructions must not overlap the prompts a study evaluates, hence `exclude`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Collection, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from quantsafe.benchmarks._files import read_text
from quantsafe.benchmarks.xsafety import load_xsafety
from quantsafe.benchmarks.xstest import load_xstest_prompts
from quantsafe.errors import DataError, QuantsafeError
from quantsafe.hashing import stable_hash
from quantsafe.quantization.calibration import WIKITEXT_DIRS

if TYPE_CHECKING:
    from quantsafe.interventions.abliteration import AbliterationConfig

XSAFETY_HARMFUL_SCENARIOS = ("Crimes_And_Illegal_Activities", "Unsafe_Instruction_Topic")
"""The XSafety scenarios whose prompts ask for harm outright; the others (mental health, ethics, prompt leaking,
insults...) are mostly benign questions whose unsafety lies in how one answers, which is not what refusal is."""
FILE_SUFFIXES = (".txt", ".json")

_TITLE = re.compile(r" = ([^=].*?) = ")
_SECTION = re.compile(r" (?:= ){2,3}([^=].*?)(?: =){2,3} ")
_DETOKENIZE = ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" 's", "'s"), (" ,", ","), (" :", ":"),
               (" ;", ";"), ("( ", "("), (" )", ")"))
_TEMPLATES = ("Write a short paragraph about {subject}.", "What do you know about {subject}?",
              "Give me three facts about {subject}.", "Tell me about {subject}.", "Summarize {subject}.")


def normalize_text(text: str) -> str:
    """The form two prompts are compared in: case-folded, whitespace runs collapsed."""
    return " ".join(text.casefold().split())


def xstest_unsafe(data_dir: Path) -> list[str]:
    return [p.text for p in load_xstest_prompts(data_dir) if p.label == "unsafe"]


def xsafety_en_harmful(data_dir: Path) -> list[str]:
    return [p.text for p in load_xsafety(data_dir, ("en",)) if p.scenario in XSAFETY_HARMFUL_SCENARIOS]


def _detokenize(text: str) -> str:
    for old, new in _DETOKENIZE:
        text = text.replace(old, new)
    return text.strip()


def _subject(title: str, section: str | None) -> str:
    """"Meridian, Mississippi: Transportation"; headings keep their case (many start with a name)."""
    return title if section is None else f"{title}: {section}"


def _instruction(subject: str) -> str:
    """A template picked by the subject's hash, so an instruction's text never depends on which others exist."""
    return _TEMPLATES[int(stable_hash(subject), 16) % len(_TEMPLATES)].format(subject=subject)


def wikitext2_headings(data_dir: Path) -> list[str]:
    """One request per article title and per section heading of the WikiText-2 validation split; headings with
    an `<unk>` (a word the release masked) are skipped, as are sections of articles whose title has one."""
    path = next((Path(data_dir) / sub / f"wiki.valid.{ext}" for sub, ext in WIKITEXT_DIRS
                 if (Path(data_dir) / sub / f"wiki.valid.{ext}").is_file()), None)
    if path is None:
        raise DataError(Path(data_dir) / WIKITEXT_DIRS[0][0], "wiki.valid.tokens not found (WikiText-2 headings "
                        "are the default harmless instructions)")
    out: list[str] = []
    title: str | None = None
    for line in read_text(path).splitlines():
        if match := _TITLE.fullmatch(line):
            title = None if "<unk>" in match.group(1) else _detokenize(match.group(1))
            if title:
                out.append(_instruction(_subject(title, None)))
        elif (match := _SECTION.fullmatch(line)) and title and "<unk>" not in match.group(1):
            out.append(_instruction(_subject(title, _detokenize(match.group(1)))))
    if not out:
        raise DataError(path, "no article titles or section headings (' = Title = ' lines)")
    return out


BUILTIN_SOURCES: dict[str, Callable[[Path], list[str]]] = {
    "xstest-unsafe": xstest_unsafe,
    "xsafety-en-harmful": xsafety_en_harmful,
    "wikitext2-headings": wikitext2_headings,
}
DEFAULT_HARMFUL_SOURCES = ("xstest-unsafe", "xsafety-en-harmful")
DEFAULT_HARMLESS_SOURCES = ("wikitext2-headings",)


def check_source(source: str) -> str:
    """A built-in source name or a path to a .txt/.json file; anything else is a user error."""
    if source in BUILTIN_SOURCES or source.lower().endswith(FILE_SUFFIXES):
        return source
    raise ValueError(f"unknown instruction source '{source}' (built-in: {', '.join(BUILTIN_SOURCES)}; "
                     "or a .txt file with one instruction a line, or a .json list of strings)")


def read_instruction_file(path: Path) -> list[str]:
    """A user's instructions: .txt one a line (blank lines skipped) or .json, a list of non-empty strings."""
    text = read_text(path)
    if path.suffix.lower() == ".txt":
        items = [line.strip() for line in text.splitlines() if line.strip()]
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(path, f"not valid JSON ({err.msg}, line {err.lineno})") from None
        if not isinstance(data, list):
            raise DataError(path, f"expected a JSON list of strings, found {type(data).__name__}")
        for index, item in enumerate(data):
            if not isinstance(item, str) or not item.strip():
                raise DataError(path, f"item {index}: expected a non-empty string, found {item!r:.60}")
        items = [item.strip() for item in data]
    if not items:
        raise DataError(path, "no instructions")
    return items


def load_source(source: str, data_dir: Path) -> list[str]:
    """The instructions of one source, in its own order."""
    if source in BUILTIN_SOURCES:
        return BUILTIN_SOURCES[source](data_dir)
    return read_instruction_file(Path(check_source(source)).expanduser())


def instruction_pool(sources: Iterable[str], data_dir: Path) -> list[str]:
    """Every source's instructions in order, each normalised text once."""
    seen: set[str] = set()
    pool = []
    for source in sources:
        for text in load_source(source, data_dir):
            key = normalize_text(text)
            if key not in seen:
                seen.add(key)
                pool.append(text)
    return pool


def select_instructions(data_dir: Path, cfg: AbliterationConfig, exclude: Collection[str],
                        ) -> tuple[list[str], list[str]]:
    """`cfg.n_instructions` harmful and harmless instructions, none equal (normalised) to a text in `exclude`.

    Picks are the n lowest seeded hashes of the normalised texts: deterministic, independent of source order,
    and excluding one more prompt changes at most one pick."""
    excluded = {normalize_text(text) for text in exclude}
    picked = []
    for side, sources in (("harmful", cfg.harmful_sources), ("harmless", cfg.harmless_sources)):
        pool = [text for text in instruction_pool(sources, data_dir) if normalize_text(text) not in excluded]
        if len(pool) < cfg.n_instructions:
            raise QuantsafeError(
                f"abliteration: only {len(pool)} {side} instructions in {', '.join(sources)} are not among the "
                f"study's prompts; {cfg.n_instructions} needed (lower n_instructions or add a .txt/.json source)")
        pool.sort(key=lambda text: stable_hash([cfg.seed, normalize_text(text)]))
        picked.append(pool[: cfg.n_instructions])
    return picked[0], picked[1]

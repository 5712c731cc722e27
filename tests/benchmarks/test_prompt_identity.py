"""Prompts are keyed by their content: an edited data file never reuses old generations or verdicts."""

from pathlib import Path

from quantsafe.benchmarks import Prompt, load_opensafetymini, stratified_sample


def _prompt(text: str, scenario: str = "Mental_Health") -> Prompt:
    return Prompt(benchmark="opensafetymini", prompt_id="7", lang="en", scenario=scenario, text=text)


def test_uid_is_a_content_hash_and_human_id_stays() -> None:
    a, edited, moved = _prompt("How do I feel better?"), _prompt("How do I feel worse?"), _prompt(
        "How do I feel better?", scenario="Insult")
    assert a.human_id == edited.human_id == "opensafetymini/en/7"
    assert len({a.uid, edited.uid, moved.uid}) == 3  # text or scenario (the judge's criterion) changed
    assert a.uid == _prompt("How do I feel better?").uid


def test_edited_file_changes_uids_but_not_the_sample(tmp_path: Path, data_dir: Path) -> None:
    original = (data_dir / "opensafetymini" / "OpenSafetyMini.csv").read_text(encoding="utf-8")
    (tmp_path / "opensafetymini").mkdir()
    lines = original.splitlines()
    lines[1] = lines[1].rstrip()[:-1] + ' (edited)"'  # inside the closing quote
    (tmp_path / "opensafetymini" / "OpenSafetyMini.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    before, after = load_opensafetymini(data_dir), load_opensafetymini(tmp_path)
    changed = [(b, a) for b, a in zip(before, after, strict=True) if b.uid != a.uid]
    assert len(changed) == 1 and changed[0][0].human_id == changed[0][1].human_id
    pick = [p.human_id for p in stratified_sample(before, limit_per_scenario=3, seed=1)]
    assert pick == [p.human_id for p in stratified_sample(after, limit_per_scenario=3, seed=1)]

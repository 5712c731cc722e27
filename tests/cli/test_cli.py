"""Bad input at the command line: one line naming the problem, exit code 2, no traceback, nothing written."""

import subprocess
import sys
from pathlib import Path

import pytest


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "quantsafe", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def _study(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(body)
    return path


@pytest.mark.parametrize(("body", "needle"), [
    ("name: x\nbenchmarks: [{name: opensafetymini}]\njudges: [{kind: heuristic}]\nmodles: [a]\n", "modles"),
    ("name: x\nbenchmarks: [{name: opensafetymini}]\njudges: [{kind: heuristic}]\n"
     "variants: [{method: rtn, bits: 1}]\n", "variants.0.bits"),
    ("name: x\nbenchmarks: [{name: opensafetymini}]\njudges: [{kind: heuristic}]\nmodels: [/no/such/model]\n",
     "/no/such/model"),
])
def test_run_with_bad_study_fails_cleanly(tmp_path: Path, data_dir: Path, body: str, needle: str) -> None:
    out = tmp_path / "out"
    proc = _run("run", str(_study(tmp_path, body)), "--out", str(out), "--data-dir", str(data_dir))
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (out / "report.md").exists()


def test_missing_data_dir_and_bad_data(tmp_path: Path) -> None:
    body = "name: x\nbenchmarks: [{name: opensafetymini}]\njudges: [{kind: heuristic}]\nmodels: [smollm2-135m]\n"
    proc = _run("run", str(_study(tmp_path, body)), "--out", str(tmp_path / "o"), "--data-dir", str(tmp_path / "nd"))
    assert proc.returncode == 2 and "data directory does not exist" in proc.stderr
    bad = tmp_path / "data" / "opensafetymini"
    bad.mkdir(parents=True)
    (bad / "OpenSafetyMini.csv").write_text("prompt_id,lang,prompt\n1,en,hello\n")
    proc = _run("data", "check", "--data-dir", str(tmp_path / "data"))
    assert proc.returncode == 2 and "OpenSafetyMini.csv" in proc.stderr and "scenario" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_help_on_every_command() -> None:
    for args in (["--help"], ["run", "--help"], ["report", "--help"], ["export", "--help"], ["quantize", "--help"],
                 ["data", "check", "--help"], ["data", "download", "--help"], ["models", "list", "--help"],
                 ["models", "prepare", "--help"]):
        proc = _run(*args)
        assert proc.returncode == 0 and "Usage" in proc.stdout, args


def test_quantize_rejects_bits_out_of_range() -> None:
    proc = _run("quantize", "smollm2-135m", "--method", "rtn", "--bits", "9")
    assert proc.returncode == 2 and "bits" in proc.stderr and "Traceback" not in proc.stderr


def test_unknown_quantizer_in_study(tmp_path: Path, data_dir: Path) -> None:
    body = ("name: x\nbenchmarks: [{name: opensafetymini}]\njudges: [{kind: heuristic}]\n"
            "variants: [{method: nosuch, bits: 4}]\n")
    proc = _run("run", str(_study(tmp_path, body)), "--out", str(tmp_path / "o"), "--data-dir", str(data_dir))
    assert proc.returncode == 2 and "variants.0" in proc.stderr and "nosuch" in proc.stderr
    assert not (tmp_path / "o").exists()


HEURISTIC = "name: x\nbenchmarks: [{name: opensafetymini, limit: 2}]\njudges: [{kind: heuristic}]\n" \
            "models: [smollm2-135m]\n"


def _linked_data(tmp_path: Path, data_dir: Path) -> Path:
    """A data dir that shares the real files but lets a test replace one of them."""
    root = tmp_path / "data"
    root.mkdir()
    for child in data_dir.iterdir():
        (root / child.name).symlink_to(child)
    return root


def _fails_cleanly(proc: subprocess.CompletedProcess[str], needle: str, out: Path) -> None:
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (out / "quantsafe.db").exists()


@pytest.mark.parametrize(("body", "needle"), [
    ("name: x\nbenchmarks: [{name: opensafetymini}]\njudges: [{kind: heuristic}]\nvariants: []\n", "variants"),
    ("name: x\nbenchmarks: []\njudges: [{kind: heuristic}]\n", "benchmarks"),
    ("name: x\nbenchmarks: [{name: opensafetymini}]\njudges: []\n", "judges"),
    (HEURISTIC + "validation: {sets: [no_such_file]}\n", "no_such_file"),
    (HEURISTIC.replace("[{kind: heuristic}]", "[{kind: llm, model: /no/judge}]"), "/no/judge"),
])
def test_study_problems_are_found_before_anything_runs(tmp_path: Path, data_dir: Path, body: str,
                                                      needle: str) -> None:
    out = tmp_path / "out"
    _fails_cleanly(_run("run", str(_study(tmp_path, body)), "--out", str(out), "--data-dir", str(data_dir)),
                   needle, out)


def test_out_under_a_file(tmp_path: Path, data_dir: Path) -> None:
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "out"
    proc = _run("run", str(_study(tmp_path, HEURISTIC)), "--out", str(out), "--data-dir", str(data_dir))
    _fails_cleanly(proc, "is a file", out)


def test_model_dir_without_tokenizer(tmp_path: Path, data_dir: Path) -> None:
    from quantsafe.models import resolve_model

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text((resolve_model("smollm2-135m").path / "config.json").read_text())
    body = HEURISTIC.replace("models: [smollm2-135m]", f"models: [{model}]")
    out = tmp_path / "out"
    _fails_cleanly(_run("run", str(_study(tmp_path, body)), "--out", str(out), "--data-dir", str(data_dir)),
                   str(model), out)


def test_broken_judge_template_is_found_before_generation(tmp_path: Path, data_dir: Path) -> None:
    root = _linked_data(tmp_path, data_dir)
    (root / "opensafetymini").unlink()
    osm = root / "opensafetymini"
    osm.mkdir()
    for child in (data_dir / "opensafetymini").iterdir():
        if child.name != "prompts":
            (osm / child.name).symlink_to(child)
    (osm / "prompts").mkdir()
    (osm / "prompts" / "opensafetymini_llm_judge_evaluation_prompt_template.md").write_text("no fields {PROMPT}")
    body = HEURISTIC.replace("[{kind: heuristic}]", "[{kind: llm, model: smollm2-135m}]")
    out = tmp_path / "out"
    _fails_cleanly(_run("run", str(_study(tmp_path, body)), "--out", str(out), "--data-dir", str(root)),
                   "template", out)


@pytest.mark.parametrize("command", ["report", "export"])
def test_corrupt_or_missing_database(tmp_path: Path, command: str) -> None:
    proc = _run(command, str(tmp_path))
    assert proc.returncode == 2 and "no results database" in proc.stderr and "Traceback" not in proc.stderr
    (tmp_path / "quantsafe.db").write_bytes(b"this is not sqlite" * 100)
    proc = _run(command, str(tmp_path))
    assert proc.returncode == 2 and "quantsafe.db" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_judge_validate_heuristic_on_shared_and_own_sets(tmp_path: Path, data_dir: Path) -> None:
    import csv
    import json

    own = tmp_path / "mine.csv"
    with (data_dir / "xstest/labelled_completions/gpt4.csv").open(newline="") as src, own.open("w", newline="") as f:
        rows = list(csv.DictReader(src))[:40]
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    out = tmp_path / "rows.json"
    proc = _run("judge", "validate", "--kind", "heuristic", "--set", "mistralinstruct_even_ids", "--set", str(own),
                "--out", str(out), "--data-dir", str(data_dir))
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())
    assert [(r["set"], r["mapping"]) for r in rows] == [("mistralinstruct_even_ids", "refusal"),
                                                        ("mistralinstruct_even_ids", "safety"),
                                                        ("mine", "refusal"), ("mine", "safety")]
    assert rows[2]["n"] == 40 and rows[0]["kappa_ci"] and rows[0]["by_type"]
    assert "per XSTest type" in proc.stdout and "contrast_" in proc.stdout


@pytest.mark.parametrize(("args", "needle"), [
    (["--set", "nope"], "unknown labelled set 'nope'"),
    (["--set", "/no/such.csv"], "/no/such.csv"),
    (["--mapping", "harm"], "--mapping must be refusal or safety"),
    (["--kind", "oracle"], "judge options"),
])
def test_judge_validate_bad_input_is_one_line(data_dir: Path, args: list[str], needle: str) -> None:
    proc = _run("judge", "validate", "--data-dir", str(data_dir), *args)
    assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr


def test_quantize_passes_only_what_was_given() -> None:
    from quantsafe.cli.main import cli_quant_spec
    from quantsafe.errors import QuantsafeError
    from quantsafe.quantization import QuantConfig

    rtn = QuantConfig.from_dict(cli_quant_spec("rtn", 4, 0, None, 128, 512))
    assert rtn.group_size is None and rtn.calibration is None  # rtn takes no calibration
    quik = QuantConfig.from_dict(cli_quant_spec("quik", 4, None, '{"outliers": 8}', 16, 256))
    assert (quik.group_size, quik.sym, quik.options["outliers"]) == (None, True, 8)
    assert quik.calibration is not None and quik.calibration.n_samples == 16
    with pytest.raises(QuantsafeError, match=r"^--options: not valid JSON"):
        cli_quant_spec("gptq", 4, None, "{nope", 16, 256)


def test_data_check_lists_every_benchmark(data_dir: Path) -> None:
    proc = _run("data", "check", "--data-dir", str(data_dir))
    assert proc.returncode == 0, proc.stderr
    assert "HotPotQA [hotpotqa, reference]: 53 items" in proc.stdout
    assert "SafetyBench (offline dev, leave-one-out) [safetybench-dev, choice]: 35 items" in proc.stdout
    assert "[safetybench]: not available: " in proc.stdout and "safetybench-dev" in proc.stdout  # no test file here

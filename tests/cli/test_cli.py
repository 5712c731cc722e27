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

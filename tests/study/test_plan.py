"""`quantsafe plan`: sizes from names, item counts from the data, what a store holds, hours per device kind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from quantsafe.errors import QuantsafeError
from quantsafe.study import StudyConfig
from quantsafe.study.plan import DEFAULT_KINDS, make_plan, model_params
from quantsafe.study.runner import run_study

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("ref", "billions"), [
    ("meta-llama/Llama-3.1-8B-Instruct", 8.0), ("mistralai/Mistral-7B-Instruct-v0.2", 7.0),
    ("Qwen/Qwen2.5-1.5B-Instruct", 1.5), ("google/gemma-2-27b-it", 27.0), ("qwen2.5-coder-0.5b", 0.5),
    ("smollm2-135m", 0.135),
])
def test_model_size_from_its_name(ref: str, billions: float) -> None:
    assert model_params(ref) == pytest.approx(billions)


def test_a_name_without_a_size_is_one_line() -> None:
    with pytest.raises(QuantsafeError, match="cannot tell the size of model 'my-model'"):
        model_params("my-model")


def _config(data_dir: Path, tmp_path: Path) -> StudyConfig:
    return StudyConfig.model_validate({
        "name": "p", "models": ["smollm2-135m"], "data_dir": str(data_dir), "artifacts_dir": str(tmp_path / "a"),
        "variants": [{"method": "none"}, {"method": "gptq", "bits": 4}],
        "benchmarks": [{"name": "opensafetymini", "limit": 4}, {"name": "safetybench-dev"}],
        "decoding": {"max_new_tokens": 4, "batch_size": 4},
        "judges": [{"kind": "heuristic"}, {"kind": "trained"}], "validation": None,
    })


def test_plan_counts_items_and_scales_with_the_device(data_dir: Path, tmp_path: Path) -> None:
    plan = make_plan(_config(data_dir, tmp_path), kinds=DEFAULT_KINDS)
    stages = {(line.stage.split()[0], line.stage.split()[1]): line for line in plan.lines}
    assert stages[("generate", "bf16")].items == 4 and stages[("score", "bf16")].items == 35
    assert ("quantize", "gptq-w4-g128") in stages and ("quantize", "bf16") not in stages
    assert [line.stage for line in plan.lines if line.stage.startswith("judge")] == [
        "judge bf16 (trained/fast)", "judge gptq-w4-g128 (trained/fast)"]  # the regex judge costs nothing
    totals = plan.totals()
    assert totals["H100"] < totals["A40"] < totals["CPU 2 cores AVX512-BF16"] < totals["CPU 2 cores AVX2"]
    assert all(line.done is None for line in plan.lines)


def test_plan_counts_what_the_store_holds(data_dir: Path, tmp_path: Path) -> None:
    cfg = _config(data_dir, tmp_path).model_copy(update={
        "variants": _config(data_dir, tmp_path).variants[:1], "benchmarks": _config(data_dir, tmp_path).benchmarks[:1]})
    run_study(cfg, tmp_path / "out", Console(quiet=True))
    plan = make_plan(cfg, tmp_path / "out", kinds=DEFAULT_KINDS)
    generate = next(line for line in plan.lines if line.stage.startswith("generate"))
    judge = next(line for line in plan.lines if line.stage.startswith("judge"))
    assert (generate.items, generate.done) == (4, 4)
    assert (judge.stage, judge.items, judge.done) == ("judge bf16 (trained/fast)", 4, 4)  # not the regex judge's


@pytest.mark.parametrize("study", ["paper.yaml", "small-grid.yaml"])
def test_cli_plans_the_shipped_studies(study: str, data_dir: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "quantsafe", "plan", str(REPO / "studies" / study),
                           "--data-dir", str(data_dir)], capture_output=True, text=True, timeout=300,
                          env={"COLUMNS": "250", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "total" in proc.stdout and "A40" in proc.stdout and "quantize" in proc.stdout


def test_measure_times_this_machine_and_the_plan_uses_it(data_dir: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from quantsafe.study import plan as plan_module

    monkeypatch.setattr(plan_module, "_rates_file", lambda: tmp_path / "throughput.json")
    kind = plan_module.measure("smollm2-135m", device="cpu")
    assert kind.name == "this machine" and kind.cpu and kind.prefill_flops > 0 and 0 < kind.decode_share <= 1
    assert "prefill" in kind.source and "cpu" in kind.source
    assert plan_module.measured_kinds() == [kind]
    plan = make_plan(_config(data_dir, tmp_path))
    assert plan.kinds[0].name == "this machine" and plan.totals()["this machine"] > 0

"""scripts/gpu_check.sh on the CPU with tiny sizes: the command a lent GPU will run, end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gpu_check.sh"
TINY = ["--device", "cpu", "--n-prompts", "4", "--max-new-tokens", "8", "--batch-size", "4",
        "--calib-samples", "4", "--calib-len", "64"]


def _run(*args: str, python: str = sys.executable) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHON": python}
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=120, check=False)


def test_random_init_from_a_skeleton_runs_every_stage_on_the_cpu(tmp_path: Path, data_dir: Path) -> None:
    skeleton = tmp_path / "skeleton"
    saved = _run("--save-skeleton", str(skeleton), "--model", "smollm2-135m")
    assert saved.returncode == 0, saved.stderr
    assert (skeleton / "config.json").is_file() and not list(skeleton.glob("*.safetensors"))
    config = json.loads((skeleton / "config.json").read_text())
    (skeleton / "config.json").write_text(json.dumps(config | {"num_hidden_layers": 2}))  # seconds, not a minute
    out = tmp_path / "gpu.json"
    done = _run(*TINY, "--random-init", "--model", str(skeleton), "--data-dir", str(data_dir), "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["random_init"] and "random weights" in result["note"]
    assert result["n_prompts"] == 4 and result["gptq"]["bits"] == 4 and result["gptq"]["seconds"] > 0
    assert 0 < result["generation"]["new_tokens"] <= 4 * 8 and result["generation"]["tokens_per_s"] > 0
    assert result["judge_fast_on_device"]["items_per_s"] > 0 and result["judge_fast_on_device"]["model_calls"] == 4
    # the same weights, device and dtype twice: the verdicts must be identical
    assert result["verdict_agreement"] == {**result["verdict_agreement"], "same": 4, "of": 4, "share": 1.0}


def test_a_missing_package_is_one_clear_line(tmp_path: Path) -> None:
    bare = tmp_path / "python"
    bare.write_text(f"#!/bin/sh\nexec {sys.executable} -S \"$@\"\n")  # no site-packages: torch and all are gone
    bare.chmod(0o755)
    done = _run("--device", "cpu", python=str(bare))
    assert done.returncode != 0
    assert done.stderr.strip() == "gpu_check: missing Python package 'torch'; install it (pip install torch) and rerun"


def test_a_random_init_without_a_skeleton_is_one_clear_line(tmp_path: Path, data_dir: Path) -> None:
    done = _run(*TINY, "--random-init", "--model", str(tmp_path), "--data-dir", str(data_dir))
    assert done.returncode == 1
    assert done.stderr.strip().startswith("gpu_check: --random-init needs --model to be a directory with config.json")
    assert "\n" not in done.stderr.strip()

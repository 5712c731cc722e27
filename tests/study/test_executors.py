"""The Ray executor against the in-process one on a local 2-CPU Ray cluster: the same rows, a worker killed
mid-task retried with nothing lost or duplicated, and a driver killed mid-run resumed by a rerun."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
import yaml
from rich.console import Console

from quantsafe.errors import QuantsafeError
from quantsafe.study import StudyConfig
from quantsafe.study.executors import LocalExecutor, RayExecutor, make_executor
from quantsafe.study.runner import run_study

pytest.importorskip("ray")


def _config(data_dir: Path, artifacts: Path) -> dict[str, Any]:
    return {
        "name": "grid", "models": ["smollm2-135m"], "data_dir": str(data_dir), "artifacts_dir": str(artifacts),
        "variants": [{"method": "none"}, {"method": "rtn", "bits": 4, "group_size": 64}],
        "benchmarks": [{"name": "opensafetymini", "limit_per_scenario": 5},  # 40 items: two chunks per variant
                       {"name": "xstest", "limit": 6}],
        "decoding": {"max_new_tokens": 8, "batch_size": 8},
        "judges": [{"kind": "heuristic"}, {"kind": "fake"}],
        "validation": {"sets": ["mistralinstruct_even_ids"], "limit_per_set": 12},
    }


def _rows(out: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every result row of a study's store, without timestamps, in a stable order."""
    queries = {
        "generations": "SELECT variant_id, prompt_uid, decoding_id, response, n_new_tokens FROM generations",
        "judgments": "SELECT variant_id, prompt_uid, judge_id, response_sha, verdict FROM judgments",
        "refusals": "SELECT variant_id, prompt_uid, refusal_id, refused FROM refusals",
        "agreement": "SELECT judge_id, set_name, mapping, row_json FROM agreement",
    }
    with sqlite3.connect(out / "quantsafe.db") as conn:
        rows = {table: sorted(conn.execute(query).fetchall()) for table, query in queries.items()}
    rows["agreement"] = [(*key, {k: v for k, v in json.loads(row).items() if k != "items_per_s"})  # a timing
                         for *key, row in rows["agreement"]]
    return rows


@pytest.fixture(scope="module")
def local_run(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("executors")
    run_study(StudyConfig.model_validate(_config(data_dir, root / "artifacts")), root / "local", Console(quiet=True),
              LocalExecutor(threads=2))
    return root, root / "local"


def _ray_workers(task: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if cmd.startswith(f"ray::{task}"):
            found.append(p)
    return found


def test_ray_gives_the_local_rows_and_survives_a_killed_worker(
        local_run: tuple[Path, Path], data_dir: Path) -> None:
    root, local = local_run
    cfg = StudyConfig.model_validate(_config(data_dir, root / "artifacts"))
    killed: list[int] = []
    stop = threading.Event()

    def kill_one_generation_worker() -> None:
        while not stop.is_set() and not killed:
            for proc in _ray_workers("generate_cell"):
                proc.send_signal(signal.SIGKILL)
                killed.append(proc.pid)
                return
            time.sleep(0.02)

    watcher = threading.Thread(target=kill_one_generation_worker)
    watcher.start()
    try:
        run_study(cfg, root / "ray", Console(quiet=True), RayExecutor(num_cpus=2, cpus_per_task=2))
    finally:
        stop.set()
        watcher.join()
    assert killed, "no generation task was seen running, so none was killed"
    assert _rows(root / "ray") == _rows(local)
    assert (root / "ray" / "scores.csv").read_text() == (local / "scores.csv").read_text()
    assert (root / "ray" / "metrics.csv").read_text() == (local / "metrics.csv").read_text()


def test_killed_driver_resumes_on_rerun(local_run: tuple[Path, Path], data_dir: Path) -> None:
    root, local = local_run
    study = root / "study.yaml"
    study.write_text(yaml.safe_dump(_config(data_dir, root / "artifacts")))
    out = root / "driver"
    cmd = [sys.executable, "-m", "quantsafe", "run", str(study), "--out", str(out), "--executor", "ray",
           "--num-cpus", "2", "--cpus-per-task", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    db = out / "quantsafe.db"
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if db.exists():
                with sqlite3.connect(db) as conn:
                    try:
                        if conn.execute("SELECT COUNT(*) FROM generations").fetchone()[0] > 0:
                            break
                    except sqlite3.OperationalError:
                        pass
            time.sleep(0.1)
        assert proc.poll() is None, "the run ended before it could be killed"
    finally:
        cluster = psutil.Process(proc.pid).children(recursive=True)  # the Ray cluster this driver started
        os.killpg(proc.pid, signal.SIGKILL)
        for child in cluster:
            if child.is_running():
                child.kill()
        proc.wait()
    with sqlite3.connect(db) as conn:
        partial = conn.execute("SELECT COUNT(*) FROM generations").fetchone()[0]
    assert 0 < partial < len(_rows(local)["generations"])
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert _rows(out) == _rows(local)
    assert (out / "scores.csv").read_text() == (local / "scores.csv").read_text()


def test_unknown_executor_is_one_line() -> None:
    with pytest.raises(QuantsafeError, match="unknown executor 'dask'"):
        make_executor("dask")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only answer")
def test_auto_device_is_where_cells_run_and_a_missing_gpu_is_one_line() -> None:
    assert LocalExecutor().device("auto") == "cpu"
    with pytest.raises(QuantsafeError, match="sees no CUDA GPU"):
        LocalExecutor().device("cuda")

"""A study whose model under test and judge are both served over HTTP by a real llama.cpp server."""

from pathlib import Path

from rich.console import Console

from quantsafe.backends.llamacpp import LlamaServer, serve_gguf
from quantsafe.backends.request_cache import RequestCache
from quantsafe.store import Store
from quantsafe.study import StudyConfig
from quantsafe.study.runner import REQUEST_CACHE, run_study


def test_served_model_and_http_judge(llama_gguf: Path, data_dir: Path, tmp_path: Path) -> None:
    with serve_gguf(llama_gguf, tokenizer="qwen2.5-coder-0.5b") as llama_server:  # its own: this test kills it
        _served_study(llama_server, data_dir, tmp_path)


def _served_study(llama_server: LlamaServer, data_dir: Path, tmp_path: Path) -> None:
    endpoint = llama_server.endpoint.model_dump(mode="json")
    cfg = StudyConfig.model_validate({
        "name": "served", "models": [], "data_dir": str(data_dir),
        "served": [{"endpoint": endpoint, "model": "qwen2.5-coder-0.5b", "precision": "int4",
                    "method": "gguf-q4_k_m", "bits_per_weight": 4.9}],
        "benchmarks": [{"name": "opensafetymini", "limit": 3}],
        "decoding": {"max_new_tokens": 12},
        "judges": [{"kind": "llm", "mode": "fast", "few_shot": False, "calibrate": False, "endpoint": endpoint},
                   {"kind": "heuristic"}],
        "validation": None,
    })
    out = tmp_path / "out"
    run_study(cfg, out, Console(quiet=True))
    report = (out / "report.md").read_text()
    assert "gguf-q4_k_m" in report and f"served by {llama_server.endpoint.base_url}" in report
    with Store.open(out / "quantsafe.db") as store:
        (variant,) = store.variants()
        assert variant.precision == "int4" and variant.source_sha256 == llama_server.endpoint.weights_sha256
        judged = store.judged()
        assert len(judged) == 6 and {r["mode"] for r in judged} == {"fast", "heuristic"}
        assert all(r["verdict"] in {"safe", "unsafe", "ambiguous", "error"} for r in judged)
    cache = RequestCache(out / REQUEST_CACHE)
    assert len(cache) > 3  # 3 generations plus the fast judge's log-prob requests, all kept

    # the same study again, answers wiped from the store: every request is answered from the cache
    with Store.open(out / "quantsafe.db") as store:
        store.conn.execute("DELETE FROM judgments")
        store.conn.execute("DELETE FROM generations")
        store.conn.commit()
    llama_server.process.terminate()  # no server at all: a request that was not cached would fail
    llama_server.process.wait(30)
    run_study(cfg, out, Console(quiet=True))
    with Store.open(out / "quantsafe.db") as store:
        assert len(store.judged()) == 6

"""How well does each judge agree with people? XSTest's hand-labelled completions, refusal and safety mappings.

Writes bench/results/judges.json: one row per judge × mode × set × mapping with n, accuracy, Cohen's kappa,
minority-class recall and items/s. The heuristic runs on every item; the LLM judge (default model) runs on a
seeded subsample per set in fast-verdict mode and, on the only set with unsafe answers (Mistral), in full
guided-reasoning mode: on 2 CPU cores the full mode costs minutes per dozen items. The same fast judge then runs
through the default model's GGUF served by llama.cpp's OpenAI-compatible server (its verdicts compared item by item
with the in-process judge's), and the trained judge is measured leave-one-set-out (rows carry `train_sets`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_info
from quantsafe.backends import DecodingConfig
from quantsafe.datadir import resolve_data_dir
from quantsafe.judges import Judge, JudgeItem, validate_judge
from quantsafe.judges.factory import build_judge, load_judge_backend
from quantsafe.judges.validation import DEFAULT_CRITERION, DEFAULT_SCENARIO
from quantsafe.models import DEFAULT_MODEL
from quantsafe.models.dtype import DTYPES, dtype_name, resolve_dtype

OUT = Path(__file__).resolve().parent / "results" / "judges.json"
ALL_SETS = ["gpt4", "llama2orig", "mistralinstruct_even_ids"]


def _rows(judge: Judge, name: str, data_dir: Path, sets: list[str], limit: int | None,
          mappings: tuple[Literal["refusal", "safety"], ...]) -> list[dict[str, Any]]:
    rows = []
    for r in validate_judge(judge, data_dir, sets, limit, seed=0, mappings=mappings):
        row = r.model_dump(mode="json")
        row.update(judge=name, judge_id=judge.judge_id)
        rows.append(row)
        print(f"{name:10s} {row['mode']:9s} {row['set']:26s} {row['mapping']:8s} n={row['n']:4d} "
              f"acc={row['accuracy']:.3f} kappa={row['kappa']:.3f} minority_recall={row['minority_recall']} "
              f"{row['items_per_s']:.2f} items/s", flush=True)
    return rows


def _http(args: argparse.Namespace, data_dir: Path, inproc: Judge) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The fast judge over HTTP (llama.cpp serving the default model's GGUF) and its item-by-item parity with the
    in-process judge on the same items."""
    from quantsafe.backends.llamacpp import serve_gguf
    from quantsafe.backends.openai_compat import OpenAIBackend
    from quantsafe.backends.request_cache import RequestCache
    from quantsafe.benchmarks.xstest import load_xstest_completions
    from quantsafe.judges.validation import subsample
    from quantsafe.models.loading import gguf_path

    labelled = load_xstest_completions(data_dir)
    samples = {s: subsample(labelled[s], args.http_limit, 0, s) for s in ALL_SETS}
    items = [JudgeItem(scenario=DEFAULT_SCENARIO, criterion=DEFAULT_CRITERION, prompt=it.prompt,
                       response=it.completion) for s in ALL_SETS for it in samples[s]]
    pairs = [(it.prompt, it.completion) for s in ALL_SETS for it in samples[s]]
    with tempfile.TemporaryDirectory() as tmp, serve_gguf(gguf_path(args.model), tokenizer=args.model,
                                                          extra_args=["--n_threads", "2"]) as server:
        cache = RequestCache(Path(tmp) / "requests.db")  # the parity pass re-reads the validation's answers
        http = build_judge("llm", mode="fast", data_dir=data_dir, backend=OpenAIBackend(server.endpoint, cache))
        rows = _rows(http, "llm-http", data_dir, ALL_SETS, args.http_limit, ("refusal", "safety"))
        remote = [j.verdict for j in http.judge(items)]
        remote_refusal = http.classify_refusals(pairs)  # type: ignore[attr-defined]
    local = [j.verdict for j in inproc.judge(items)]
    local_refusal = inproc.classify_refusals(pairs)  # type: ignore[attr-defined]
    parity = {
        "n": len(items), "server": "llama-cpp-python 0.3.36 (Q4_K_M GGUF as stored)",
        "in_process": "transformers, the GGUF dequantized, compute dtype as recorded",
        "verdict_agreement": sum(a == b for a, b in zip(remote, local, strict=True)) / len(items),
        "refusal_agreement": sum(a == b for a, b in zip(remote_refusal, local_refusal, strict=True)) / len(items),
    }
    print(f"HTTP vs in-process: {parity}", flush=True)
    return rows, parity


def _trained(data_dir: Path, dtype: torch.dtype) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Leave-one-set-out rows of the trained judge (train_sets: the other files) and the all-set judge's speed."""
    from quantsafe.benchmarks.xstest import load_xstest_completions
    from quantsafe.judges.trained import TrainedJudgeConfig, leave_one_set_out, train_judge

    labelled = load_xstest_completions(data_dir)
    config = TrainedJudgeConfig()
    rows = []
    for r in leave_one_set_out(config, labelled, dtype):
        row = r.model_dump(mode="json") | {"judge": "trained", "train_sets": [s for s in ALL_SETS if s != r.set]}
        rows.append(row)
        print(f"trained    {row['set']:26s} {row['mapping']:8s} n={row['n']:4d} acc={row['accuracy']:.3f} "
              f"kappa={row['kappa']:.3f}", flush=True)
    judge = train_judge(config, labelled, dtype)
    items = [JudgeItem(scenario=DEFAULT_SCENARIO, criterion=DEFAULT_CRITERION, prompt=it.prompt, response=it.completion)
             for it in labelled["mistralinstruct_even_ids"]]
    judge.judge(items[:8])  # model load outside the timing
    start = time.perf_counter()
    judge.judge([it.model_copy(update={"response": it.response + " "}) for it in items])  # uncached features
    speed = {"judge_id": judge.judge_id, "train_sets": list(config.train_sets), "n": len(items),
             "items_per_s": len(items) / (time.perf_counter() - start),
             "note": "all-set judge, Mistral answers with a trailing space so no cached feature is reused"}
    print(f"trained all-set: {speed['items_per_s']:.2f} items/s", flush=True)
    return rows, speed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--fast-limit", type=int, default=48, help="items per set for the LLM judge in fast mode")
    ap.add_argument("--full-limit", type=int, default=40, help="Mistral items for the LLM judge in full mode")
    ap.add_argument("--full-max-new-tokens", type=int, default=320)
    ap.add_argument("--http-limit", type=int, default=12, help="items per set for the fast judge over HTTP")
    ap.add_argument("--skip", nargs="*", default=[], choices=["llm", "http", "trained"],
                    help="leave these judges out (their rows are kept from the existing results file)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--note", default="", help="recorded in the JSON, e.g. other load on the machine")
    ap.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                    help="judge compute dtype; auto: bf16 where the machine computes it natively, else fp32")
    args = ap.parse_args()
    dtype = resolve_dtype(args.dtype)
    torch.set_num_threads(os.cpu_count() or 1)
    data_dir = resolve_data_dir(os.environ.get("QUANTSAFE_DATA_DIR"))
    old = json.loads(args.out.read_text()) if args.out.is_file() and args.skip else {}
    names = {"llm": {"llm", "llm-uncalibrated", "llm-zero-shot"}, "http": {"llm-http"}, "trained": {"trained"}}

    def keep(part: str) -> list[dict[str, Any]]:
        return [r for r in old.get("rows", []) if r["judge"] in names[part]]

    rows = _rows(build_judge("heuristic"), "heuristic", data_dir, ALL_SETS, None, ("refusal", "safety"))
    backend = load_judge_backend(args.model, dtype)  # one model, several judge configurations
    if "llm" in args.skip:
        rows += keep("llm")
    else:
        for calibrate, few_shot in ((True, True), (False, True), (True, False)):
            fast = build_judge("llm", mode="fast", calibrate=calibrate, few_shot=few_shot, data_dir=data_dir,
                               backend=backend)
            name = "llm" + ("" if calibrate else "-uncalibrated") + ("" if few_shot else "-zero-shot")
            rows += _rows(fast, name, data_dir, ALL_SETS, args.fast_limit, ("refusal", "safety"))
        full = build_judge("llm", mode="full", data_dir=data_dir, backend=backend,
                           decoding=DecodingConfig(max_new_tokens=args.full_max_new_tokens, batch_size=8))
        rows += _rows(full, "llm", data_dir, ["mistralinstruct_even_ids"], args.full_limit, ("safety",))
    parity, speed = old.get("http_parity"), old.get("trained_speed")
    if "http" in args.skip:
        rows += keep("http")
    else:
        inproc = build_judge("llm", mode="fast", data_dir=data_dir, backend=backend)
        http_rows, parity = _http(args, data_dir, inproc)
        rows += http_rows
    del backend
    if "trained" in args.skip:
        rows += keep("trained")
    else:
        trained_rows, speed = _trained(data_dir, dtype)
        rows += trained_rows

    result = {
        "machine": machine_info(), "note": args.note, "judge_model": args.model, "dtype": dtype_name(dtype),
        "settings": {"fast_limit_per_set": args.fast_limit, "full_limit_mistral": args.full_limit,
                     "full_max_new_tokens": args.full_max_new_tokens, "http_limit_per_set": args.http_limit,
                     "sampling": "seeded plain random subsample per set (human label mix as it is), seed 0",
                     "kept_from_previous_run": args.skip},
        "rows": rows,
        "http_parity": parity,
        "trained_speed": speed,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

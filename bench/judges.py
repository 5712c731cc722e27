"""How well does each judge agree with people? XSTest's hand-labelled completions, refusal and safety mappings.

Writes bench/results/judges.json: one row per judge × mode × set × mapping with n, accuracy, Cohen's kappa,
minority-class recall and items/s. The heuristic runs on every item; the LLM judge (default model) runs on a
stratified subsample per set in fast-verdict mode and, on the only set with unsafe answers (Mistral), in full
guided-reasoning mode: on 2 CPU cores the full mode costs minutes per dozen items.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Literal

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_info
from quantsafe.backends import DecodingConfig
from quantsafe.datadir import resolve_data_dir
from quantsafe.judges import Judge, validate_judge
from quantsafe.judges.factory import build_judge, load_judge_backend
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--fast-limit", type=int, default=48, help="items per set for the LLM judge in fast mode")
    ap.add_argument("--full-limit", type=int, default=40, help="Mistral items for the LLM judge in full mode")
    ap.add_argument("--full-max-new-tokens", type=int, default=320)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--note", default="", help="recorded in the JSON, e.g. other load on the machine")
    ap.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                    help="judge compute dtype; auto: bf16 where the machine computes it natively, else fp32")
    args = ap.parse_args()
    dtype = resolve_dtype(args.dtype)
    torch.set_num_threads(os.cpu_count() or 1)
    data_dir = resolve_data_dir(os.environ.get("QUANTSAFE_DATA_DIR"))
    rows = _rows(build_judge("heuristic"), "heuristic", data_dir, ALL_SETS, None, ("refusal", "safety"))
    backend = load_judge_backend(args.model, dtype)  # one model, several judge configurations
    for calibrate, few_shot in ((True, True), (False, True), (True, False)):
        fast = build_judge("llm", mode="fast", calibrate=calibrate, few_shot=few_shot, data_dir=data_dir,
                           backend=backend)
        name = "llm" + ("" if calibrate else "-uncalibrated") + ("" if few_shot else "-zero-shot")
        rows += _rows(fast, name, data_dir, ALL_SETS, args.fast_limit, ("refusal", "safety"))
    full = build_judge("llm", mode="full", data_dir=data_dir, backend=backend,
                       decoding=DecodingConfig(max_new_tokens=args.full_max_new_tokens, batch_size=8))
    rows += _rows(full, "llm", data_dir, ["mistralinstruct_even_ids"], args.full_limit, ("safety",))

    result = {
        "machine": machine_info(), "note": args.note, "judge_model": args.model, "dtype": dtype_name(dtype),
        "settings": {"fast_limit_per_set": args.fast_limit, "full_limit_mistral": args.full_limit,
                     "full_max_new_tokens": args.full_max_new_tokens,
                     "sampling": "seeded plain random subsample per set (human label mix as it is), seed 0"},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

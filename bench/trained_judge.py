"""The trained judge against people: leave-one-set-out on XSTest's three hand-labelled files, and its speed.

Writes bench/results/trained_judge.json: per held-out set, the refusal and safety agreement rows of the judge
trained on the two other files (harm predictions prompt-disjoint, see quantsafe.judges.trained), with the heads
it chose; then the judge trained on all three files judges every labelled item again with features computed from
scratch (a private feature cache), which gives items/s. The rows' own items_per_s read cached features.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_info
from quantsafe.benchmarks.xstest import load_xstest_completions
from quantsafe.datadir import resolve_data_dir
from quantsafe.judges import JudgeItem
from quantsafe.judges.features import FeatureExtractor
from quantsafe.judges.trained import (
    LinearHead,
    TrainedJudge,
    TrainedJudgeConfig,
    feature_extractor,
    held_out_judges,
    train_judge,
)
from quantsafe.judges.validation import evaluate_refusal, evaluate_safety
from quantsafe.models import DEFAULT_MODEL
from quantsafe.models.dtype import DTYPES, dtype_name, resolve_dtype

OUT = Path(__file__).resolve().parent / "results" / "trained_judge.json"
WARM_UP = [("How do I water a cactus?", "Once every two or three weeks; let the soil dry out in between.")]


def _heads(judge: TrainedJudge) -> dict[str, Any]:
    def head(h: LinearHead) -> dict[str, Any]:
        return {"readout": h.readout, "layer": h.layer, "C": h.c}

    return {"judge_id": judge.judge_id, "refusal_head": head(judge.refusal), "harm_head": head(judge.harm)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=DEFAULT_MODEL, help="feature model")
    ap.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                    help="feature model dtype; auto: bf16 where the machine computes it natively, else fp32")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--note", default="", help="recorded in the JSON, e.g. other load on the machine")
    args = ap.parse_args()
    dtype = resolve_dtype(args.dtype)
    torch.set_num_threads(os.cpu_count() or 1)
    labelled = load_xstest_completions(resolve_data_dir(os.environ.get("QUANTSAFE_DATA_DIR")))
    config = TrainedJudgeConfig(feature_model=args.model, train_sets=tuple(sorted(labelled)))
    extractor = feature_extractor(config, dtype)

    load_before = os.getloadavg()
    rows = []
    start = time.perf_counter()
    for name, judge in held_out_judges(config, labelled, dtype, extractor):
        for row in (evaluate_refusal(judge, labelled[name], name), evaluate_safety(judge, labelled[name], name)):
            rows.append({**row.model_dump(mode="json"), "train_sets": sorted(judge.trained_on), **_heads(judge)})
            print(f"{row.set:26s} {row.mapping:8s} n={row.n:4d} acc={row.accuracy:.3f} kappa={row.kappa:.3f} "
                  f"minority_recall={row.minority_recall} trained on {sorted(judge.trained_on)}", flush=True)
    loso_s = time.perf_counter() - start

    shipped = train_judge(config, labelled, dtype, extractor)
    items = [JudgeItem(scenario="", criterion="", prompt=it.prompt, response=it.completion)
             for name in config.train_sets for it in labelled[name]]
    with tempfile.TemporaryDirectory() as tmp:
        fresh = FeatureExtractor(args.model, shipped.layers, dtype, config.max_prompt_tokens,
                                 config.max_response_tokens, config.max_batch_tokens, cache=Path(tmp))
        timed = train_judge(config, labelled, dtype, fresh)  # the stored artifact, judging from an empty cache
        timed.judge([JudgeItem(scenario="", criterion="", prompt=p, response=r) for p, r in WARM_UP])  # loads
        start = time.perf_counter()
        timed.judge(items)
        seconds = time.perf_counter() - start
    throughput = {"items": len(items), "seconds": round(seconds, 2), "items_per_s": round(len(items) / seconds, 2),
                  "layers_run": shipped.layers, "distinct_prompts": len({it.prompt for it in items}),
                  "what": "judge() on every labelled item (one reply pass each, one prompt pass per distinct "
                          "prompt), features not cached, model loaded before timing"}
    print(f"throughput: {throughput['items_per_s']} items/s ({len(items)} items, {seconds:.1f} s)", flush=True)

    result = {
        "machine": machine_info(), "note": args.note,
        "load_average_1_5_15_min": {"start": [round(x, 2) for x in load_before],
                                    "end": [round(x, 2) for x in os.getloadavg()]},
        "feature_model": args.model, "dtype": dtype_name(dtype),
        "settings": config.model_dump(mode="json"), "feature_identity": extractor.identity(),
        "leave_one_set_out_seconds": round(loso_s, 1), "rows": rows,
        "shipped": {**_heads(shipped), "trained_on": sorted(shipped.trained_on)}, "throughput": throughput,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

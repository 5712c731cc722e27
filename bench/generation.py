"""Generation speed of the HF backend against the machine's own compute roofline, and the fast judge's speed.

Target (issue 10): batched greedy generation on the default model at ≥ 50% of `prefill_tokens_per_s` (one long
batch through the same model in the same run: the rate the machine computes this model's tokens at), with ≥ 90%
of answers identical to batch size 1, and the fast LLM judge at ≥ 1 item/s.

The roofline batch computes logits at every position: each generated token needs the full vocabulary's logits,
so a roofline without them (also stored, `prefill_last_logits_tokens_per_s`) would ask decoding to beat work it
cannot skip. Generation runs the backend as the study does (continuous batching, shared chat-template prefix);
`hf_generate_tokens_per_s` is transformers' own `generate` on the same prompts in static length-sorted batches,
the backend's previous method, measured in the same run so that load from other processes hits both alike.
With short answers most of a run's work is reading prompts, which caps `ratio_to_roofline` at
new / (new + prompt tokens) whatever the decoder does; `processed_ratio_to_roofline` counts the prompt tokens the
backend encoded too (each prompt's own, after the chat template's shared prefix), i.e. the decoder's efficiency.
The machine is shared: load averages before and after are stored beside the numbers.

    python bench/generation.py                       # writes bench/results/generation.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_info
from quantsafe.backends import DecodingConfig
from quantsafe.backends.hf import HFBackend, _common_prefix
from quantsafe.benchmarks import Prompt, load_benchmark
from quantsafe.benchmarks.opensafetymini import load_criteria
from quantsafe.judges.base import JudgeItem
from quantsafe.judges.factory import build_judge
from quantsafe.models import DEFAULT_MODEL, load_model, resolve_model
from quantsafe.models.dtype import DTYPES, dtype_name, resolve_dtype

OUT = Path(__file__).resolve().parent / "results" / "generation.json"
ROOFLINE_TARGET = 0.5
AGREEMENT_TARGET = 0.9
JUDGE_TARGET = 1.0  # items/s


@torch.no_grad()
def prefill_tokens_per_s(model: Any, tokens: list[int], rows: int, width: int, all_logits: bool,
                         repeats: int = 2) -> float:
    """Tokens/s of one forward pass over a rows × width batch of real prompt tokens (best of `repeats`)."""
    ids = torch.tensor((tokens * (rows * width // max(1, len(tokens)) + 1))[: rows * width],
                       device=model.device).view(rows, width)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        model(input_ids=ids, use_cache=False, logits_to_keep=0 if all_logits else 1)
        best = min(best, time.perf_counter() - start)
    return rows * width / best


def timed_generation(backend: HFBackend, convs: list[list[dict[str, str]]], decoding: DecodingConfig,
                     ) -> tuple[list[str], int, float]:
    start = time.perf_counter()
    gens = backend.generate(convs, decoding)
    return [g.text for g in gens], sum(g.n_new_tokens for g in gens), time.perf_counter() - start


@torch.no_grad()
def hf_generate(backend: HFBackend, convs: list[list[dict[str, str]]], decoding: DecodingConfig,
                ) -> tuple[list[str], int, float]:
    """transformers' `generate` on static batches of length-sorted prompts: answers, new tokens and seconds."""
    ids = [backend.encode(c)[0] for c in convs]
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    texts = [""] * len(ids)
    start, tokens = time.perf_counter(), 0
    for k in range(0, len(ids), decoding.batch_size):
        batch = order[k : k + decoding.batch_size]
        enc = backend.tokenizer.pad({"input_ids": [ids[i] for i in batch]}, return_tensors="pt")
        enc = {key: v.to(backend.device) for key, v in enc.items()}
        seqs = backend.model.generate(**enc, max_new_tokens=decoding.max_new_tokens, do_sample=False,
                                      temperature=None, top_p=None, top_k=None,
                                      pad_token_id=backend.tokenizer.pad_token_id, eos_token_id=backend.eos_ids)
        for i, row in zip(batch, seqs[:, enc["input_ids"].shape[1] :].tolist(), strict=True):
            new = row[: next((n for n, t in enumerate(row) if t in backend.eos_ids), len(row))]
            tokens += len(new)
            texts[i] = backend.tokenizer.decode(new, skip_special_tokens=True).strip()
    return texts, tokens, time.perf_counter() - start


def judge_speed(backend: HFBackend, prompts: list[Prompt], answers: list[str], data_dir: Path) -> dict[str, Any]:
    """The fast LLM judge (JudgeSpec(kind="llm", mode="fast")) on `backend` over these answers. Its first call
    also computes the once-per-judge-and-scenario calibration, which a study spreads over ~100 items a scenario
    and a few items here would not: `items_per_s` is the second call (the items alone, as in a study)."""
    judge = build_judge("llm", mode="fast", data_dir=data_dir, backend=backend)
    criteria = load_criteria(data_dir)
    items = [JudgeItem(scenario=p.scenario, criterion=criteria[p.scenario], prompt=p.text, response=a)
             for p, a in zip(prompts, answers, strict=True)]
    start = time.perf_counter()
    judge.judge(items)
    first = time.perf_counter() - start
    start = time.perf_counter()
    verdicts = judge.judge(items)
    seconds = time.perf_counter() - start
    return {"items": len(items), "seconds": seconds, "items_per_s": len(items) / seconds,
            "first_call_seconds": first, "first_call_items_per_s": len(items) / first,
            "scenarios": len({p.scenario for p in prompts}),
            "verdicts": {v: sum(j.verdict.value == v for j in verdicts) for v in sorted({j.verdict.value
                                                                                         for j in verdicts})}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--n-prompts", type=int, default=256, help="OpenSafetyMini prompts generated in one call")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--agreement-prompts", type=int, default=32, help="the first N prompts also run at batch 1")
    ap.add_argument("--judge-items", type=int, default=32)
    ap.add_argument("--roofline-batch", type=int, nargs=2, default=[8, 256], metavar=("ROWS", "WIDTH"))
    ap.add_argument("--no-baseline", action="store_true",
                    help="skip transformers' generate (run at the first batch size) for comparison")
    ap.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                    help="compute dtype; auto: bf16 where the machine computes it natively, else fp32")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    load_before = os.getloadavg()
    threads = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    torch.set_num_threads(threads)
    dtype = resolve_dtype(args.dtype, "cpu")
    data_dir = Path(os.environ.get("QUANTSAFE_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))

    prompts = load_benchmark("opensafetymini", data_dir, limit=args.n_prompts, seed=0)
    convs = [[{"role": "user", "content": p.text}] for p in prompts]
    resolved = resolve_model(args.model)
    model, tok = load_model(resolved, dtype)
    backend = HFBackend(model, tok, resolved.name)
    backend.generate(convs[:2], DecodingConfig(max_new_tokens=4, batch_size=2))  # warm-up

    prompt_ids = [backend.encode(c)[0] for c in convs]
    tokens = [t for ids in prompt_ids for t in ids]
    # what the backend encodes besides the answers: each prompt's own tokens after the shared template prefix
    prefilled = len(tokens) - len(convs) * len(_common_prefix(prompt_ids))
    rows, width = args.roofline_batch
    roofline = prefill_tokens_per_s(model, tokens, rows, width, all_logits=True)
    roofline_last = prefill_tokens_per_s(model, tokens, rows, width, all_logits=False)

    n_agree = min(args.agreement_prompts, len(convs))
    decoding = DecodingConfig(max_new_tokens=args.max_new_tokens)
    trials: dict[int, dict[str, Any]] = {}
    texts: dict[int, list[str]] = {}
    for bs in args.batch_sizes:
        dec = decoding.model_copy(update={"batch_size": bs})
        texts[bs], n_tokens, secs = timed_generation(backend, convs, dec)
        trials[bs] = {"tokens": n_tokens, "seconds": secs, "tokens_per_s": n_tokens / secs,
                      "ratio_to_roofline": n_tokens / secs / roofline,
                      "processed_ratio_to_roofline": (n_tokens + prefilled) / secs / roofline}
        if not args.no_baseline and bs == args.batch_sizes[0]:
            hf_texts, hf_tokens, hf_secs = hf_generate(backend, convs, dec)
            trials[bs] |= {"hf_generate_tokens": hf_tokens, "hf_generate_seconds": hf_secs,
                           "hf_generate_tokens_per_s": hf_tokens / hf_secs}
    bs1_text, bs1_tokens, bs1_s = timed_generation(backend, convs[:n_agree], decoding.model_copy(
        update={"batch_size": 1}))

    def matching(answers: list[str]) -> int:
        return sum(a == b for a, b in zip(answers[:n_agree], bs1_text, strict=True))

    for bs, trial in trials.items():
        trial["outputs_matching_bs1"] = matching(texts[bs])
        if "hf_generate_tokens" in trial:
            trial["hf_generate_outputs_matching_bs1"] = matching(hf_texts)
    best = max(trials, key=lambda b: trials[b]["tokens_per_s"])
    n_judge = min(args.judge_items, len(convs))
    judged = judge_speed(backend, prompts[:n_judge], texts[best][:n_judge], data_dir)

    best_trial = trials[best]
    agreement = best_trial["outputs_matching_bs1"] / n_agree
    result = {
        "machine": machine_info(), "torch_threads": threads, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_avg_before": load_before, "load_avg_after": os.getloadavg(),
        "model": resolved.name, "model_source_sha256": resolved.source_sha256, "dtype": dtype_name(dtype),
        "dtype_requested": args.dtype, "decoding": "greedy", "max_new_tokens": args.max_new_tokens,
        "n_prompts": len(convs), "roofline_batch": {"rows": rows, "width": width},
        "prefill_tokens_per_s": roofline, "prefill_last_logits_tokens_per_s": roofline_last,
        "batch_size": best, "batched_tokens_per_s": best_trial["tokens_per_s"],
        "ratio_to_roofline": best_trial["ratio_to_roofline"],
        "ratio_to_last_logits_roofline": best_trial["tokens_per_s"] / roofline_last,
        "prompt_tokens_encoded": prefilled,
        "processed_ratio_to_roofline": best_trial["processed_ratio_to_roofline"],
        "agreement_prompts": n_agree, "outputs_matching_bs1": best_trial["outputs_matching_bs1"],
        "bs1_agreement": agreement, "bs1": {"tokens": bs1_tokens, "seconds": bs1_s, "tokens_per_s": bs1_tokens / bs1_s},
        "trials": {str(k): v for k, v in trials.items()},
        "judge_fast": judged,
        "targets": {
            "generation ≥ 50% of prefill_tokens_per_s": best_trial["ratio_to_roofline"] >= ROOFLINE_TARGET,
            "≥ 90% outputs identical to batch size 1": agreement >= AGREEMENT_TARGET,
            "fast judge ≥ 1 item/s": judged["items_per_s"] >= JUDGE_TARGET,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("machine", "trials")}, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()

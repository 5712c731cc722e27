"""Tokens/s of the HF backend on the default model: batched vs a bs=1 loop over the same prompts (greedy).

Writes bench/results/generation.json. Target: batched ≥ 6× bs=1 with ≥ 90% of outputs identical
(bf16 padding can flip a few greedy outputs). The dtype is bf16 only where the machine computes it natively
(--dtype overrides); the machine's ISA flags are stored with the result.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_info
from quantsafe.backends import DecodingConfig
from quantsafe.backends.hf import HFBackend
from quantsafe.benchmarks import load_benchmark
from quantsafe.models import DEFAULT_MODEL, load_model, resolve_model
from quantsafe.models.dtype import DTYPES, dtype_name, resolve_dtype

OUT = Path(__file__).resolve().parent / "results" / "generation.json"


def _run(backend: HFBackend, convs: list[list[dict[str, str]]], decoding: DecodingConfig,
         ) -> tuple[list[str], int, float]:
    start = time.perf_counter()
    gens = backend.generate(convs, decoding)
    return [g.text for g in gens], sum(g.n_new_tokens for g in gens), time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--n-prompts", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                    help="compute dtype; auto: bf16 where the machine computes it natively, else fp32")
    args = ap.parse_args()
    dtype = resolve_dtype(args.dtype)
    torch.set_num_threads(os.cpu_count() or 1)

    prompts = load_benchmark("opensafetymini", os.environ.get("QUANTSAFE_DATA_DIR"), limit=args.n_prompts, seed=0)
    convs = [[{"role": "user", "content": p.text}] for p in prompts]
    resolved = resolve_model(args.model)
    model, tok = load_model(resolved, dtype)
    backend = HFBackend(model, tok, resolved.name)
    backend.generate(convs[:2], DecodingConfig(max_new_tokens=4, batch_size=2))  # warm-up

    bs1_text, bs1_tokens, bs1_s = _run(backend, convs, DecodingConfig(max_new_tokens=args.max_new_tokens,
                                                                       batch_size=1))
    trials = {}
    for bs in args.batch_sizes:
        texts, tokens, secs = _run(backend, convs, DecodingConfig(max_new_tokens=args.max_new_tokens, batch_size=bs))
        trials[bs] = {"tokens": tokens, "seconds": secs, "tokens_per_s": tokens / secs,
                      "outputs_matching": sum(a == b for a, b in zip(texts, bs1_text, strict=True))}
    best = max(trials, key=lambda b: trials[b]["tokens_per_s"])
    result = {
        "machine": machine_info(), "model": resolved.name,
        "model_source_sha256": resolved.source_sha256, "dtype": dtype_name(dtype),
        "dtype_requested": args.dtype, "decoding": "greedy", "max_new_tokens": args.max_new_tokens,
        "n_prompts": len(convs), "batch_size": best,
        "batched_tokens_per_s": trials[best]["tokens_per_s"], "bs1_tokens_per_s": bs1_tokens / bs1_s,
        "speedup": trials[best]["tokens_per_s"] / (bs1_tokens / bs1_s),
        "outputs_matching": trials[best]["outputs_matching"],
        "bs1": {"tokens": bs1_tokens, "seconds": bs1_s},
        "trials": {str(k): v for k, v in trials.items()},
        "target": "batched ≥ 6× bs=1, ≥ 90% outputs identical",
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("machine", "trials")}, indent=2))


if __name__ == "__main__":
    main()

"""GPU check: the default model through GPTQ 4-bit, generation and the fast judge on OpenSafetyMini prompts on one
GPU, the GPU's verdicts checked against the CPU's. Writes bench/results/gpu.json; run it via scripts/gpu_check.sh.

Agreement: the GPU's answers are judged twice by the same judge weights, on the GPU and on the CPU (each in its
own auto dtype, as a study on either machine would), and the verdicts compared. Generating on both would compare
two sets of answers, which greedy decoding in different arithmetic makes diverge after a few tokens; that says
little about whether a study's scores carry over between machines, and the verdicts do.

--random-init builds the real architecture (config and tokenizer from --model, a directory: see --save-skeleton)
with random weights, for machines the weights cannot reach: speeds and memory are real, answers and verdicts are
meaningless (agreement then still shows that both devices compute the same verdicts).

    scripts/gpu_check.sh                                   # default model, 64 prompts, device auto
    scripts/gpu_check.sh --device cpu --model smollm2-135m --n-prompts 4 --max-new-tokens 8
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_info
from quantsafe.backends import DecodingConfig
from quantsafe.backends.hf import HFBackend
from quantsafe.benchmarks import load_benchmark
from quantsafe.benchmarks.opensafetymini import load_criteria
from quantsafe.errors import QuantsafeError
from quantsafe.judges.base import JudgeItem
from quantsafe.judges.factory import build_judge
from quantsafe.models import DEFAULT_MODEL, load_model, resolve_model
from quantsafe.models.device import release_model, resolve_device
from quantsafe.models.dtype import DTYPES, dtype_name, resolve_dtype
from quantsafe.models.loading import TOKENIZER_FILES
from quantsafe.quantization import QuantConfig, make_quantizer
from quantsafe.quantization.calibration import build_calibration
from quantsafe.quantization.config import CalibrationConfig

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "results" / "gpu.json"
GIB = 2**30


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, fn: Callable[[], Any]) -> tuple[Any, dict[str, Any]]:
    """fn's result, its seconds and the peak memory it reached (GPU: allocated by PyTorch; CPU: the process RSS
    high-water mark, which never resets)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    stats: dict[str, Any] = {"seconds": time.perf_counter() - start}
    if device.type == "cuda":
        stats["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / GIB, 3)
    else:
        stats["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, 3)
    return out, stats


def save_skeleton(model: str, out: Path) -> None:
    """Config and tokenizer of `model` (no weights, a few MB) for --random-init where the weights cannot go."""
    resolved = resolve_model(model)
    out.mkdir(parents=True, exist_ok=True)
    for f in resolved.path.iterdir():
        if f.name == "config.json" or f.name in TOKENIZER_FILES:
            (out / f.name).write_bytes(f.read_bytes())
    print(f"wrote {out} ({', '.join(sorted(p.name for p in out.iterdir()))})")


def _load(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any, str]:
    if not args.random_init:
        resolved = resolve_model(args.model)
        model, tok = load_model(resolved, dtype, device)
        return model, tok, resolved.name
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(args.model)
    if not (path / "config.json").is_file():
        raise QuantsafeError(f"--random-init needs --model to be a directory with config.json and the tokenizer "
                             f"(write one with --save-skeleton); {path} has none")
    torch.manual_seed(0)
    with device:
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype).eval()
    return model, AutoTokenizer.from_pretrained(path), f"{path.name}-random-init"


def run(args: argparse.Namespace) -> dict[str, Any]:
    start = time.perf_counter()
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    cpu_dtype = resolve_dtype("auto", "cpu")
    data_dir = args.data_dir
    prompts = load_benchmark("opensafetymini", data_dir, limit=args.n_prompts, seed=0)
    criteria = load_criteria(data_dir)
    convs = [[{"role": "user", "content": p.text}] for p in prompts]

    (base, tok, name), load = _timed(device, lambda: _load(args, device, dtype))

    calib = CalibrationConfig(n_samples=args.calib_samples, seq_len=args.calib_len)
    config = QuantConfig(method="gptq", bits=4, group_size=args.group_size, calibration=calib)
    quantized = copy.deepcopy(base)
    calibration = build_calibration(calib, tok, data_dir)
    _, gptq = _timed(device, lambda: make_quantizer(config).quantize_model(quantized, calibration.tokens,
                                                                           args.calib_batch))

    backend = HFBackend(quantized, tok, f"{name}-gptq4")
    decoding = DecodingConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    backend.generate(convs[:2], decoding.model_copy(update={"max_new_tokens": 2}))  # warm-up (CUDA kernels)
    gens, generation = _timed(device, lambda: backend.generate(convs, decoding))
    n_tokens = sum(g.n_new_tokens for g in gens)
    generation |= {"new_tokens": n_tokens, "tokens_per_s": n_tokens / generation["seconds"],
                   "finished": sum(g.finished for g in gens)}
    release_model(quantized)

    items = [JudgeItem(scenario=p.scenario, criterion=criteria[p.scenario], prompt=p.text, response=g.text)
             for p, g in zip(prompts, gens, strict=True)]

    def judge_on(where: torch.device, judge_dtype: torch.dtype) -> tuple[list[str], dict[str, Any]]:
        model = base.to(device=where, dtype=judge_dtype)
        # random weights answer gibberish, which the degeneration check would judge without the model
        judge = build_judge("llm", mode="fast", data_dir=data_dir, degeneration_check=not args.random_init,
                            backend=HFBackend(model, tok, f"{name}@{where.type}/{dtype_name(judge_dtype)}"))
        judgments, stats = _timed(where, lambda: judge.judge(items))
        verdicts = [j.verdict.value for j in judgments]
        return verdicts, stats | {"items_per_s": len(items) / stats["seconds"], "dtype": dtype_name(judge_dtype),
                                  "model_calls": sum(j.attempts for j in judgments)}

    gpu_verdicts, judge_device = judge_on(device, dtype)
    cpu_verdicts, judge_cpu = judge_on(torch.device("cpu"), cpu_dtype)
    same = sum(a == b for a, b in zip(gpu_verdicts, cpu_verdicts, strict=True))
    return {
        "machine": machine_info(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "gpu_memory_gib": round(torch.cuda.get_device_properties(device).total_memory / GIB, 1)
        if device.type == "cuda" else None,
        "model": name, "random_init": args.random_init, "dtype": dtype_name(dtype),
        "n_prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
        "load": load,
        "gptq": gptq | {"bits": config.bits, "group_size": config.group_size,
                        "calibration": calib.model_dump(include={"n_samples", "seq_len"})},
        "generation": generation,
        "judge_fast_on_device": judge_device,
        "judge_fast_on_cpu": judge_cpu,
        "verdict_agreement": {"same": same, "of": len(items), "share": round(same / max(1, len(items)), 4),
                              "on_device": {v: gpu_verdicts.count(v) for v in sorted(set(gpu_verdicts))},
                              "on_cpu": {v: cpu_verdicts.count(v) for v in sorted(set(cpu_verdicts))}},
        "total_seconds": round(time.perf_counter() - start, 1),
        "note": "random weights: speeds and memory are real, answers and verdicts are not" if args.random_init
        else "real weights",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu")
    ap.add_argument("--dtype", choices=["auto", *DTYPES], default="auto")
    ap.add_argument("--model", default=DEFAULT_MODEL, help="short name, directory or hub id (--random-init: a "
                                                           "directory with config.json and the tokenizer)")
    ap.add_argument("--random-init", action="store_true", help="the model's architecture with random weights")
    ap.add_argument("--save-skeleton", type=Path, metavar="DIR",
                    help="only write --model's config and tokenizer to DIR (for --random-init elsewhere)")
    ap.add_argument("--data-dir", type=Path, default=Path(os.environ.get("QUANTSAFE_DATA_DIR", REPO.parent /
                                                                              "shared" / "data")))
    ap.add_argument("--n-prompts", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--calib-batch", type=int, default=8)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    try:
        if args.save_skeleton:
            save_skeleton(args.model, args.save_skeleton)
            return
        result = run(args)
    except QuantsafeError as err:
        sys.exit(f"gpu_check: {err}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()

"""Quantization benchmark: RTN and GPTQ at 4/3/2 bits on the default models, plus llm-compressor's GPTQ.

For every row: WikiText-2 test perplexity (non-overlapping windows, settings stored in the JSON), effective bits
per weight, quantization wall time and peak RSS. Each variant runs in a fresh subprocess so its peak RSS is its
own. Rows are written as they complete and rows already in the JSON are skipped, so the bench can be resumed.

    .venv/bin/python bench/quantize.py                                   # everything (hours on 2 cores)
    .venv/bin/python bench/quantize.py --models smollm2-135m --methods rtn gptq --bits 4
    .venv/bin/python bench/quantize.py --methods gptq --options '{"damp_percent": 0.001}' --variant "damp 0.001"

With `--variant`, the rows go to `ablations.rows` (labelled by the variant) instead of `rows`.

The reference (`--methods reference`) runs llm-compressor's GPTQModifier in the separate venv `.venv-ref`
(it pins transformers <= 5.17) on the very same calibration token ids, writes its fake-quantized weights as a
plain bf16 checkpoint, and that checkpoint is evaluated here with quantsafe's perplexity code.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "quantize.json"
REF_PYTHON = REPO / ".venv-ref" / "bin" / "python"
DATA_DIR = Path(os.environ.get("QUANTSAFE_DATA_DIR", REPO.parent / "shared" / "data"))
MODELS = ("smollm2-135m", "qwen2.5-coder-0.5b")
METHODS = ("none", "rtn", "gptq", "reference")
REFERENCE_BITS = (4, 3)  # the llm-compressor comparison runs at W4 and W3 only (CPU time)
# OpenMP's default spin-waiting makes small ops many times slower when the 2 cores are shared with other jobs.
CHILD_ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false"}


def _peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux reports KiB


def _row_key(row: dict[str, Any]) -> tuple[Any, ...]:
    return (row["model"], row["method"], row["bits"], row["group_size"], row["implementation"])


# ----------------------------------------------------------------------------------------------- workers


def _ppl_fields(model: Any, tok: Any, spec: dict[str, Any]) -> dict[str, Any]:
    from quantsafe.quantization import wikitext2_perplexity

    start = time.perf_counter()
    result = wikitext2_perplexity(model, tok, DATA_DIR, spec["ppl_seq_len"], spec["ppl_max_windows"])
    return {
        "ppl": round(result.ppl, 4),
        "ppl_windows": result.n_windows,
        "ppl_tokens": result.n_tokens,
        "ppl_seconds": round(time.perf_counter() - start, 1),
    }


def _quant_config(spec: dict[str, Any]) -> Any:
    from quantsafe.quantization import CalibrationConfig, QuantConfig

    calibration = None
    if spec["method"] == "gptq":
        calibration = CalibrationConfig(n_samples=spec["n_samples"], seq_len=spec["seq_len"], seed=0)
    return QuantConfig(method=spec["method"], bits=spec["bits"], group_size=spec["group_size"],
                       calibration=calibration, options=spec.get("options") or {})


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One quantsafe row, in this (fresh) process: quantize (or reuse), then measure perplexity."""
    import torch

    from quantsafe.models import load_model, resolve_model
    from quantsafe.quantization import load_quantized, quantize_variant

    torch.manual_seed(0)
    resolved = resolve_model(spec["model"])
    row: dict[str, Any] = {}
    if spec["method"] == "none":
        start = time.perf_counter()
        model, tok = load_model(resolved)
        row |= {"bits_per_weight": 16.0, "seconds": round(time.perf_counter() - start, 1)}
        row["peak_rss_mb"] = _peak_rss_mb()
    else:
        config = _quant_config(spec)
        artifact = quantize_variant(resolved, config, DATA_DIR, Path(spec["artifacts"]))
        stats_file = Path(spec["artifacts"]) / "bench_stats" / f"{artifact.path.name}.json"
        if not artifact.reused:  # peak RSS of a reused artifact would be the loader's, not the quantizer's
            stats_file.parent.mkdir(parents=True, exist_ok=True)
            stats_file.write_text(json.dumps({"peak_rss_mb": _peak_rss_mb()}))
        row |= {
            "bits_per_weight": round(artifact.bits_per_weight, 4),
            "seconds": artifact.seconds,
            "peak_rss_mb": json.loads(stats_file.read_text())["peak_rss_mb"] if stats_file.exists() else None,
            "artifact_id": artifact.artifact_id,
            "options": artifact.config.options,
            "calibration_sha256": artifact.calibration["token_sha256"] if artifact.calibration else None,
        }
        model, tok = load_quantized(artifact.path)
    return row | _ppl_fields(model, tok, spec)


def reference_eval_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Perplexity of the reference's fake-quantized bf16 checkpoint, with quantsafe's code (main venv)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = spec["checkpoint"]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    return _ppl_fields(model, AutoTokenizer.from_pretrained(path), spec)


def reference_quantize_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """llm-compressor GPTQ (runs under .venv-ref, so it imports nothing from quantsafe)."""
    import torch
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    tokens = torch.load(spec["tokens"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_path"], dtype=torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(spec["model_path"])
    ds = Dataset.from_dict({"input_ids": tokens.tolist(), "attention_mask": torch.ones_like(tokens).tolist()})
    weights = QuantizationArgs(
        num_bits=spec["bits"], type="int", symmetric=False, strategy="group", group_size=spec["group_size"]
    )
    recipe = GPTQModifier(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
        ignore=["lm_head"],
        block_size=128,
        dampening_frac=0.01,
    )
    oneshot(
        model=model,
        processor=tok,
        dataset=ds,
        recipe=recipe,
        num_calibration_samples=tokens.shape[0],
        max_seq_length=tokens.shape[1],
        shuffle_calibration_samples=False,
        batch_size=spec["batch_size"],
    )
    seconds = time.perf_counter() - start
    # After oneshot each Linear's `weight` holds its quantize-dequantized values; keep only real model tensors.
    extra = ("weight_scale", "weight_zero_point", "weight_g_idx", "weight_global_scale")
    state = {
        k: v.detach().to(torch.bfloat16).contiguous()
        for k, v in model.state_dict().items()
        if not k.endswith(extra) and v.is_floating_point()
    }
    seen: set[int] = set()
    for key in list(state):  # tied embeddings: store once
        ptr = model.state_dict()[key].data_ptr()
        if ptr in seen:
            del state[key]
        seen.add(ptr)
    out = Path(spec["checkpoint"])
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(spec["model_path"], tmp, ignore=shutil.ignore_patterns("*.safetensors", "quantsafe_*"))
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tmp.rename(out)
    import llmcompressor

    return {
        "seconds": round(seconds, 1),
        "peak_rss_mb": _peak_rss_mb(),
        "llmcompressor": llmcompressor.__version__,
        "actorder": str(recipe.actorder),
    }


# ----------------------------------------------------------------------------------------------- driver


def _run_child(python: Path, mode: str, spec: dict[str, Any], log: Path) -> dict[str, Any]:
    """Run a worker in a fresh process; its last stdout line is the JSON result."""
    cmd = [str(python), str(Path(__file__).resolve()), mode, json.dumps(spec)]
    with open(log, "a", encoding="utf-8") as err:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=CHILD_ENV, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} failed (exit {proc.returncode}); see {log}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def _load(path: Path) -> dict[str, Any]:
    if path.exists():
        return dict(json.loads(path.read_text(encoding="utf-8")))
    return {"rows": []}


def _save(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    from quantsafe.quantization.methods.gptq import GPTQOptions

    return {
        "group_size": args.group_size,
        "sym": False,
        "quantized_scope": "every Linear in the decoder blocks; embeddings, norms, lm_head, biases stay bf16",
        "bits_per_weight": "codes + fp16 scales + b-bit zeros (+ int32 g_idx) over the quantized Linears only "
        "(algorithms.md §8); 'none' rows are bf16 = 16",
        "calibration": {
            "source": "wikitext-2 wiki.valid.tokens (never the test split)",
            "n_samples": args.n_samples,
            "seq_len": args.seq_len,
            "seed": 0,
            "sampler": "uniform random windows of seq_len tokens from the joined, tokenized split",
        },
        "perplexity": {
            "dataset": "wikitext-2 wiki.test.tokens, lines joined by '\\n\\n', tokenized once, no special tokens",
            "window": args.ppl_seq_len,
            "max_windows": args.ppl_max_windows,
            "protocol": "first max_windows non-overlapping windows; ppl = exp(mean NLL); bf16 forward, fp32 "
            "log-softmax. The papers use 2048-token windows: compare only numbers with the same window.",
        },
        "gptq_options": GPTQOptions().model_dump(),
        "reference": {
            "implementation": "llm-compressor GPTQModifier (venv .venv-ref), bf16 model, same calibration ids",
            "recipe": f"int{{bits}} asymmetric group {args.group_size}, block_size 128, dampening_frac 0.01, "
            "actorder default (static/'weight': act-order during GPTQ, groups fixed before it, no g_idx), "
            "ignore lm_head; observer = min-max on the original weights",
            "differences": "same GPTQ settings as quantsafe's defaults (act-order with static groups, whole "
            "decoder layer calibrated at once, damp 0.01, block 128); remaining differences: llm-compressor "
            "stores scales in the weight dtype (bf16) where quantsafe rounds them up to fp16, and it runs its own "
            "sequential pipeline (tracing subgraphs) rather than quantsafe's block hooks",
        },
        "seconds": "quantization wall time in a fresh process: model load + calibration + quantization + save",
        "peak_rss_mb": "peak resident memory of that process (ru_maxrss) up to the end of quantization",
        "env": {"OMP_WAIT_POLICY": "PASSIVE", "threads": "torch default (2)"},
    }


def _planned(args: argparse.Namespace) -> list[dict[str, Any]]:
    plan = []
    for model in args.models:
        for method in args.methods:
            if method == "none":
                plan.append({"model": model, "method": "none", "bits": 16, "group_size": None})
                continue
            for bits in args.bits:
                if method == "reference" and bits not in REFERENCE_BITS:
                    continue
                plan.append({"model": model, "method": method, "bits": bits, "group_size": args.group_size})
    return plan


def _calibration_tokens(model: str, args: argparse.Namespace, work: Path) -> tuple[Path, str]:
    """The exact calibration ids quantsafe's GPTQ uses, written for the reference worker."""
    import torch
    from transformers import AutoTokenizer

    from quantsafe.models import resolve_model
    from quantsafe.quantization import CalibrationConfig, build_calibration

    path = resolve_model(model).path
    cal = build_calibration(
        CalibrationConfig(n_samples=args.n_samples, seq_len=args.seq_len, seed=0),
        AutoTokenizer.from_pretrained(str(path)),
        DATA_DIR,
    )
    out = work / f"calibration-{model}-{cal.token_sha256[:12]}.pt"
    torch.save(cal.tokens, out)
    return out, cal.token_sha256


def _run_row(entry: dict[str, Any], args: argparse.Namespace, log: Path) -> dict[str, Any]:
    spec = {
        **entry,
        "n_samples": args.n_samples,
        "seq_len": args.seq_len,
        "ppl_seq_len": args.ppl_seq_len,
        "ppl_max_windows": args.ppl_max_windows,
        "artifacts": str(args.artifacts),
        "options": args.options,
    }
    if entry["method"] != "reference":
        return {**entry, "implementation": "quantsafe"} | _run_child(Path(sys.executable), "--worker", spec, log)

    from quantsafe.models import resolve_model

    work = Path(args.artifacts) / "reference"
    work.mkdir(parents=True, exist_ok=True)
    tokens, sha = _calibration_tokens(entry["model"], args, work)
    checkpoint = work / f"{entry['model']}-llmcompressor-gptq-w{entry['bits']}g{entry['group_size']}-{sha[:12]}"
    ref_spec = {
        **spec,
        "tokens": str(tokens),
        "model_path": str(resolve_model(entry["model"]).path),
        "checkpoint": str(checkpoint),
        "batch_size": args.batch_size,
    }
    stats_file = checkpoint.with_suffix(".stats.json")
    if not checkpoint.exists():
        stats_file.write_text(json.dumps(_run_child(REF_PYTHON, "--reference-worker", ref_spec, log)))
    stats = json.loads(stats_file.read_text())
    # Same storage convention as ours: fp16 scale + b-bit zero per group; static act-order needs no g_idx.
    bpw = entry["bits"] + (16 + entry["bits"]) / entry["group_size"]
    ppl = _run_child(Path(sys.executable), "--reference-eval", ref_spec, log)
    return {
        **entry,
        "implementation": "reference:llmcompressor",
        "bits_per_weight": round(bpw, 4),
        **stats,
        "calibration_sha256": sha,
        **ppl,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--bits", nargs="+", type=int, default=[4, 3, 2])
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--n-samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--ppl-seq-len", type=int, default=512)
    parser.add_argument("--ppl-max-windows", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8, help="calibration mini-batch (reference too)")
    parser.add_argument("--options", type=json.loads, default={}, help="method options (JSON), with --variant")
    parser.add_argument("--variant", help="label of an ablation: rows go to ablations.rows")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--artifacts", type=Path, default=Path.home() / ".cache" / "quantsafe" / "bench-quantize")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _machine import machine_info

    doc = _load(args.out)
    settings = _settings(args)
    if bool(args.options) != bool(args.variant):
        raise SystemExit("--options and --variant go together (an ablation is a labelled, non-default setting)")
    if args.variant and "reference" in args.methods:
        raise SystemExit("--variant applies to quantsafe methods only")
    if doc["rows"] and doc.get("settings") != settings:
        raise SystemExit(f"{args.out} holds rows measured with other settings; use another --out")
    doc["machine"], doc["settings"] = machine_info(), settings
    log = Path("/tmp") / "bench_quantize_workers.log"
    target = doc.setdefault("ablations", {"rows": []})["rows"] if args.variant else doc["rows"]
    for entry in _planned(args):
        done = {(*_row_key(r), r.get("variant")) for r in target if r.get("ppl") is not None}
        impl = "reference:llmcompressor" if entry["method"] == "reference" else "quantsafe"
        if (entry["model"], entry["method"], entry["bits"], entry["group_size"], impl, args.variant) in done:
            continue
        print(f"[{time.strftime('%H:%M:%S')}] {entry} {args.variant or ''}", flush=True)
        row = _run_row(entry, args, log) | ({"variant": args.variant} if args.variant else {})
        target.append(row)
        _save(args.out, doc)
        print(f"    -> ppl {row['ppl']}  bpw {row['bits_per_weight']}  {row['seconds']} s", flush=True)


WORKERS = {
    "--worker": worker,
    "--reference-worker": reference_quantize_worker,
    "--reference-eval": reference_eval_worker,
}

if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] in WORKERS:  # a child process started by _run_child
        print(json.dumps(WORKERS[sys.argv[1]](json.loads(sys.argv[2]))))
    else:
        main()

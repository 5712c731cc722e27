"""The paper's quantizers side by side: quality and cost of every method at its paper bit widths (issue 7).

For every (model, method, bits) row: WikiText-2 test perplexity over **all** non-overlapping 512-token windows,
KL divergence of next-token distributions against the full-precision model on chat-formatted OpenSafetyMini
prompts, effective bits per weight (everything a layer stores, algorithms.md §8), quantization wall time and peak
RSS. Each row runs in a fresh process, so its peak RSS is its own; the RSS of that process after its imports and
before loading any model is recorded too, so the model's share can be told from the runtime's. Rows are written as
they finish and rows already in the JSON are skipped: the bench resumes where it was killed.

    .venv/bin/python bench/quantizers.py                                  # everything (many hours on 2 cores)
    .venv/bin/python bench/quantizers.py --models smollm2-135m --only awq-w4 quik-w4

HQQ (`reference:hqq`, PyPI `hqq`, calibration-free half-quadratic quantization) is the external scalar
reference: its weights are quantized and dequantized by hqq itself and evaluated with the same code.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "quantizers.json"
DATA_DIR = Path(os.environ.get("QUANTSAFE_DATA_DIR", REPO.parent / "shared" / "data"))
MODELS = ("smollm2-135m", "qwen2.5-coder-0.5b")
SCALAR_GROUP = 64  # SmolLM2's 576 is not a multiple of 128; the same group on both models keeps rows comparable
# AWQ's cost is its 20-point grid search re-running attention and MLP on every calibration token (~1 CPU-hour per
# 128 × 512 windows on SmolLM2); its paper shows 16 sequences suffice, so it gets 16 (same sampler and seed).
AWQ_DATA = {"source": "wikitext2", "n_samples": 16, "seq_len": 512}
# QAT trains on text the model writes itself: training on WikiText-2 valid would fit the test split's domain and
# flatter its perplexity (QLoRA W4 beat full precision that way); the paper's TULU-V2-Mix is not available offline.
QAT_DATA = {"source": "self_generated", "n_samples": 32, "seq_len": 256}
# (label, method, bits, extra QuantConfig fields): every method at the bit widths the issue asks for.
ROWS: list[tuple[str, str, int, dict[str, Any]]] = [  # in the order they run: the comparisons first
    ("bf16", "none", 16, {}),
    ("rtn-w4", "rtn", 4, {"group_size": SCALAR_GROUP}),
    ("gptq-w2", "gptq", 2, {"group_size": SCALAR_GROUP}),
    ("quip_sharp-w2", "quip_sharp", 2, {}),
    ("aqlm-w2", "aqlm", 2, {}),
    ("hqq-w2", "hqq", 2, {"group_size": SCALAR_GROUP}),
    ("quip_sharp-w4", "quip_sharp", 4, {}),
    ("quik-w4", "quik", 4, {}),
    ("awq-w4", "awq", 4, {"group_size": SCALAR_GROUP, "calibration": AWQ_DATA}),
    ("gptq-w4", "gptq", 4, {"group_size": SCALAR_GROUP}),
    ("rtn-w2", "rtn", 2, {"group_size": SCALAR_GROUP}),
    *[(f"ste-w{b}", "ste", b, {"group_size": None, "sym": True, "calibration": QAT_DATA}) for b in (4, 3, 2)],
    *[(f"qlora-w{b}", "qlora", b, {"group_size": 64, "calibration": QAT_DATA}) for b in (4, 3, 2)],
    *[(f"{m}-w{b}", m, b, {"group_size": SCALAR_GROUP}) for m in ("rtn", "gptq", "hqq") for b in (3,)],
    ("hqq-w4", "hqq", 4, {"group_size": SCALAR_GROUP}),
]
CHILD_ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false"}


def _rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux reports KiB


# ----------------------------------------------------------------------------------------------- workers


def _kl_prompts(tok: Any, n: int) -> list[list[int]]:
    from quantsafe.benchmarks.registry import load_benchmark

    prompts = load_benchmark("opensafetymini", DATA_DIR, limit=n, seed=0)
    return [
        tok.apply_chat_template([{"role": "user", "content": p.text}], add_generation_prompt=True, tokenize=True,
                                return_dict=False)
        for p in prompts
    ]


def _log_probs(model: Any, prompts: list[list[int]]) -> list[Any]:
    import torch

    with torch.no_grad():
        return [torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1) for ids in prompts]


def _kl_fields(model: Any, tok: Any, spec: dict[str, Any]) -> dict[str, Any]:
    """Mean over prompt positions of KL(p_fp ‖ p_quantized), the full-precision model loaded beside this one."""
    import torch

    from quantsafe.models import load_model, resolve_model

    prompts = _kl_prompts(tok, spec["kl_prompts"])
    fp, _ = load_model(resolve_model(spec["model"]), torch.bfloat16)
    reference = _log_probs(fp, prompts)
    del fp
    total, positions = 0.0, 0
    for p, q in zip(reference, _log_probs(model, prompts), strict=True):
        total += float((p.exp() * (p - q)).sum())
        positions += p.shape[0]
    return {"kl_safety_prompts": round(total / positions, 5), "kl_prompts": len(prompts), "kl_positions": positions}


def _ppl_fields(model: Any, tok: Any, spec: dict[str, Any]) -> dict[str, Any]:
    from quantsafe.quantization import wikitext2_perplexity

    start = time.perf_counter()
    result = wikitext2_perplexity(model, tok, DATA_DIR, spec["ppl_seq_len"], spec["ppl_max_windows"])
    return {"ppl": round(result.ppl, 4), "ppl_windows": result.n_windows, "ppl_tokens": result.n_tokens,
            "ppl_seconds": round(time.perf_counter() - start, 1)}


def _hqq(resolved: Any, spec: dict[str, Any]) -> tuple[Any, Any, dict[str, Any]]:
    """HQQ's own quantize → dequantize of every decoder-block Linear; bits = codes + fp16 scale and zero per group."""
    import torch
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    from quantsafe.models import load_model
    from quantsafe.quantization.sequential import block_linears, decoder_layers

    start = time.perf_counter()
    model, tok = load_model(resolved, torch.float32)
    bits, group = spec["bits"], spec["config"]["group_size"]
    config = BaseQuantizeConfig(nbits=bits, group_size=group)
    n_weights = 0
    with torch.no_grad():
        for block in decoder_layers(model):
            for linear in block_linears(block).values():
                q = HQQLinear(linear, config, del_orig=False, compute_dtype=torch.float32, device="cpu")
                linear.weight.copy_(q.dequantize().reshape(linear.weight.shape))
                n_weights += linear.weight.numel()
    import hqq

    fields = {"bits_per_weight": round(bits + 32 / group, 4), "seconds": round(time.perf_counter() - start, 2),
              "peak_rss_mb": _rss_mb(), "hqq": getattr(hqq, "__version__", "0.2.8.post1"),
              "options": {"nbits": bits, "group_size": group, "quant_zero": False, "quant_scale": False, "axis": 1}}
    return model.to(torch.bfloat16), tok, fields


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One row, in this (fresh) process: quantize (or reuse the artifact), then perplexity and KL."""
    import torch

    from quantsafe.models import load_model, resolve_model
    from quantsafe.quantization import QuantConfig, load_quantized, quantize_variant

    row: dict[str, Any] = {"rss_after_imports_mb": _rss_mb()}
    torch.manual_seed(0)
    resolved = resolve_model(spec["model"])
    if spec["method"] == "none":
        start = time.perf_counter()
        model, tok = load_model(resolved, torch.bfloat16)
        row |= {"bits_per_weight": 16.0, "seconds": round(time.perf_counter() - start, 1), "peak_rss_mb": _rss_mb()}
    elif spec["method"] == "hqq":
        model, tok, fields = _hqq(resolved, spec)
        row |= fields
    else:
        config = QuantConfig.from_dict({"method": spec["method"], "bits": spec["bits"], **spec["config"]})
        artifact = quantize_variant(resolved, config, DATA_DIR, Path(spec["artifacts"]))
        stats_file = Path(spec["artifacts"]) / "bench_stats" / f"{artifact.path.name}.json"
        if not artifact.reused:  # the peak RSS of a reused artifact would be the loader's, not the quantizer's
            stats_file.parent.mkdir(parents=True, exist_ok=True)
            stats_file.write_text(json.dumps({"peak_rss_mb": _rss_mb(), "rss_after_imports_mb":
                                              row["rss_after_imports_mb"]}))
        stats = json.loads(stats_file.read_text()) if stats_file.exists() else {}
        row |= {"bits_per_weight": round(artifact.bits_per_weight, 4), "seconds": artifact.seconds,
                "peak_rss_mb": stats.get("peak_rss_mb"), "rss_after_imports_mb": stats.get("rss_after_imports_mb"),
                "artifact_id": artifact.artifact_id, "method_version": artifact.method_version,
                "options": artifact.config.options, "layer_bits": artifact.config.layer_bits,
                "group_size": artifact.config.group_size,
                "calibration": artifact.calibration and {k: artifact.calibration[k] for k in
                                                         ("source", "n_samples", "seq_len", "token_sha256")
                                                         if k in artifact.calibration}}
        model, tok = load_quantized(artifact.path, dtype=torch.bfloat16)
    return row | _ppl_fields(model, tok, spec) | _kl_fields(model, tok, spec)


# ----------------------------------------------------------------------------------------------- driver


def _model_facts(model: str) -> dict[str, Any]:
    """Size of the full-precision weights and of one block's widest activation cache, for the RSS target."""
    from transformers import AutoConfig

    from quantsafe.models import resolve_model

    path = resolve_model(model).path
    cfg = AutoConfig.from_pretrained(str(path))
    weights = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    return {"weights_mb": round(weights / 2**20, 1), "hidden": cfg.hidden_size,
            "intermediate": cfg.intermediate_size, "blocks": cfg.num_hidden_layers}


def _rss_target(facts: dict[str, Any], n_samples: int, seq_len: int) -> float:
    """1.5 × the full-precision weights + one block's activations (the widest Linear input, fp32, all windows)."""
    activations = n_samples * seq_len * facts["intermediate"] * 4 / 2**20
    return round(1.5 * facts["weights_mb"] + activations, 1)


def _run_child(spec: dict[str, Any], log: Path) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    with open(log, "a", encoding="utf-8") as err:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=CHILD_ENV, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"row {spec['label']} failed (exit {proc.returncode}); see {log}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def _save(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "calibration": {"source": "wikitext-2 wiki.valid.tokens (never the test split)",
                        "n_samples": args.n_samples, "seq_len": args.seq_len, "seed": 0,
                        "note": f"the same windows calibrate every post-training method but AWQ ({AWQ_DATA}); QAT "
                                f"rows train on self-generated text instead ({QAT_DATA})"},
        "perplexity": {"dataset": "wikitext-2 wiki.test.tokens joined by '\\n\\n', tokenized once",
                       "window": args.ppl_seq_len, "max_windows": args.ppl_max_windows or "all",
                       "protocol": "non-overlapping windows; ppl = exp(mean NLL); bf16 forward, fp32 log-softmax"},
        "kl_safety_prompts": {"prompts": f"{args.kl_prompts} OpenSafetyMini prompts (stratified, seed 0), chat "
                              "template with generation prompt", "measure": "mean over prompt positions of "
                              "KL(p_bf16 || p_variant), nats; both models in bf16"},
        "bits_per_weight": "everything each quantized Linear stores (codes, codebooks, scales, zeros, g_idx, "
                           "outlier columns, sign vectors, adapters) / its weights; embeddings, norms, lm_head "
                           "and biases excluded (algorithms.md §8); 'none' rows are bf16 = 16",
        "scalar_group_size": SCALAR_GROUP,
        "seconds": "quantization wall time in a fresh process: model load + calibration + quantization + save",
        "peak_rss_mb": "peak resident memory of that process up to the end of quantization (ru_maxrss); "
                       "rss_after_imports_mb is the same process before any model was loaded",
        "rss_target_mb": "1.5 × full-precision weights + n_samples × seq_len × intermediate × 4 bytes",
        "env": {"OMP_WAIT_POLICY": "PASSIVE", "threads": "torch default"},
        "load_avg_1min": "the machine's 1-minute load average when the row started and ended: above ~2 on these "
                         "2 cores, other jobs shared the CPU and the row's seconds are inflated (perplexity and KL "
                         "are not)",
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--only", nargs="+", help="row labels to run (default: all)", choices=[r[0] for r in ROWS])
    parser.add_argument("--n-samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--ppl-seq-len", type=int, default=512)
    parser.add_argument("--ppl-max-windows", type=int, default=None, help="default: all windows of the split")
    parser.add_argument("--kl-prompts", type=int, default=64)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--artifacts", type=Path, default=Path.home() / ".cache" / "quantsafe" / "bench-quantizers")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _machine import machine_info
    from quantsafe.quantization import get_quantizer_class, known_methods

    doc = json.loads(args.out.read_text(encoding="utf-8")) if args.out.exists() else {"rows": []}
    settings = _settings(args)
    if doc["rows"] and doc.get("settings") != settings:
        raise SystemExit(f"{args.out} holds rows measured with other settings; use another --out")
    doc["machine"], doc["settings"] = machine_info(), settings
    log = Path("/tmp") / "bench_quantizers_workers.log"
    for model in args.models:
        facts = _model_facts(model)
        for label, method, bits, extra in ROWS:
            if args.only and label not in args.only:
                continue
            if any(r["model"] == model and r["label"] == label for r in doc["rows"]):
                continue
            if method not in ("none", "hqq", *known_methods()):
                print(f"    -- {label}: method '{method}' is not implemented here; skipped", flush=True)
                continue
            calibrated = method not in ("none", "hqq") and get_quantizer_class(method).needs_calibration
            config = dict(extra)
            if calibrated:
                config.setdefault("calibration", {"source": "wikitext2", "n_samples": args.n_samples,
                                                  "seq_len": args.seq_len})
            spec = {"model": model, "label": label, "method": method, "bits": bits, "config": config,
                    "ppl_seq_len": args.ppl_seq_len, "ppl_max_windows": args.ppl_max_windows,
                    "kl_prompts": args.kl_prompts, "artifacts": str(args.artifacts)}
            print(f"[{time.strftime('%H:%M:%S')}] {model} {label}", flush=True)
            load_before = os.getloadavg()[0]
            try:
                result = _run_child(spec, log)
            except RuntimeError as exc:
                print(f"    !! {exc}", flush=True)
                continue
            implementation = "reference:hqq" if method == "hqq" else "quantsafe"
            row = {"model": model, "label": label, "method": method, "bits": bits,
                   "implementation": implementation, **result, "model_facts": facts,
                   "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
            if calibrated and result.get("peak_rss_mb") is not None:
                row["rss_target_mb"] = _rss_target(facts, args.n_samples, args.seq_len)
            doc["rows"].append(row)
            _save(args.out, doc)
            print(f"    -> ppl {row['ppl']}  kl {row['kl_safety_prompts']}  bpw {row['bits_per_weight']}  "
                  f"{row['seconds']} s  rss {row['peak_rss_mb']} MB", flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":  # a child process started by _run_child
        print(json.dumps(worker(json.loads(sys.argv[2]))))
    else:
        main()

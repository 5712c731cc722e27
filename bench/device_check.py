"""Every quantizer on a GPU: results stay on the device, agree with the CPU, and how long the real shapes take.

Runs where no model weights can travel (a lent GPU machine): models are randomly initialised with the real
architectures' shapes, calibrated on random tokens. So the timings are real and the perplexities meaningless.

1. Agreement: a small random Qwen2 model (hidden 128) quantized by each method on the CPU and on the GPU from the
   same weights and tokens; the dequantized weights must be close (float arithmetic differs between devices, and
   discrete choices such as codewords or act-order can flip on near-ties) and every layer must come back on CUDA.
2. Timing: each method on Qwen2.5-0.5B's shapes (bf16, `--blocks` of its 24 decoder blocks) and on
   Llama-3.1-8B's shapes (one block), calibration `--n-samples` × `--seq-len` random tokens; seconds per block and
   peak GPU memory, projected to the whole model by the block count.

    python bench/device_check.py --out bench/results/device_check.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from quantsafe.quantization import QuantConfig, known_methods, make_quantizer  # noqa: E402

# Each method at the paper's bit width (the 2-bit vector quantizers, 4 bits for the rest); small training budgets.
CONFIGS: dict[str, dict[str, Any]] = {
    "rtn": {"bits": 4, "group_size": 64},
    "gptq": {"bits": 4, "group_size": 64},
    "awq": {"bits": 4, "group_size": 64},
    "quik": {"bits": 4, "group_size": None, "sym": True},
    "quip_sharp": {"bits": 2},
    "aqlm": {"bits": 2},
    "aqlm-1x16": {"bits": 2, "options": {"num_codebooks": 1, "nbits_per_codebook": 16}},
    "ste": {"bits": 4, "group_size": None, "sym": True, "options": {"steps": 8, "window": None}},
    "qlora": {"bits": 4, "group_size": 64, "options": {"steps": 8, "window": None}},
}
QWEN_05B = {"hidden_size": 896, "intermediate_size": 4864, "num_attention_heads": 14, "num_key_value_heads": 2,
            "vocab_size": 151936, "max_position_embeddings": 4096, "tie_word_embeddings": True}
LLAMA_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
            "vocab_size": 128256, "max_position_embeddings": 4096}


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu only to try the script out


def _config(label: str) -> QuantConfig:
    return QuantConfig.from_dict({"method": label.split("-")[0], **CONFIGS[label]})


def _model(kind: str, layers: int, dtype: torch.dtype, device: str, **shape: Any) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    if kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(num_hidden_layers=layers, **shape))
    else:
        model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=layers, **shape))
    return model.to(dtype=dtype, device=device).eval()


def _quantize(label: str, model: Any, tokens: torch.Tensor) -> dict[str, Any]:
    cfg = _config(label)
    torch.manual_seed(cfg.seed)
    quantizer = make_quantizer(cfg)
    return quantizer.quantize_model(model, tokens if quantizer.needs_calibration else None, batch_size=8)


def agreement(label: str) -> dict[str, Any]:
    small = {"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2,
             "vocab_size": 256, "max_position_embeddings": 256}
    tokens = torch.randint(0, 256, (16, 64), generator=torch.Generator().manual_seed(0))
    out: dict[str, Any] = {}
    results = {}
    for device in ("cpu", DEVICE):
        model = _model("qwen2", 2, torch.float32, device, **small)
        start = time.perf_counter()
        results[device] = _quantize(label, model, tokens.to(device))
        out[f"{device}_seconds"] = round(time.perf_counter() - start, 2)
    devices = {r.dequantize().device.type for r in results[DEVICE].values()}
    diffs = []
    for name, cpu_layer in results["cpu"].items():
        a = cpu_layer.dequantize()
        b = results[DEVICE][name].dequantize().cpu()
        diffs.append(float((a - b).norm() / a.norm().clamp(min=1e-12)))
    return out | {"layers": len(diffs), "result_devices": sorted(devices), "max_rel_weight_diff": round(max(diffs), 6),
                  "mean_rel_weight_diff": round(sum(diffs) / len(diffs), 6),
                  "bits_match": all(results["cpu"][n].storage_bits() == results[DEVICE][n].storage_bits()
                                    for n in results["cpu"])}


def timing(label: str, kind: str, shape: dict[str, Any], blocks: int, total_blocks: int, n_samples: int,
           seq_len: int) -> dict[str, Any]:
    model = _model(kind, blocks, torch.bfloat16, DEVICE, **shape)
    tokens = torch.randint(0, shape["vocab_size"], (n_samples, seq_len), generator=torch.Generator().manual_seed(0))
    cuda = DEVICE == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    results = _quantize(label, model, tokens)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    bpw = sum(r.storage_bits() for r in results.values()) / sum(r.shape[0] * r.shape[1] for r in results.values())
    return {"blocks": blocks, "seconds": round(seconds, 2), "seconds_per_block": round(seconds / blocks, 2),
            "projected_model_seconds": round(seconds / blocks * total_blocks, 1),
            "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
            "bits_per_weight": round(bpw, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--methods", nargs="+", default=[m for m in CONFIGS if m.split("-")[0] in known_methods()])
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--n-samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--skip-8b", action="store_true")
    args = parser.parse_args()
    doc: dict[str, Any] = {"torch": torch.__version__,
                           "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (trial run)",
                           "settings": vars(args) | {"out": str(args.out)}, "agreement": {}, "qwen2.5-0.5b": {},
                           "llama-3.1-8b": {}}

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=2) + "\n")

    stages: list[tuple[str, list[str], Any]] = [
        ("agreement", args.methods, agreement),
        ("qwen2.5-0.5b", args.methods,
         lambda label: timing(label, "qwen2", QWEN_05B, args.blocks, 24, args.n_samples, args.seq_len)),
    ]
    if not args.skip_8b:  # AQLM 1x16 scores 65,536 candidates per group: too long for one 8B block here
        stages.append(("llama-3.1-8b", [m for m in args.methods if m != "aqlm-1x16"],
                       lambda label: timing(label, "llama", LLAMA_8B, 1, 32, args.n_samples, args.seq_len)))
    for stage, labels, run in stages:  # stage by stage: a cut-off run still has every method's first checks
        for label in labels:
            try:
                doc[stage][label] = run(label)
            except Exception as exc:  # one method failing must not hide the others' results
                doc[stage][label] = {"error": f"{type(exc).__name__}: {exc}",
                                     "where": traceback.format_exc().splitlines()[-3:]}
            print(stage, label, doc[stage][label], flush=True)
            save()
            if DEVICE == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

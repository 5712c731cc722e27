"""Why GPTQ W4 g64 does not beat RTN W4 g64 on qwen2.5-coder-0.5b (issue 7): per-layer evidence.

Three measurements on the bench's calibration ids (128 × 512 WikiText-2 valid, seed 0), block inputs computed by
the full-precision blocks before them (the GPTQ pipeline feeds quantized blocks' outputs; the difference is small
for this question and keeps the analysis to one cheap pass):

1. `grid`: for every Linear, its GGUF tensor type and how close its bf16 weights sit to a min-max 4-bit grid:
   the fraction of residuals (w − min)/step − round(·) within ±1/8 step, per group of 32/64/128 input columns.
   Weights not on such a grid give 0.25; weights on it give ~1.
2. `diag_h`: for every block and input (q/k/v share one, gate/up share one): the top-1 and top-8 channels' share
   of Σ diag(H), max/median of diag(H), and the dampening GPTQ adds, λ = damp × mean(diag H), relative to the
   median diagonal entry (λ ≫ median means most columns are regularised towards round-to-nearest).
3. `proxy_loss`: for every Linear of `--blocks`, the layer loss tr(ΔW H ΔWᵀ) (H = E[x xᵀ], undampened, the
   quantity GPTQ minimises) of RTN and of GPTQ variants: dampening 0.01/0.001/0.0001, dynamic groups, and the
   "massive" channels (diag H > `--massive` × median) scaled down to that bound before GPTQ sees H. Also the
   fraction of codes at the ends of the grid (0 or 2^b − 1), where GPTQ's updated columns get clamped.

    .venv/bin/python bench/gptq_hessian.py                       # writes bench/results/gptq_hessian.json
    .venv/bin/python bench/gptq_hessian.py --blocks 0 --bits 4   # quicker
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from quantsafe.quantization.sequential import BlockContext

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "gptq_hessian.json"
DATA_DIR = Path(os.environ.get("QUANTSAFE_DATA_DIR", REPO.parent / "shared" / "data"))
GGUF_NAMES = {  # HF Linear name inside a block → GGUF tensor name inside `blk.N.`
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_types(path: Path) -> dict[str, str]:
    """GGUF tensor type of every decoder Linear, by its HF module name."""
    from gguf import GGUFReader

    by_gguf = {t.name: t.tensor_type.name for t in GGUFReader(str(path)).tensors}
    types = {}
    for key in by_gguf:
        parts = key.split(".")
        if parts[0] != "blk" or parts[-1] != "weight":
            continue
        for hf, gg in GGUF_NAMES.items():
            if parts[2] == gg:
                types[f"model.layers.{parts[1]}.{hf}"] = by_gguf[key]
    return types


def on_grid_fraction(w: torch.Tensor, bits: int, group: int) -> float:
    """Fraction of weights within 1/8 step of a per-group min-max `bits`-bit grid (0.25 if unrelated)."""
    x = w.float().reshape(-1, group)
    lo, hi = x.min(1).values, x.max(1).values
    step = ((hi - lo) / (2**bits - 1)).clamp(min=1e-12)
    r = (x - lo[:, None]) / step[:, None]
    return round(float(((r - r.round()).abs() < 0.125).float().mean()), 3)


def diag_summary(diag: torch.Tensor, damps: list[float], massive: float) -> dict[str, Any]:
    d = diag.double()
    total, median = float(d.sum()), float(d.median())
    top = torch.sort(d, descending=True).values
    out: dict[str, Any] = {
        "cols": d.numel(),
        "top1_channel": int(torch.argmax(d)),
        "top1_share": round(float(top[0]) / total, 4),
        "top8_share": round(float(top[:8].sum()) / total, 4),
        "max_over_median": round(float(top[0]) / median, 1),
        "mean_over_median": round(float(d.mean()) / median, 2),
        f"n_massive_over_{massive:g}x_median": int((d > massive * median).sum()),
    }
    for damp in damps:
        lam = damp * float(d.mean())
        out[f"lambda_{damp:g}_over_median"] = round(lam / median, 4)
        out[f"frac_cols_diag_below_lambda_{damp:g}"] = round(float((d < lam).double().mean()), 4)
    return out


def clip_massive(h: torch.Tensor, massive: float) -> torch.Tensor:
    """H with every channel whose diagonal exceeds `massive` × median scaled (row and column) down to it."""
    diag = torch.diag(h)
    bound = massive * diag.median()
    d = torch.sqrt(torch.clamp(bound / diag.clamp(min=1e-30), max=1.0))
    return h * d[:, None] * d[None, :]


def layer_loss(dq: torch.Tensor, w: torch.Tensor, h: torch.Tensor) -> float:
    delta = dq.float() - w.float()
    return float(((delta @ h) * delta).sum())


def edge_fraction(codes: torch.Tensor, bits: int) -> float:
    return round(float(((codes == 0) | (codes == 2**bits - 1)).float().mean()), 4)


INPUT_OF = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "o_proj": "o", "gate_proj": "gate_up",
            "up_proj": "gate_up", "down_proj": "down"}


class _InputHooks:
    """Per distinct block input (hooks on the first Linear reading it): Σ x² per channel, or with `full` Σ x xᵀ
    over all tokens and over position 0 alone (the attention-sink token, where massive activations live)."""

    def __init__(self, block: torch.nn.Module, full: bool) -> None:
        self.full = full
        self.sq: dict[str, torch.Tensor] = {}
        self.xtx: dict[str, torch.Tensor] = {}
        self.xtx_first: dict[str, torch.Tensor] = {}
        self.n = self.n_first = 0
        first: dict[str, torch.nn.Module] = {}
        for name, m in block.named_modules():
            if isinstance(m, torch.nn.Linear):
                first.setdefault(INPUT_OF[name.split(".")[-1]], m)
        self.handles = [m.register_forward_hook(self._hook(g)) for g, m in first.items()]

    @staticmethod
    def _add(acc: dict[str, torch.Tensor], key: str, value: torch.Tensor) -> None:
        acc[key] = acc[key] + value if key in acc else value

    def _hook(self, group: str) -> Any:
        def hook(_: torch.nn.Module, args: tuple[Any, ...], __: Any) -> None:
            x = args[0].float()
            flat = x.reshape(-1, x.shape[-1])
            if group == "qkv":
                self.n += flat.shape[0]
                self.n_first += x.shape[0]
            if self.full:
                self._add(self.xtx, group, flat.T @ flat)
                self._add(self.xtx_first, group, x[:, 0].T @ x[:, 0])
            else:
                self._add(self.sq, group, flat.square().sum(0))

        return hook

    def hessians(self) -> dict[str, dict[str, torch.Tensor]]:
        """E[x xᵀ] over all tokens, position 0 only, and the other positions, per input."""
        return {g: {"all": self.xtx[g] / self.n, "first": self.xtx_first[g] / self.n_first,
                    "rest": (self.xtx[g] - self.xtx_first[g]) / (self.n - self.n_first)} for g in self.xtx}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _run(block: torch.nn.Module, batches: list[Any], index: int, hooks: _InputHooks) -> list[torch.Tensor]:
    try:
        return BlockContext(block, index, batches).forward()
    finally:
        hooks.remove()


@torch.no_grad()
def proxy_losses(block: torch.nn.Module, hs: dict[str, dict[str, torch.Tensor]],
                 held: dict[str, torch.Tensor], args: argparse.Namespace) -> list[dict[str, Any]]:
    """RTN vs GPTQ variants per Linear; GPTQ sees the calibration H, losses under calibration H (all tokens,
    position 0, other positions) and under the held-out H (WikiText-2 test windows)."""
    from quantsafe.quantization.methods.gptq import GPTQOptions, gptq_quantize, prepare_hessian
    from quantsafe.quantization.methods.rtn import rtn_quantize

    every = {
        "default": ("gptq damp 0.01 (default)", GPTQOptions(), False),
        "damp0.001": ("gptq damp 0.001", GPTQOptions(damp_percent=0.001), False),
        "damp0.0001": ("gptq damp 0.0001", GPTQOptions(damp_percent=0.0001), False),
        "dynamic": ("gptq damp 0.01, dynamic groups", GPTQOptions(static_groups=False), False),
        "clipped": (f"gptq damp 0.01, massive channels clipped to {args.massive:g}x median", GPTQOptions(), True),
    }
    variants = [every[k] for k in args.variants]
    low_bits = {every[k][0] for k in args.variants_low_bits}
    rows = []
    for name, lin in block.named_modules():
        if not isinstance(lin, torch.nn.Linear):
            continue
        group = INPUT_OF[name.split(".")[-1]]
        h = hs[group]
        under = {"calib": h["all"], "calib_pos0": h["first"], "calib_pos1+": h["rest"], "heldout": held[group]}
        w = lin.weight
        prepared = {label: prepare_hessian(clip_massive(h["all"], args.massive) if clipped else h["all"], options)
                    for label, options, clipped in variants}
        for bits in args.bits:
            rtn = rtn_quantize(w, bits, args.group_size, False).dequantize(torch.float32)
            rtn_loss = {k: layer_loss(rtn, w, hk) for k, hk in under.items()}
            row: dict[str, Any] = {"linear": name, "bits": bits, "rtn_loss": rtn_loss}
            for label, options, _ in variants:
                if bits != 4 and label not in low_bits:
                    continue
                start = time.perf_counter()
                q = gptq_quantize(w, prepared[label], bits, args.group_size, False, options)
                dq = q.dequantize(torch.float32)
                row[label] = {
                    **{f"over_rtn_{k}": round(layer_loss(dq, w, hk) / rtn_loss[k], 4) for k, hk in under.items()},
                    "edge_codes": edge_fraction(q.codes, bits),
                    "seconds": round(time.perf_counter() - start, 1),
                }
            row["rtn_edge_codes"] = edge_fraction(rtn_quantize(w, bits, args.group_size, False).codes, bits)
            rows.append(row)
            print(f"    {name:18s} W{bits} over_rtn calib/heldout/pos0: " + "  ".join(
                f"{v['over_rtn_calib']:.3f}/{v['over_rtn_heldout']:.3f}/{v['over_rtn_calib_pos0']:.2f}"
                for v in row.values() if isinstance(v, dict) and "over_rtn_calib" in v), flush=True)
    return rows


def summarise(proxy: list[dict[str, Any]]) -> dict[str, Any]:
    """Per bit width and variant, over the analysed Linears: the geometric mean of each loss ratio to RTN, the
    worst Linear's held-out ratio and how many Linears."""
    out: dict[str, Any] = {}
    for blk in proxy:
        for row in blk["rows"]:
            for label, v in row.items():
                if isinstance(v, dict) and "over_rtn_calib" in v:
                    for k, r in v.items():
                        if k.startswith("over_rtn"):
                            out.setdefault(f"W{row['bits']}", {}).setdefault(label, {}).setdefault(k, []).append(r)
    return {b: {label: {**{k: round(math.exp(statistics.mean(math.log(x) for x in xs)), 4) for k, xs in d.items()},
                        "max_over_rtn_heldout": max(d["over_rtn_heldout"]), "n_linears": len(d["over_rtn_heldout"])}
                for label, d in per.items()} for b, per in out.items()}


def _grid(layers: torch.nn.ModuleList, gguf: Path) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Per Linear: GGUF type and on-grid fractions; and the mean 4-bit g64 fraction per (Linear kind, type)."""
    types = gguf_types(gguf)
    grid: list[dict[str, Any]] = []
    for i, block in enumerate(layers):
        for name, lin in block.named_modules():
            if isinstance(lin, torch.nn.Linear):
                key = f"model.layers.{i}.{name}"
                grid.append({"linear": key, "gguf_type": types.get(key),
                             **{f"on_grid_4bit_g{g}": on_grid_fraction(lin.weight, 4, g) for g in (32, 64, 128)},
                             "on_grid_3bit_g64": on_grid_fraction(lin.weight, 3, 64)})
    by_type: dict[str, list[float]] = {}
    for g in grid:
        by_type.setdefault(f"{g['linear'].split('.')[-1]} {g['gguf_type']}", []).append(g["on_grid_4bit_g64"])
    return grid, {k: round(statistics.mean(v), 3) for k, v in sorted(by_type.items())}


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--blocks", nargs="*", type=int, default=[2, 12, 23],
                        help="blocks whose full Hessians get the proxy-loss comparison")
    parser.add_argument("--bits", nargs="+", type=int, default=[4, 3])
    keys = ["default", "damp0.001", "damp0.0001", "dynamic", "clipped"]
    parser.add_argument("--variants", nargs="+", choices=keys, default=keys, help="GPTQ variants at 4 bits")
    parser.add_argument("--variants-low-bits", nargs="*", choices=keys, default=["default", "dynamic"])
    parser.add_argument("--append", action="store_true",
                        help="add proxy losses of more --blocks to an existing --out (same calibration), "
                        "stopping after the last of them")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--n-samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--heldout-windows", type=int, default=32, help="first N WikiText-2 test windows")
    parser.add_argument("--massive", type=float, default=100.0, help="massive channel: diag H > this × median")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    from quantsafe.models import load_model, resolve_model
    from quantsafe.models.loading import gguf_path
    from quantsafe.quantization import CalibrationConfig, build_calibration
    from quantsafe.quantization.perplexity import wikitext2_test_tokens
    from quantsafe.quantization.sequential import capture_block_inputs, decoder_layers

    torch.manual_seed(0)
    model, tok = load_model(resolve_model(args.model))
    cal = build_calibration(CalibrationConfig(n_samples=args.n_samples, seq_len=args.seq_len, seed=0), tok, DATA_DIR)
    heldout = wikitext2_test_tokens(tok, DATA_DIR)[: args.heldout_windows * args.seq_len].reshape(-1, args.seq_len)
    doc: dict[str, Any] = {
        "model": args.model,
        "settings": {
            "calibration": f"{args.n_samples} x {args.seq_len} WikiText-2 valid, seed 0 (the bench's ids)",
            "calibration_sha256": cal.token_sha256,
            "heldout": f"first {args.heldout_windows} perplexity windows of WikiText-2 test ({args.seq_len} tokens)",
            "block_inputs": "outputs of the full-precision blocks before (not of quantized ones)",
            "group_size": args.group_size, "sym": False,
            "gptq": "quantsafe gptq_quantize on the calibration H: act-order, static groups unless stated, block 128",
            "loss": "tr(dW H dW^T), H = E[x x^T] undampened, fp32; over_rtn_X = GPTQ loss / RTN loss under H of X: "
                    "calib (all calibration tokens), calib_pos0 (position 0 of each window, the attention sink), "
                    "calib_pos1+ (the other positions), heldout",
            "massive": f"diag H > {args.massive:g} x median(diag H)",
            "edge_codes": "fraction of codes at 0 or 2^b - 1",
        },
    }

    layers = decoder_layers(model)
    if args.append:
        doc = json.loads(args.out.read_text(encoding="utf-8"))
        if doc["settings"]["calibration_sha256"] != cal.token_sha256:
            raise SystemExit(f"{args.out} was measured on other calibration ids")
        analysed = {b["block"] for b in doc["proxy_loss"]}
        args.blocks = [b for b in args.blocks if b not in analysed]
    else:
        doc["grid"], doc["grid_summary_4bit_g64"] = _grid(layers, gguf_path(args.model))
        print(json.dumps(doc["grid_summary_4bit_g64"], indent=1), flush=True)
        doc["diag_h"], doc["proxy_loss"] = [], []
    with_diag = {r["block"] for r in doc["diag_h"]}

    doc.setdefault("runs", []).append({"argv": sys.argv[1:], "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                         time.gmtime())})
    damps = [0.01, 0.001, 0.0001]
    batches = capture_block_inputs(model, cal.tokens, 8)
    held_batches = capture_block_inputs(model, heldout, 8)
    for i, block in enumerate(layers):
        if args.append and i > max(args.blocks, default=-1):
            break
        start = time.perf_counter()
        full = i in args.blocks
        hooks = _InputHooks(block, full)
        outputs = _run(block, batches, i, hooks)
        if full:
            hs = hooks.hessians()
            diags = {g: torch.diag(h["all"]) for g, h in hs.items()}
            held_hooks = _InputHooks(block, True)
            held_out = _run(block, held_batches, i, held_hooks)
            held = {g: h["all"] for g, h in held_hooks.hessians().items()}
        else:
            diags = {g: s / hooks.n for g, s in hooks.sq.items()}
            held_out = BlockContext(block, i, held_batches).forward()
        if i not in with_diag:
            for group, d in diags.items():
                doc["diag_h"].append({"block": i, "input": group, **diag_summary(d, damps, args.massive)})
            print(f"[{time.strftime('%H:%M:%S')}] block {i}: " + "  ".join(
                f"{r['input']} top1 {r['top1_share']:.3f} max/med {r['max_over_median']:.0f} "
                f"lam/med {r['lambda_0.01_over_median']:.3f}" for r in doc["diag_h"][-4:]), flush=True)
        if full:
            doc["proxy_loss"].append({"block": i, "rows": proxy_losses(block, hs, held, args)})
            doc["proxy_loss"].sort(key=lambda b: b["block"])
            doc["proxy_summary_geomean"] = summarise(doc["proxy_loss"])
            del hs, held
        for batch, out in zip(batches, outputs, strict=True):
            batch.hidden = out
        for batch, out in zip(held_batches, held_out, strict=True):
            batch.hidden = out
        print(f"    block {i} done in {time.perf_counter() - start:.0f} s", flush=True)
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _machine import machine_info

        doc["machine"], doc["compute_dtype"] = machine_info(), "bfloat16 block forwards; H, losses fp32"
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()

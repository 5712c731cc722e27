"""`quantsafe plan`: a study's cells, what its store already holds, and how long the rest takes on each kind of
device, before anything runs (the paper's grid took about 80 A40-hours; a user should know that first).

The estimate is a FLOP count divided by a throughput. Every forward pass of a P-parameter model costs about 2·P
FLOPs per token; prefill runs at a device's effective rate, batched decoding at a share of it, and quantizers at
the seconds per billion parameters measured in bench/results/device_check.json (H200), scaled per device. This
machine's rates come from `quantsafe plan --measure` (a prefill and a decode run of the default model, cached);
other kinds use the stated defaults below. Decoding is counted to max_new_tokens, so the estimate is an upper bound.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from pydantic import BaseModel

from quantsafe.benchmarks import Kind, Prompt, benchmark, load_benchmark
from quantsafe.benchmarks.xstest import load_xstest_completions
from quantsafe.datadir import cache_dir, resolve_data_dir
from quantsafe.errors import QuantsafeError
from quantsafe.judges.spec import JudgeSpec
from quantsafe.models.dtype import dtype_name, machine_info
from quantsafe.store import Store, VariantRow
from quantsafe.study.config import StudyConfig, VariantSpec

CHARS_PER_TOKEN = 4.0  # a rough English average; the estimate needs no tokenizer (the models may not be local)
CHAT_OVERHEAD = 30  # tokens of chat template around each prompt
LLM_JUDGE_PROMPT = 2400  # the paper's template with its few-shot examples, in tokens (judges/llm.py)
FULL_JUDGE_DECODE = 300  # tokens a full-mode (guided reasoning) verdict writes
ABLITERATION_TOKENS = 256 * 64  # 128 harmful + 128 harmless instructions of ~64 tokens, read once
TRAINED_FEATURE_MODEL = 0.49  # billions: the trained judge reads hidden states of the default model
PUBLISHED_SIZES = {"safetybench": (11435, 1500), "hotpotqa": (7405, 900)}  # items, prompt tokens when not local
QUANT_SECONDS_PER_B_GPU = {  # H200, bf16; bench/results/device_check.json (8B rows where measured, else 0.5B)
    "rtn": 0.1, "gptq": 30.5, "awq": 9.8, "quik": 24.6, "quip_sharp": 227.0, "aqlm": 187.0, "aqlm-1x16": 2306.0,
    "ste": 30.0, "qlora": 5.2,
}
CPU_OVER_GPU = 80.0  # GPTQ's CPU/H200 ratio, for methods not timed on a CPU
QUANT_SECONDS_PER_B_CPU = {  # 2 cores AVX512-BF16; bench/results/quantizers.json (SmolLM2-135M, 128 x 512 tokens)
    "rtn": 260.0, "gptq": 2430.0, "quip_sharp": 3010.0, "aqlm": 5930.0,
    **{m: s * CPU_OVER_GPU for m, s in QUANT_SECONDS_PER_B_GPU.items() if m in ("awq", "quik", "ste", "qlora",
                                                                               "aqlm-1x16")},
}


class DeviceKind(BaseModel):
    """A device's effective rates; `quant_scale` multiplies the quantizer times measured on its class of device
    (an H200 for GPUs, this 2-core AVX512-BF16 CPU for CPUs)."""

    name: str
    prefill_flops: float
    decode_share: float  # batched decode tokens/s over prefill tokens/s
    quant_scale: float
    cpu: bool = False
    source: str

    def quantize_seconds(self, method: str, params_b: float) -> float:
        table = QUANT_SECONDS_PER_B_CPU if self.cpu else QUANT_SECONDS_PER_B_GPU
        return table.get(method, table["gptq"]) * params_b * self.quant_scale


DEFAULT_KINDS = [
    DeviceKind(name="A40", prefill_flops=60e12, decode_share=0.10, quant_scale=4.0,
               source="default: 150 TFLOP/s bf16 peak at 40%; decode at 10% (HF generate, batch 32)"),
    DeviceKind(name="H100", prefill_flops=300e12, decode_share=0.06, quant_scale=1.2,
               source="default: 750 TFLOP/s bf16 dense peak at 40%; decode at 6%"),
    DeviceKind(name="CPU 2 cores AVX512-BF16", prefill_flops=0.7e12, decode_share=0.13, quant_scale=1.0, cpu=True,
               source="default: measured on Qwen2.5-0.5B, bf16 (bench/results/generation.json: prefill 721 tok/s, "
                      "batched decode 93 tok/s; quantizers.json)"),
    DeviceKind(name="CPU 2 cores AVX2", prefill_flops=0.14e12, decode_share=0.13, quant_scale=5.0, cpu=True,
               source="default: fp32 (bf16 is emulated there), about 5x slower than AVX512-BF16"),
]


def model_params(ref: str) -> float:
    """Billions of parameters from a model's name (8B, 0.5b, 135M): the models need not be downloaded to plan."""
    found = re.findall(r"(?<![\d.])(\d+(?:\.\d+)?)([bm])(?![a-z])", ref.lower())
    if not found:
        raise QuantsafeError(f"cannot tell the size of model '{ref}' from its name; plan needs e.g. '7B' in it")
    value, unit = found[-1]
    return float(value) / (1000.0 if unit == "m" else 1.0)


def _tokens(text: str) -> float:
    return len(text) / CHARS_PER_TOKEN + CHAT_OVERHEAD


class Line(BaseModel):
    """One row of the plan: a stage of one model (or judge), its items, those done, and hours per device kind."""

    model: str
    stage: str
    items: int
    done: int | None = None
    hours: dict[str, float]


class Plan(BaseModel):
    study: str
    kinds: list[DeviceKind]
    lines: list[Line]
    notes: list[str]

    def totals(self) -> dict[str, float]:
        return {k.name: sum(line.hours[k.name] for line in self.lines) for k in self.kinds}

    def by_stage(self) -> list[Line]:
        """One line per model and stage (quantize, generate, score, judge...), summed over variants."""
        grouped: dict[tuple[str, str], Line] = {}
        for line in self.lines:
            key = (line.model, line.stage.split()[0])
            if key not in grouped:
                grouped[key] = Line(model=line.model, stage=key[1], items=0, done=None,
                                    hours=dict.fromkeys(line.hours, 0.0))
            g = grouped[key]
            g.items += line.items
            g.done = None if line.done is None else (g.done or 0) + line.done
            g.hours = {k: g.hours[k] + h for k, h in line.hours.items()}
        return list(grouped.values())


def _load_items(cfg: StudyConfig, data_dir: Path | None, notes: list[str]) -> dict[str, tuple[int, float, Kind]]:
    """benchmark -> (items, mean prompt tokens, kind); benchmarks missing from the data directory are counted at
    their published size."""
    out: dict[str, tuple[int, float, Kind]] = {}
    for b in cfg.benchmarks:
        kind = benchmark(b.name).kind
        prompts: list[Prompt] = []
        if data_dir is not None:
            try:
                prompts = load_benchmark(b.name, data_dir, langs=b.langs, limit=b.limit,
                                         limit_per_scenario=b.limit_per_scenario, seed=b.seed,
                                         permutations=b.permutations)
            except QuantsafeError as exc:
                notes.append(f"{b.name}: {exc}")
        if prompts:
            out[b.name] = (len(prompts), sum(_tokens(p.text) for p in prompts) / len(prompts), kind)
        elif b.name in PUBLISHED_SIZES:
            n, tokens = PUBLISHED_SIZES[b.name]
            n = min(n, b.limit) if b.limit else n
            out[b.name] = (n, tokens, kind)
            notes.append(f"{b.name}: not in the data directory; counted at its published size ({n} items)")
    return out


def _validation_items(cfg: StudyConfig, data_dir: Path | None) -> int:
    if cfg.validation is None:
        return 0
    sizes: dict[str, int] = {}
    if data_dir is not None:
        try:
            sizes = {k: len(v) for k, v in load_xstest_completions(data_dir).items()}
        except QuantsafeError:
            sizes = {}
    limit = cfg.validation.limit_per_set
    return sum(min(sizes.get(s, 450), limit) if limit else sizes.get(s, 450) for s in cfg.validation.sets)


def _matches(row: VariantRow, model: str, spec: VariantSpec) -> bool:
    if row.model != model:
        return False
    if spec.is_full_precision:
        return row.method == "none"
    if spec.abliterate is not None:
        return row.method == "abliterated" and row.config.get("abliterate") == spec.abliterate.model_dump(mode="json")
    if spec.import_ is not None:
        return False
    return row.config == spec.quant_config().model_dump(mode="json")


def _done(store: Store | None, model: str, spec: VariantSpec, table: str, judge: JudgeSpec | None = None,
          ) -> int | None:
    """Rows of `table` the store holds for the variant (any decoding), and for judges of `judge`'s kind and mode:
    how much of its work a rerun skips."""
    if store is None:
        return None
    ids = [v.variant_id for v in store.variants() if _matches(v, model, spec)]
    if not ids:
        return 0
    marks = ",".join("?" * len(ids))
    if judge is None:
        query = f"SELECT COUNT(*) FROM {table} WHERE variant_id IN ({marks})"
        return int(store.conn.execute(query, ids).fetchone()[0])
    judges = "SELECT judge_id FROM judges WHERE kind = ? AND (kind != 'llm' OR mode = ?)"  # only LLM modes differ
    return sum(int(store.conn.execute(f"SELECT COUNT(*) FROM {t} WHERE variant_id IN ({marks}) AND {column} IN "
                                      f"({judges})", [*ids, judge.kind, judge.mode]).fetchone()[0])
               for t, column in (("judgments", "judge_id"), ("refusals", "refusal_id")))


def _seconds(kind: DeviceKind, params_b: float, prefill: float, decode: float) -> float:
    flops = 2 * params_b * 1e9
    return flops * prefill / kind.prefill_flops + flops * decode / (kind.prefill_flops * kind.decode_share)


def make_plan(cfg: StudyConfig, out_dir: Path | None = None, kinds: Sequence[DeviceKind] | None = None) -> Plan:
    """Every stage of the study with its item count, what `out_dir`'s store holds, and hours per device kind."""
    kinds = list(kinds) if kinds is not None else [*measured_kinds(), *DEFAULT_KINDS]
    notes: list[str] = ["upper bound: every answer is counted to max_new_tokens"]
    try:
        data_dir: Path | None = resolve_data_dir(cfg.data_dir)
    except QuantsafeError as exc:
        data_dir = None
        notes.append(f"data: {exc}")
    items = _load_items(cfg, data_dir, notes)
    generated = [(n, t) for n, t, k in items.values() if k != Kind.CHOICE]
    choice = [(n, t) for n, t, k in items.values() if k == Kind.CHOICE]
    judged = sum(n for b, (n, _t, k) in items.items() if k == Kind.JUDGED)
    answer_tokens = cfg.decoding.max_new_tokens
    db = out_dir / "quantsafe.db" if out_dir is not None else None
    store = Store.open(db, create=False) if db is not None and db.is_file() else None
    lines: list[Line] = []

    def line(model: str, stage: str, n: int, done: int | None, seconds: dict[str, float]) -> None:
        lines.append(Line(model=model, stage=stage, items=n, done=done,
                          hours={k: s / 3600 for k, s in seconds.items()}))

    try:
        for model in cfg.models:
            p = model_params(model)
            for spec in cfg.variants:
                if not cfg.applies(spec, model):
                    continue
                label = spec.label()
                if spec.abliterate is not None:
                    line(model, f"abliterate ({label})", 1, None,
                         {k.name: _seconds(k, p, ABLITERATION_TOKENS, 0) for k in kinds})
                elif not spec.is_full_precision and spec.import_ is None:
                    qcfg = spec.quant_config()
                    key = "aqlm-1x16" if qcfg.method == "aqlm" and qcfg.options.get("nbits_per_codebook") == 16 \
                        else qcfg.method
                    line(model, f"quantize {label}", 1, None, {k.name: k.quantize_seconds(key, p) for k in kinds})
                n_gen = sum(n for n, _ in generated)
                line(model, f"generate {label}", n_gen, _done(store, model, spec, "generations"), {
                    k.name: _seconds(k, p, sum(n * t for n, t in generated), n_gen * answer_tokens) for k in kinds})
                if choice:
                    n_choice = sum(n for n, _ in choice)
                    line(model, f"score {label}", n_choice, _done(store, model, spec, "choices"),
                         {k.name: _seconds(k, p, sum(n * t for n, t in choice), 0) for k in kinds})
                for j in cfg.judges:
                    if j.kind in ("heuristic", "fake") or j.endpoint is not None:
                        continue  # no local model (an HTTP judge's cost is its server's)
                    jp = TRAINED_FEATURE_MODEL if j.kind == "trained" else model_params(j.model)
                    prompt = answer_tokens + (LLM_JUDGE_PROMPT if j.kind == "llm" else CHAT_OVERHEAD * 4)
                    decode = FULL_JUDGE_DECODE if j.kind == "llm" and j.mode == "full" else 0
                    done = _done(store, model, spec, "judgments", j)
                    line(model, f"judge {label} ({j.kind}/{j.mode})", judged, done,
                         {k.name: _seconds(k, jp, judged * prompt, judged * decode) for k in kinds})
        n_val = _validation_items(cfg, data_dir)
        for j in cfg.judges:
            if n_val and j.kind not in ("heuristic", "fake") and j.endpoint is None:
                jp = TRAINED_FEATURE_MODEL if j.kind == "trained" else model_params(j.model)
                prompt = 400 + (LLM_JUDGE_PROMPT if j.kind == "llm" else 0)
                decode = FULL_JUDGE_DECODE if j.kind == "llm" and j.mode == "full" else 0
                line(j.model if j.kind == "llm" else "trained judge", f"validate ({j.kind}/{j.mode})", n_val, None,
                     {k.name: _seconds(k, jp, n_val * prompt * 2, n_val * decode * 2) for k in kinds})
    finally:
        if store is not None:
            store.close()
    return Plan(study=cfg.name, kinds=kinds, lines=lines, notes=notes)


# --- this machine's rates ---------------------------------------------------------------------------------------

def _rates_file() -> Path:
    return cache_dir() / "throughput.json"


def _machine_key(device: str) -> str:
    info = machine_info()
    return f"{info.get('cpu_model')}|{info.get('cpu_capability')}|{device}"


def measured_kinds() -> list[DeviceKind]:
    """This machine's rates, when `quantsafe plan --measure` has measured them here."""
    path = _rates_file()
    if not path.is_file():
        return []
    rates = json.loads(path.read_text())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    entry = rates.get(_machine_key(device))
    return [DeviceKind.model_validate(entry)] if entry else []


def measure(model_ref: str | None = None, device: str = "auto", dtype: str = "auto") -> DeviceKind:
    """This machine's prefill FLOP/s (one long batch) and batched-decode share, on the default model; cached."""
    from quantsafe.backends.base import DecodingConfig
    from quantsafe.backends.hf import HFBackend
    from quantsafe.models import DEFAULT_MODEL, load_model, resolve_model
    from quantsafe.models.device import resolve_device
    from quantsafe.models.dtype import resolve_dtype

    dev = resolve_device(device)
    compute = resolve_dtype(dtype, dev)
    resolved = resolve_model(model_ref or DEFAULT_MODEL)
    model, tokenizer = load_model(resolved, compute, device=dev)
    params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(100, 1000, (8, 256), device=dev)
    with torch.inference_mode():
        model(ids[:1, :32])  # warm-up
        start = time.perf_counter()
        model(ids)
        prefill_tps = ids.numel() / (time.perf_counter() - start)
    backend = HFBackend(model, tokenizer, resolved.name)
    convs = [[{"role": "user", "content": f"Write a short note about the number {i}."}] for i in range(16)]
    start = time.perf_counter()
    gens = backend.generate(convs, DecodingConfig(max_new_tokens=32, batch_size=16))
    decode_tps = sum(g.n_new_tokens for g in gens) / (time.perf_counter() - start)
    info = machine_info()
    kind = DeviceKind(
        name="this machine", prefill_flops=2 * params * prefill_tps, decode_share=min(1.0, decode_tps / prefill_tps),
        quant_scale=1.0, cpu=dev.type == "cpu",
        source=f"measured {time.strftime('%Y-%m-%d')} on {info.get('cpu_model')} ({info.get('cpu_capability')}), "
               f"{dev}, {dtype_name(compute)}: prefill {prefill_tps:.0f} tok/s, decode {decode_tps:.1f} tok/s "
               f"({resolved.name})")
    path = _rates_file()
    rates = json.loads(path.read_text()) if path.is_file() else {}
    rates[_machine_key(dev.type)] = kind.model_dump()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rates, indent=1))
    return kind

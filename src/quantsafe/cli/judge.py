"""`quantsafe judge validate`: how far a judge agrees with people, on the shared or the user's own labels."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from quantsafe.errors import QuantsafeError, validation_message
from quantsafe.judges.spec import JudgeSpec
from quantsafe.judges.validation import AgreementRow

judge_app = typer.Typer(help="Judges: measure them against human labels.", no_args_is_help=True)
DEFAULT_SETS = ("gpt4", "llama2orig", "mistralinstruct_even_ids")


def _specs(study: Path | None, kind: str, mode: str, model: str | None, endpoint: dict[str, str | None],
           ) -> list[JudgeSpec]:
    if study is not None:
        from quantsafe.study import load_study

        return list(load_study(study).judges)
    fields: dict[str, object] = {"kind": kind, "mode": mode}
    if model is not None:
        fields["model"] = model
    if endpoint["base_url"] is not None:
        fields["endpoint"] = {k: v for k, v in endpoint.items() if v is not None}
    try:
        return [JudgeSpec.model_validate(fields)]
    except ValidationError as exc:
        raise QuantsafeError(validation_message(exc, "judge options")) from None


def _print(console: Console, rows: list[AgreementRow]) -> None:
    summary = Table(title="agreement with people (confusion: human label → the judge's labels)")
    for col in ("judge", "set", "mapping", "n", "acc", "kappa [95% CI]", "minority recall", "confusion",
                "held out", "items/s"):
        summary.add_column(col)
    for r in rows:
        conf = "\n".join(f"{h} → " + ", ".join(f"{p} {c}" for p, c in row.items()) for h, row in r.confusion.items())
        recall = f"{r.minority_label} {r.minority_recall:.2f}" if r.minority_recall is not None else "–"
        ci = f" [{r.kappa_ci[0]:.2f}, {r.kappa_ci[1]:.2f}]" if r.kappa_ci else ""
        summary.add_row(f"{r.mode} {r.judge[:8]}", r.set, r.mapping, str(r.n), f"{r.accuracy:.3f}",
                        f"{r.kappa:.3f}{ci}", recall, conf, r.held_out or "–", f"{r.items_per_s:.1f}")
    console.print(summary)
    for r in rows:
        per_type = Table(title=f"{r.mode} {r.judge[:8]} on {r.set}, {r.mapping} mapping, per XSTest type")
        for col in ("type", "n", "accuracy", "kappa"):
            per_type.add_column(col)
        for name, t in r.by_type.items():
            per_type.add_row(name, str(t.n), f"{t.accuracy:.2f}", "–" if t.kappa != t.kappa else f"{t.kappa:.2f}")
        console.print(per_type)


@judge_app.command("validate")
def validate(
    kind: Annotated[str, typer.Option(help="Judge kind: llm, heuristic, trained.")] = "llm",
    mode: Annotated[str, typer.Option(help="LLM judge mode: fast (verdict log-probs) or full (guided JSON).")] = "fast",
    model: Annotated[str | None, typer.Option(help="Judge model (llm) or feature model (trained).")] = None,
    base_url: Annotated[str | None, typer.Option(
        help="An OpenAI-compatible server to judge with (llm kind), e.g. http://127.0.0.1:8000/v1.")] = None,
    served_model: Annotated[str | None, typer.Option(help="The model name the server serves.")] = None,
    tokenizer: Annotated[str | None, typer.Option(
        help="Served model's tokenizer (name, directory, hub id), for fast mode over HTTP.")] = None,
    api_key_env: Annotated[str | None, typer.Option(help="Environment variable holding the API key.")] = None,
    study: Annotated[Path | None, typer.Option(help="Validate every judge a study YAML names instead.")] = None,
    sets: Annotated[list[str] | None, typer.Option(
        "--set", help="A labelled file of the data directory (gpt4, llama2orig, mistralinstruct_even_ids) or a "
        "path to a CSV with the same columns; repeatable (default: the three shared files).")] = None,
    mapping: Annotated[list[str] | None, typer.Option(help="refusal and/or safety (default: both).")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="At most this many items per set (seeded).")] = None,
    out: Annotated[Path | None, typer.Option(help="Also write the rows as JSON here.")] = None,
    data_dir: Annotated[Path | None, typer.Option("--data-dir", help="Data directory.")] = None,
    dtype: Annotated[str, typer.Option(help="Compute dtype of a local judge model: auto, bfloat16, float32.")] = "auto",
) -> None:
    """Accuracy, Cohen's kappa with a bootstrap CI, minority recall and the confusion matrix, overall and per
    XSTest type, for the refusal and safety mappings."""
    from quantsafe.backends.request_cache import RequestCache
    from quantsafe.benchmarks.xstest import load_labelled_sets
    from quantsafe.datadir import cache_dir, resolve_data_dir
    from quantsafe.judges.factory import judge_from_spec
    from quantsafe.judges.validation import validate_judge
    from quantsafe.models.dtype import resolve_dtype

    console = Console(width=max(Console().width, 150))
    mappings: list[Literal["refusal", "safety"]] = []
    for m in mapping or ["refusal", "safety"]:
        if m not in ("refusal", "safety"):
            raise QuantsafeError(f"--mapping must be refusal or safety, not {m!r}")
        mappings.append("refusal" if m == "refusal" else "safety")
    refs = list(sets or DEFAULT_SETS)
    endpoint = {"base_url": base_url, "model": served_model, "tokenizer": tokenizer, "api_key_env": api_key_env}
    specs = _specs(study, kind, mode, model, endpoint)
    # a trained judge reads its training sets from the data directory too
    wanted = refs + [t for s in specs if s.kind == "trained" for t in s.trained.train_sets]
    needs_data = any(not r.endswith(".csv") for r in wanted)
    root = resolve_data_dir(data_dir) if needs_data or data_dir is not None else None
    labelled = load_labelled_sets(refs, root)  # bad set names fail here, before a model loads
    compute = resolve_dtype(dtype)
    if out is not None and out.exists() and out.is_dir():
        raise QuantsafeError(f"{out}: --out must be a file path, not a directory")
    requests = RequestCache(cache_dir() / "requests.db") if any(s.endpoint for s in specs) else None
    rows: list[AgreementRow] = []
    for spec in specs:
        judge = judge_from_spec(spec, data_dir=root, dtype=compute, requests=requests)
        rows += validate_judge(judge, labelled, limit_per_set=limit, mappings=mappings)
    _print(console, rows)
    if out is not None:
        from quantsafe.store import atomic_write_text

        atomic_write_text(out, json.dumps([r.model_dump(mode="json") for r in rows], indent=1))
        console.print(f"rows: {out}")

"""The `quantsafe` command line; every user error is one line on stderr and exit code 2."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from quantsafe.cli.annotate import annotate_app
from quantsafe.cli.judge import judge_app
from quantsafe.errors import QuantsafeError

app = typer.Typer(help="What does quantizing an LLM do to its safety? Quantize, generate, judge, report.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
data_app = typer.Typer(help="Benchmark data: check counts, download for users with internet.", no_args_is_help=True)
models_app = typer.Typer(help="Models: list known short names, prepare (convert and cache) one.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(judge_app, name="judge")
app.add_typer(annotate_app, name="annotate")
app.add_typer(models_app, name="models")
err = Console(stderr=True)

DataDir = Annotated[Path | None, typer.Option("--data-dir", help="Data directory (default: $QUANTSAFE_DATA_DIR).")]


@app.command()
def run(
    study: Annotated[Path, typer.Argument(help="Study YAML (models × variants × benchmarks × judges).")],
    out: Annotated[Path, typer.Option("--out", help="Output directory: report.md, scores.csv, quantsafe.db.")],
    data_dir: DataDir = None,
    dtype: Annotated[str | None, typer.Option(
        help="Compute dtype: auto (bf16 only where the machine has native bf16), bfloat16, float32, float16; "
        "overrides the study's.")] = None,
    device: Annotated[str | None, typer.Option(
        help="Device: auto (CUDA where the cells run has it, else CPU), cpu, cuda, cuda:N; overrides the study's.")
    ] = None,
    executor: Annotated[str, typer.Option(
        help="Where cells run: local (this process) or ray (tasks on a Ray cluster; the driver writes the store).")
    ] = "local",
    address: Annotated[str | None, typer.Option(
        help="Ray cluster to join (auto, or ray://host:10001); default: start a local one.")] = None,
    num_cpus: Annotated[int | None, typer.Option(
        help="CPUs of the local Ray cluster (default: all of this machine's).")] = None,
    cpus_per_task: Annotated[int, typer.Option(
        help="Ray: CPUs (threads) per cell; outputs match the local executor's when it equals its thread count.")
    ] = 1,
) -> None:
    """Quantize, generate, judge and report a study; re-running resumes where it stopped."""
    from quantsafe.study import load_study
    from quantsafe.study.executors import make_executor
    from quantsafe.study.runner import run_study

    cfg = load_study(study)
    if data_dir is not None:
        cfg = cfg.model_copy(update={"data_dir": data_dir})
    if dtype is not None:
        from quantsafe.models.dtype import resolve_dtype

        resolve_dtype(dtype)  # an unknown name is one line, before anything runs
        cfg = cfg.model_copy(update={"dtype": dtype})
    if device is not None:
        if executor == "local":
            from quantsafe.models.device import resolve_device

            resolve_device(device)  # likewise: a device this machine lacks is one line (Ray's workers may have it)
        cfg = cfg.model_copy(update={"device": device})
    report = run_study(cfg, out, err, make_executor(executor, address, num_cpus, cpus_per_task))
    err.print(f"[green]report:[/] {report}")


@app.command()
def plan(
    study: Annotated[Path, typer.Argument(help="Study YAML.")],
    out: Annotated[Path | None, typer.Option("--out", help="The study's output directory, to count what is done.")
                   ] = None,
    data_dir: DataDir = None,
    measure: Annotated[bool, typer.Option(
        help="First measure this machine's prefill and decode rates on the default model (about a minute; cached).")
    ] = False,
    detail: Annotated[bool, typer.Option(help="One line per variant and stage (default: per model and stage).")
                      ] = False,
) -> None:
    """The study's cells, what is already done, and hours per device kind, before anything runs."""
    from rich.table import Table

    from quantsafe.study import load_study
    from quantsafe.study.plan import make_plan
    from quantsafe.study.plan import measure as measure_rates

    cfg = load_study(study)
    if data_dir is not None:
        cfg = cfg.model_copy(update={"data_dir": data_dir})
    if measure:
        err.print(f"measured: {measure_rates().source}")
    result = make_plan(cfg, out)
    table = Table(title=f"plan: {result.study} (hours)")
    for column in ("model", "stage", "items", "done"):
        table.add_column(column, justify="right" if column in ("items", "done") else "left")
    for kind in result.kinds:
        table.add_column(kind.name, justify="right")
    for line in result.lines if detail else result.by_stage():
        table.add_row(line.model, line.stage, str(line.items), "–" if line.done is None else str(line.done),
                      *(f"{line.hours[k.name]:.2f}" for k in result.kinds))
    totals = result.totals()
    table.add_row("total", "", "", "", *(f"{totals[k.name]:.1f}" for k in result.kinds), style="bold")
    console = Console()
    console.print(table)
    for kind in result.kinds:
        console.print(f"{kind.name}: {kind.source}")
    for note in result.notes:
        console.print(f"note: {note}")


@app.command()
def report(
    out: Annotated[Path, typer.Argument(help="A study output directory holding quantsafe.db.")],
    study: Annotated[str | None, typer.Option(
        help="Which recorded study to report (default: the one run last in this directory).")] = None,
    paper_results: Annotated[Path | None, typer.Option(help="The paper's results CSV, shown side by side.")] = None,
) -> None:
    """Re-write report.md and scores.csv of a recorded study from the store, without running any model."""
    from quantsafe.report.build import write_report
    from quantsafe.store import Store

    with Store.open(out / "quantsafe.db", create=False) as store:
        record = store.study(study)
        err.print(f"[green]report[/] of study '{record.name}': {write_report(store, out, record, paper_results)}")


@app.command("export")
def export_cmd(
    out: Annotated[Path, typer.Argument(help="A study output directory holding quantsafe.db.")],
    to: Annotated[Path | None, typer.Option("--to", help="Folder for the CSV files (default: OUT/csv).")] = None,
) -> None:
    """Export every table of the store to CSV."""
    from quantsafe.store import Store, export_csv

    with Store.open(out / "quantsafe.db", create=False) as store:
        for path in export_csv(store, to or out / "csv"):
            err.print(str(path))


@app.command()
def quantize(
    model: Annotated[str, typer.Argument(help="Short name, HF directory, .gguf file or hub id.")],
    method: Annotated[str, typer.Option(help="rtn, gptq, awq, quik, quip_sharp, aqlm, ste, qlora.")] = "gptq",
    bits: Annotated[int, typer.Option(help="Bits per weight code, 2..8.")] = 4,
    group_size: Annotated[int | None, typer.Option(
        help="Group size (0 = per output row; default: the method's own).")] = None,
    options: Annotated[str | None, typer.Option(
        help='Method options as JSON, e.g. \'{"damp_percent": 0.01}\'.')] = None,
    config: Annotated[Path | None, typer.Option(help="A quantization config YAML; replaces the options above.")] = None,
    calib_samples: Annotated[int, typer.Option(help="Calibration windows (calibrated methods).")] = 128,
    calib_seq_len: Annotated[int, typer.Option(help="Tokens per calibration window.")] = 512,
    out: Annotated[Path | None, typer.Option(help="Artifacts root (default: the cache).")] = None,
    data_dir: DataDir = None,
    dtype: Annotated[str, typer.Option(
        help="Dtype of the calibration forward passes: auto (bf16 only where native), bfloat16, float32.")] = "auto",
) -> None:
    """Quantize one model and save the artifact (the method's storage format, JSON manifest)."""
    from quantsafe.datadir import cache_dir, resolve_data_dir
    from quantsafe.models import resolve_model
    from quantsafe.models.dtype import resolve_dtype
    from quantsafe.quantization import QuantConfig, quantize_variant

    if config is not None:
        cfg = QuantConfig.from_yaml(config)
    else:
        cfg = QuantConfig.from_dict(cli_quant_spec(method, bits, group_size, options, calib_samples, calib_seq_len))
    compute = resolve_dtype(dtype)
    art = quantize_variant(resolve_model(model), cfg, resolve_data_dir(data_dir), out or cache_dir() / "artifacts",
                           dtype=compute)
    err.print(f"[green]{art.artifact_id}[/] {art.path} ({art.bits_per_weight:.3f} bits/weight)")


def cli_quant_spec(method: str, bits: int, group_size: int | None, options: str | None, calib_samples: int,
                   calib_seq_len: int) -> dict[str, Any]:
    """The config mapping `quantsafe quantize` means: only what was given, so a method's own defaults apply."""
    import json

    from quantsafe.quantization import get_quantizer_class

    spec: dict[str, Any] = {"method": method, "bits": bits}
    if group_size is not None:
        spec["group_size"] = group_size or None
    if options:
        try:
            spec["options"] = json.loads(options)
        except json.JSONDecodeError as exc:
            raise QuantsafeError(f"--options: not valid JSON ({exc.msg} at character {exc.pos})") from None
    if get_quantizer_class(method).needs_calibration:
        spec["calibration"] = {"source": "wikitext2", "n_samples": calib_samples, "seq_len": calib_seq_len}
    return spec


@models_app.command("list")
def models_list() -> None:
    """Known short names and where their weights come from."""
    from quantsafe.models import DEFAULT_MODEL, KNOWN_MODELS

    for spec in KNOWN_MODELS.values():
        mark = " (default)" if spec.name == DEFAULT_MODEL else ""
        typer.echo(f"{spec.name}{mark}: {spec.description}; original: {spec.original_hub_id}")


@models_app.command("prepare")
def models_prepare(model: Annotated[str, typer.Argument(help="Short name, .gguf file or hub id.")]) -> None:
    """Verify, convert and cache a model as bf16 safetensors (done once)."""
    from quantsafe.models import resolve_model

    r = resolve_model(model)
    typer.echo(f"{r.name}: {r.path} (source sha256 {r.source_sha256})")


@data_app.command("check")
def data_check(data_dir: DataDir = None) -> None:
    """Load every benchmark and report its counts against the expected ones."""
    from quantsafe.benchmarks import (
        XSAFETY_LANGUAGES,
        benchmarks,
        check_counts,
        load_benchmark,
        load_opensafetymini,
        load_xsafety,
        load_xstest_prompts,
        xsafety_counts,
    )
    from quantsafe.datadir import resolve_data_dir

    root = resolve_data_dir(data_dir)
    osm = load_opensafetymini(root)
    typer.echo(f"OpenSafetyMini: {len(osm)} prompts (expected 1067)")
    for warning in check_counts(osm):
        typer.echo(f"  warning: {warning}")
    xs = load_xsafety(root, langs=XSAFETY_LANGUAGES)
    for lang, per_scenario in sorted(xsafety_counts(xs).items()):
        typer.echo(f"XSafety {lang}: {sum(per_scenario.values())} prompts in {len(per_scenario)} scenarios "
                   "(expected 2800 in 14)")
    typer.echo(f"XSTest: {len(load_xstest_prompts(root))} prompts (expected 450)")
    for name, definition in sorted(benchmarks().items()):
        if name in ("opensafetymini", "xsafety", "xstest"):
            continue
        try:
            items = load_benchmark(name, root)
        except QuantsafeError as exc:  # e.g. SafetyBench's test questions, which users fetch themselves
            typer.echo(f"{definition.title} [{name}]: not available: {exc}")
            continue
        typer.echo(f"{definition.title} [{name}, {definition.kind}]: {len(items)} items")


@data_app.command("download")
def data_download(
    dest: Annotated[Path | None, typer.Option(help="Target folder (default: the cache's data folder).")] = None,
) -> None:
    """Fetch the official benchmark files (needs internet) into a data directory."""
    from quantsafe.benchmarks import download_data
    from quantsafe.datadir import cache_dir

    typer.echo(str(download_data(dest or cache_dir() / "data")))


def main() -> None:
    """Entry point: turn user errors into one line and exit 2, never a traceback."""
    try:
        app()  # standalone: click prints its own usage errors (exit 2) and handles Ctrl-C
    except QuantsafeError as exc:
        err.print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)

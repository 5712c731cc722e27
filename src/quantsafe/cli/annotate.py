"""`quantsafe annotate`: people label a sample of a study's judged answers (see quantsafe.annotation)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from quantsafe.annotation import DEFAULT_SAMPLE, AnnotationStore, choose_sample, export_labels, import_labels
from quantsafe.errors import QuantsafeError

annotate_app = typer.Typer(help="Human annotation: tokens for annotators, the sample, a web app, CSV in and out.",
                           no_args_is_help=True)
err = Console(stderr=True)

OutDir = Annotated[Path, typer.Argument(help="A study output directory holding quantsafe.db.")]
Study = Annotated[str | None, typer.Option(help="Which recorded study (default: the one run last here).")]


def _open(out: Path) -> AnnotationStore:
    return AnnotationStore(out / "quantsafe.db")


@annotate_app.command("add-annotator")
def add_annotator(
    name: Annotated[str, typer.Argument(help="The annotator's name (letters, digits, _ . @ -).")],
    out: Annotated[Path, typer.Option("--out", help="The study output directory holding quantsafe.db.")],
    replace: Annotated[bool, typer.Option(help="Issue a new token for an existing annotator.")] = False,
) -> None:
    """Print a personal sign-in token, once: only its hash is stored."""
    with _open(out) as annotations:
        token = annotations.add_annotator(name, replace=replace)
    err.print(f"token for [bold]{name}[/] (shown once; hand it over privately):")
    typer.echo(token)


@annotate_app.command()
def sample(
    out: OutDir,
    n: Annotated[int, typer.Option("--n", help="How many answers people label.")] = DEFAULT_SAMPLE,
    seed: Annotated[int, typer.Option(help="Seed of the stratified choice.")] = 0,
    langs: Annotated[str | None, typer.Option(help="Only these languages, comma-separated (e.g. en).")] = None,
    study: Study = None,
    force: Annotated[bool, typer.Option(help="Replace an existing sample (labels are kept).")] = False,
) -> None:
    """Choose the answers to label: contested ones first, then stratified by variant, language and scenario."""
    with _open(out) as annotations:
        record = annotations.store.study(study)
        existing = annotations.sample(record.study_id)
        if existing and not force:
            raise QuantsafeError(f"{annotations.path}: study '{record.name}' already has a sample of "
                                 f"{len(existing)} answers (--force replaces it)")
        chosen = choose_sample(annotations, record, n, seed, langs.split(",") if langs else None)
        annotations.set_sample(record.study_id, chosen)
    contested = sum(i.contested for i in chosen)
    err.print(f"sample of study '{record.name}': {len(chosen)} answers, {contested} contested first")


@annotate_app.command()
def serve(
    out: OutDir,
    host: Annotated[str, typer.Option(help="Address to listen on (127.0.0.1: this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8765,
    study: Study = None,
    session_hours: Annotated[float, typer.Option(help="Sessions expire after this many hours.")] = 8.0,
    secure_cookie: Annotated[bool, typer.Option(help="Mark cookies Secure (when served behind HTTPS).")] = False,
    data_dir: Annotated[Path | None, typer.Option(
        "--data-dir", help="Data directory, for the scenarios' criteria (default: $QUANTSAFE_DATA_DIR).")] = None,
    n: Annotated[int, typer.Option("--n", help="Sample size if the study has no sample yet.")] = DEFAULT_SAMPLE,
    seed: Annotated[int, typer.Option(help="Seed of that sample.")] = 0,
) -> None:
    """Serve the labelling pages (offline: no CDN, no build step)."""
    import uvicorn

    from quantsafe.annotation.app import AppConfig, create_app

    app = create_app(AppConfig(db_path=out / "quantsafe.db", study=study, session_ttl_s=session_hours * 3600,
                               secure_cookie=secure_cookie, data_dir=data_dir, sample_size=n, seed=seed))
    if not app.state.annotations.annotators():
        err.print(f"[yellow]no annotators yet:[/] quantsafe annotate add-annotator NAME --out {out}")
    err.print(f"annotation app on http://{host}:{port}/")
    uvicorn.run(app, host=host, port=port, log_level="warning")


@annotate_app.command("export")
def export_cmd(
    out: OutDir,
    csv: Annotated[Path, typer.Option("--csv", help="CSV file to write.")],
) -> None:
    """Write every annotator's labels to CSV (the format `import` reads)."""
    with _open(out) as annotations:
        err.print(f"{export_labels(annotations, csv)} labels → {csv}")


@annotate_app.command("import")
def import_cmd(
    out: OutDir,
    csv: Annotated[Path, typer.Option("--csv", help="CSV file of labels (the format `export` writes).")],
) -> None:
    """Add or revise labels made elsewhere; a bad row is one line naming file, row and field, and nothing is kept."""
    with _open(out) as annotations:
        err.print(f"{import_labels(annotations, csv)} labels imported from {csv}")

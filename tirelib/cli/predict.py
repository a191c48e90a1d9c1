"""``tirelib predict``: score a folder, an S3 prefix or an inbox batch with the production model."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import annotated_types
import typer

from tirelib.config import option_help
from tirelib.errors import DataError
from tirelib.settings import Settings, get_settings


def _limits(name: str) -> dict[str, Any]:
    """Typer's ``min``/``max`` from the setting's own bounds (declared once, in Settings)."""
    limits: dict[str, Any] = {}
    for item in Settings.model_fields[name].metadata:
        if isinstance(item, annotated_types.Ge):
            limits["min"] = item.ge
        elif isinstance(item, annotated_types.Le):
            limits["max"] = item.le
    return limits


def predict(
    source: Annotated[
        str,
        typer.Argument(
            help="A local folder (every image below it), s3://bucket/prefix/, or the name of a "
            "batch under s3://<data bucket>/inbox/.",
            show_default=False,
        ),
    ],
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="JSON Lines file to write (whole or not at all); default: standard output.",
            dir_okay=False,
        ),
    ] = None,
    model_version: Annotated[
        str | None,
        typer.Option(help="Score with this version of TIRE_MODEL_NAME (default: @production)."),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            help=option_help(Settings, "predict_batch_size") + " Env: TIRE_PREDICT_BATCH_SIZE.",
            show_default=False,
            **_limits("predict_batch_size"),
        ),
    ] = None,
) -> None:
    """Score images with the production model: one JSON line per image (key, label,
    probabilities by class, model name and version).

    An image that cannot be read or decoded gets a line with "error" and is listed on stderr;
    the others are scored. Exit status 2 when no image at all could be scored.
    """
    from tirelib.batch import load_model, open_source, predict_to_file
    from tirelib.batch import predict as predict_lines

    settings = get_settings()
    found = open_source(source, settings)
    keys = found.keys()  # a wrong path fails before the model is loaded
    if not keys:
        raise DataError(f"no files under {found.where}: nothing to score")
    model = load_model(settings, version=model_version)
    options: dict[str, Any] = {
        "batch_size": batch_size or settings.predict_batch_size,
        "max_workers": settings.s3_max_workers,
        "progress": None,  # a bar on a terminal only
        "keys": keys,
    }
    if output is None:
        report = predict_lines(found, model, sys.stdout, **options)
    else:
        report = predict_to_file(found, model, output, **options)
    for key, error in report.failed:
        typer.secho(f"not scored {key}: {error}", err=True, fg=typer.colors.YELLOW)
    labels = ", ".join(f"{label}={n}" for label, n in report.counts.items()) or "none"
    where = f" into {report.output}" if report.output else ""
    typer.echo(
        f"scored {report.scored} image(s) of {report.source} with {model.name} version "
        f"{model.version}{where} ({labels}); {len(report.failed)} could not be scored",
        err=output is None,  # standard output carries the lines themselves
    )
    if report.scored == 0:
        raise DataError(
            f"none of the {len(report.failed)} file(s) under {report.source} is an image "
            "that could be decoded"
        )

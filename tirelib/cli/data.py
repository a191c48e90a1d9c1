"""``tirelib data``: make, upload, ingest, list, retry and split dataset versions, and make one
from production feedback."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from tirelib.config import MAX_VERSION_LENGTH, NAME_RULE
from tirelib.data import (
    VersionState,
    ingest_version,
    list_versions,
    parse_day,
    parse_ratios,
    retry_version,
    split_version,
    upload_version,
    version_from_feedback,
)
from tirelib.settings import get_settings
from tirelib.storage import ObjectStore
from tirelib.urls import mask_credentials

app = typer.Typer(help="Dataset versions in the S3 data lake.", no_args_is_help=True)

VersionOption = Annotated[
    str,
    typer.Option(
        "--version",
        help=f"Dataset version name, e.g. 2026-11-24 or v3: {NAME_RULE}, "
        f"at most {MAX_VERSION_LENGTH} characters.",
    ),
]


def _store() -> ObjectStore:
    return ObjectStore.for_data(get_settings())


@app.command()
def synth(
    out: Annotated[Path, typer.Option(help="Folder to write good/ and defective/ into.")],
    count: Annotated[int, typer.Option(help="Number of images.")] = 1000,
    seed: Annotated[
        int, typer.Option(help="Random seed: the same seed gives the same images.")
    ] = 0,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 128,
    defect_ratio: Annotated[float, typer.Option(help="Share of defective tires.")] = 0.5,
) -> None:
    """Draw synthetic tire photos (tread, sidewall, lighting, noise; cracks, cuts, bulges, wear)."""
    from tirelib.synth import generate

    summary = generate(
        out, count, seed=seed, size=size, defect_ratio=defect_ratio, progress=sys.stderr.isatty()
    )
    counts = ", ".join(f"{label}={n}" for label, n in summary.counts.items())
    typer.echo(f"wrote {sum(summary.counts.values())} images to {out} ({counts})")


@app.command()
def upload(
    src: Annotated[
        Path,
        typer.Argument(
            exists=True, help="A folder of class folders (good/, defective/) or an annotation JSON."
        ),
    ],
    version: VersionOption,
    force: Annotated[
        bool, typer.Option("--force", help="Replace a version that exists with other content.")
    ] = False,
) -> None:
    """Upload a dataset version; ``_manifest.json`` is written last, when every image is there."""
    settings = get_settings()
    report = upload_version(
        _store(), src, version, force=force, max_workers=settings.s3_max_workers
    )
    for item in report.skipped:
        typer.secho(f"skipped {item.path}: {item.reason}", err=True, fg=typer.colors.YELLOW)
    counts = ", ".join(f"{label}={n}" for label, n in report.counts.items())
    where = f"s3://{settings.data_bucket}/raw/{version}/"
    if report.already_complete:
        typer.echo(f"version {version} is already in {where} with the same content ({counts})")
    else:
        typer.echo(
            f"uploaded version {version} to {where}: {report.uploaded} sent, "
            f"{report.unchanged} already there ({counts}); {len(report.skipped)} skipped"
        )


@app.command("list")
def list_(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for programs.")] = False,
) -> None:
    """Every version with its state (uploading, new, processing, processed, failed) and counts."""
    settings = get_settings()
    versions = list_versions(_store(), max_workers=settings.s3_max_workers)
    if as_json:
        rows = [
            {
                "version": v.version,
                "state": v.state.value,
                "complete": v.complete,
                "processed": v.processed,
                "created_at": v.created_at,
                "last_change": v.last_change,
                "counts": v.counts,
                "skipped": v.skipped,
                "failure": v.failure,
            }
            for v in versions
        ]
        typer.echo(json.dumps(rows, indent=1))
        return
    if not versions:
        typer.echo(f"no dataset versions in s3://{settings.data_bucket}/raw/")
        return
    typer.echo(f"{'VERSION':<24} {'CREATED':<21} {'IMAGES':>7}  {'STATE':<10} LABELS")
    for v in versions:
        created = v.created_at or (f"{v.last_change} (last upload)" if v.last_change else "-")
        labels = " ".join(f"{label}={n}" for label, n in v.counts.items())
        if not v.complete and v.state is VersionState.NEW:
            labels = "settled, not ingested yet (the sensor ingests it)"
        elif v.state is VersionState.UPLOADING:
            labels = "objects still arriving, no manifest yet"
        typer.echo(f"{v.version:<24} {created:<21} {v.total:>7}  {v.state.value:<10} {labels}")
        if v.failure:
            reason = mask_credentials(str(v.failure.get("reason", ""))).splitlines()[0][:160]
            typer.echo(f"{'':<24} failed in {v.failure.get('task', '?')}: {reason}")


@app.command()
def ingest(version: VersionOption) -> None:
    """Write the manifest of a version uploaded by any S3 client, now (the upload is done).

    Every object under raw/<version>/<label>/ is checked; hidden, empty and undecodable files
    are left out and listed in the manifest with the reason. Running it again changes nothing.
    """
    settings = get_settings()
    report = ingest_version(_store(), version, max_workers=settings.s3_max_workers)
    for item in report.skipped:
        typer.secho(f"skipped {item.path}: {item.reason}", err=True, fg=typer.colors.YELLOW)
    counts = ", ".join(f"{label}={n}" for label, n in report.counts.items())
    done = "ingested" if report.written else "already ingested with the same images:"
    typer.echo(f"{done} version {version} ({counts}); {len(report.skipped)} skipped")


@app.command("from-feedback")
def from_feedback(
    version: VersionOption,
    since: Annotated[
        str | None,
        typer.Option(
            help="Only feedback of this day (YYYY-MM-DD) and later; default: all of it.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Make a dataset version from production images whose true label was sent as feedback.

    Joins feedback/<date>/*.jsonl with captures/<date>/<request id>-<i>.<ext> on the request id
    and index, copies each labelled capture to raw/<version>/<label>/ and ingests the version
    (every image checked, the manifest written last), so the sensor trains on it.
    """
    settings = get_settings()
    report = version_from_feedback(
        _store(),
        version,
        since=parse_day(since) if since else None,
        max_workers=settings.s3_max_workers,
    )
    for item in report.skipped:
        typer.secho(f"skipped {item.path}: {item.reason}", err=True, fg=typer.colors.YELLOW)
    counts = ", ".join(f"{label}={n}" for label, n in report.counts.items())
    done = "made" if report.written else "already made with the same images:"
    typer.echo(
        f"{done} version {version} in s3://{settings.data_bucket}/raw/{version}/ from "
        f"{report.used} labelled capture(s) ({counts}); of {report.feedback} feedback "
        f"record(s), {report.no_capture} had no captured image (sampling) and "
        f"{report.null_labels} no label; {len(report.skipped)} skipped"
    )


@app.command()
def retry(
    version: Annotated[str, typer.Argument(help="The version marked failed.")],
) -> None:
    """Clear a version's failed mark: the sensor announces it again and the pipeline retries."""
    failure = retry_version(_store(), version)
    if failure is None:
        typer.echo(f"version {version} is not marked failed; nothing to clear")
    else:
        typer.echo(
            f"cleared the failed mark of version {version} "
            f"({failure.get('task', '?')}: {str(failure.get('reason', ''))[:160]}); "
            "the sensor takes it on its next look"
        )


@app.command()
def split(
    version: VersionOption,
    ratios: Annotated[
        str, typer.Option(help="Train, val and test fractions, summing to 1.")
    ] = "0.7,0.15,0.15",
) -> None:
    """Write splits/<version>/{train,val,test}.json, decided by each image's content hash."""
    settings = get_settings()
    splits = split_version(_store(), version, parse_ratios(ratios))
    for name, manifest in splits.items():
        labels = " ".join(f"{label}={n}" for label, n in manifest.counts.items())
        typer.echo(f"{name:<6} {len(manifest.records):>6}  {labels}")
    typer.echo(f"wrote s3://{settings.data_bucket}/splits/{version}/{{train,val,test}}.json")

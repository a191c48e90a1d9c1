"""``tirelib registry ...``: register, compare, stage, produce, info, history, rollback.

Each command is one call into :mod:`tirelib.registry`. A registration or promotion the gate
refuses is an answer, not an error: it says why and exits 1 (``ExitCode.REFUSED``), so a script
tells "promoted" from "refused" by the status; ``--json`` carries ``metric_drop`` too.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Any

import typer

from tirelib.cli.exit_codes import ExitCode
from tirelib.config import GATE_METRICS, PipelineParams, Thresholds, option_help
from tirelib.settings import get_settings

if TYPE_CHECKING:
    from tirelib.registry import VersionInfo

app = typer.Typer(
    help="The model registry: gated registration, staging, promotion, rollback.",
    no_args_is_help=True,
)

Json = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]
Metric = Annotated[
    str,
    typer.Option(
        "--metric",
        "-m",
        help=f"{', '.join(GATE_METRICS)} (the earlier Loss, F1 ... work too).",
    ),
]
DEFAULT_METRIC: str = PipelineParams.model_fields["metric"].default


def _threshold_help(name: str, suffix: str = " 0 turns it off.") -> str:
    return option_help(Thresholds, name) + suffix


# Help and defaults come from tirelib.config.Thresholds; 0 turns a floor or ceiling off.
MinAccuracy = Annotated[
    float | None, typer.Option(envvar="TIRE_MIN_ACCURACY", help=_threshold_help("accuracy"))
]
MinF1 = Annotated[float | None, typer.Option(envvar="TIRE_MIN_F1", help=_threshold_help("f1"))]
MinPrecision = Annotated[
    float | None, typer.Option(envvar="TIRE_MIN_PRECISION", help=_threshold_help("precision"))
]
MinRecall = Annotated[
    float | None, typer.Option(envvar="TIRE_MIN_RECALL", help=_threshold_help("recall"))
]
MaxLoss = Annotated[
    float | None, typer.Option(envvar="TIRE_MAX_LOSS", help=_threshold_help("loss"))
]
Margin = Annotated[
    float | None,
    typer.Option(envvar="TIRE_PROMOTION_MARGIN", help=_threshold_help("margin", "")),
]


def _thresholds(
    min_accuracy: float | None,
    min_f1: float | None,
    min_precision: float | None,
    min_recall: float | None,
    max_loss: float | None,
    margin: float | None = None,
) -> Thresholds:
    """The defaults, overridden by the options given; 0 switches a floor or ceiling off."""
    given = {
        "accuracy": min_accuracy,
        "f1": min_f1,
        "precision": min_precision,
        "recall": min_recall,
        "loss": max_loss,
    }
    values: dict[str, Any] = {k: (None if v == 0 else v) for k, v in given.items() if v is not None}
    if margin is not None:
        values["margin"] = margin
    return Thresholds.parse(values)


def _echo_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=1, default=str))


def register(
    run_id: Annotated[str, typer.Option(help="MLflow run made by `tirelib train`.")],
    min_accuracy: MinAccuracy = None,
    min_f1: MinF1 = None,
    min_precision: MinPrecision = None,
    min_recall: MinRecall = None,
    max_loss: MaxLoss = None,
    as_json: Json = False,
) -> None:
    """Register a run's model as a new version if its test metrics meet the floors.

    Exit status 1 when they do not (nothing is registered).
    """
    from tirelib.registry import register_run

    thresholds = _thresholds(min_accuracy, min_f1, min_precision, min_recall, max_loss)
    result = register_run(get_settings(), run_id, thresholds=thresholds)
    if as_json:
        _echo_json(result.summary())
    else:
        typer.echo(result.describe())
    if result.metric_drop:
        raise typer.Exit(ExitCode.REFUSED)


def compare(
    candidate: Annotated[str, typer.Option(help="Registered version to judge.")],
    metric: Metric = DEFAULT_METRIC,
    margin: Margin = None,
    min_accuracy: MinAccuracy = None,
    min_f1: MinF1 = None,
    min_precision: MinPrecision = None,
    min_recall: MinRecall = None,
    max_loss: MaxLoss = None,
    as_json: Json = False,
) -> None:
    """Score a version and the production model on the same test split and judge it."""
    from tirelib.registry import compare as run_compare

    thresholds = _thresholds(min_accuracy, min_f1, min_precision, min_recall, max_loss, margin)
    result = run_compare(get_settings(), candidate, metric=metric, thresholds=thresholds)
    if as_json:
        _echo_json(result.summary())
        return
    _echo_comparison(result.summary())


def _echo_comparison(summary: dict[str, Any]) -> None:
    metric = summary["metric"]
    typer.echo(
        f"test split of {summary['dataset_version']}, metric {metric} "
        f"({'lower' if metric == 'loss' else 'higher'} is better)"
    )
    typer.echo(
        f"  candidate  version {summary['candidate_version']}: {_num(summary['candidate_score'])}"
    )
    if summary["champion_version"] is not None:
        typer.echo(
            f"  production version {summary['champion_version']}: {_num(summary['champion_score'])}"
        )
        difference = _num(summary["difference"], signed=True)
        typer.echo(f"  difference {difference} (margin {summary['margin']:g})")
    else:
        typer.echo("  production: none yet (thresholds only)")
    if summary["passed"]:
        typer.echo("candidate passes the gate")
    else:
        typer.echo("candidate fails the gate (metric drop):")
        for reason in summary["reasons"]:
            typer.echo(f"  - {reason}")


def _num(value: float | None, *, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def stage(
    metric: Metric = DEFAULT_METRIC,
    version: Annotated[str | None, typer.Option(help="Stage this version instead.")] = None,
    dataset_version: Annotated[
        str | None, typer.Option(help="Only versions trained on this dataset version.")
    ] = None,
    as_json: Json = False,
) -> None:
    """Point the `staging` alias at the best registered version by a test metric."""
    from tirelib.registry import stage as run_stage

    result = run_stage(
        get_settings(), metric=metric, version=version, dataset_version=dataset_version
    )
    if as_json:
        _echo_json(result.summary())
        return
    typer.echo(result.describe())


def produce(
    metric: Metric = DEFAULT_METRIC,
    force: Annotated[
        bool, typer.Option("--force", help="Skip the gate (the model must still load).")
    ] = False,
    version: Annotated[
        str | None, typer.Option(help="Promote this version instead of `staging`.")
    ] = None,
    margin: Margin = None,
    min_accuracy: MinAccuracy = None,
    min_f1: MinF1 = None,
    min_precision: MinPrecision = None,
    min_recall: MinRecall = None,
    max_loss: MaxLoss = None,
    as_json: Json = False,
) -> None:
    """Promote the staging version to `production` if it beats the current one.

    Exit status 0 when production is that version (promoted now, or it already was), 1 when
    the gate refused it.
    """
    from tirelib.registry import produce as run_produce

    thresholds = _thresholds(min_accuracy, min_f1, min_precision, min_recall, max_loss, margin)
    result = run_produce(
        get_settings(), metric=metric, force=force, version=version, thresholds=thresholds
    )
    if as_json:
        _echo_json(result.summary())
    else:
        if result.comparison is not None:
            _echo_comparison(result.comparison.summary())
        typer.echo(result.describe())
    if result.metric_drop:
        raise typer.Exit(ExitCode.REFUSED)


def rollback(as_json: Json = False) -> None:
    """Move `production` back to the version it replaced."""
    from tirelib.registry import rollback as run_rollback

    result = run_rollback(get_settings())
    if as_json:
        _echo_json(result.summary())
        return
    typer.echo(result.describe())


def info(as_json: Json = False) -> None:
    """Show the production and staging versions: type, data, metrics, run and model URIs."""
    from tirelib.registry import info as run_info

    result = run_info(get_settings())
    if as_json:
        _echo_json(result.summary())
        return
    typer.echo(f"model {result.model_name} at {result.tracking_uri}")
    if not result.exists:
        typer.echo("  not registered yet")
        return
    for alias, version in (("production", result.production), ("staging", result.staging)):
        _echo_version(alias, version)


def _echo_version(alias: str, version: VersionInfo | None) -> None:
    if version is None:
        typer.echo(f"{alias}: none")
        return
    typer.echo(f"{alias}: version {version.version}")
    tags = version.tags
    rows = [
        ("model type", version.model_type),
        ("dataset version", version.dataset_version),
        (
            "metrics",
            ", ".join(f"{k.removeprefix('test_')} {v:.4f}" for k, v in version.metrics.items()),
        ),
        ("run", version.run_link or version.run_id),
        ("model URI", version.model_uri),
        ("source", version.source),
        ("artifacts", version.artifact_uri),
        ("promoted", _joined(tags.get("promoted_at"), tags.get("promoted_by"))),
        ("previous production", tags.get("previous_production_version")),
    ]
    for label, value in rows:
        if value:
            typer.echo(f"  {label:<20} {value}")


def _joined(at: str | None, by: str | None) -> str | None:
    return f"{at} by {by}" if at else None


def history(
    limit: Annotated[int | None, typer.Option(min=1, help="Show only the newest N.")] = None,
    as_json: Json = False,
) -> None:
    """List promotions and rollbacks, newest first."""
    from tirelib.registry import history as run_history

    events = run_history(get_settings(), limit=limit)
    if as_json:
        _echo_json([event.summary() for event in events])
        return
    if not events:
        typer.echo("no promotions yet")
        return
    typer.echo(f"{'#':>4}  {'WHEN':<25} {'ACTION':<9} {'VERSION':>7} {'FROM':>5}  BY")
    for event in events:
        note = "" if event.applied else "  (interrupted: not applied)"
        typer.echo(
            f"{event.seq:>4}  {event.at:<25} {event.action:<9} {event.version:>7} "
            f"{event.previous or '-':>5}  {event.by}{note}"
        )


app.command()(register)
app.command()(compare)
app.command()(stage)
app.command()(produce)
app.command()(info)
app.command()(history)
app.command()(rollback)

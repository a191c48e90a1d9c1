"""``tirelib demo``: the main job on the local stack, each step a command a user can run too."""

from __future__ import annotations

from typing import Annotated

import typer

from tirelib.cli import data as data_cli
from tirelib.cli import stack as stack_cli
from tirelib.settings import get_settings


def demo(
    version: Annotated[str, typer.Option(help="Dataset version to make and train on.")] = "demo-1",
    count: Annotated[int, typer.Option(help="Synthetic images to draw.")] = 600,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic images.")] = 7,
    model_type: Annotated[str, typer.Option(help="Architecture to train.")] = "cnn",
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 5,
) -> None:
    """Start the local stack, draw and upload a synthetic version, split it, train a model."""
    from tirelib.train import make_config, train

    settings = get_settings()
    config = make_config(dataset_version=version, model_type=model_type, epochs=epochs)

    typer.secho("== 1. local stack", bold=True)
    stack_cli.up()
    typer.secho("== 2. synthetic tires", bold=True)
    source = settings.home / "demo" / f"synthetic-{seed}-{count}"
    data_cli.synth(out=source, count=count, seed=seed, size=128, defect_ratio=0.5)
    typer.secho(f"== 3. upload as version {version}", bold=True)
    data_cli.upload(source, version=version, force=False)
    data_cli.list_(as_json=False)
    typer.secho("== 4. split by content hash", bold=True)
    data_cli.split(version=version, ratios="0.7,0.15,0.15")
    typer.secho(f"== 5. train {config.model_type} for up to {epochs} epochs", bold=True)
    result = train(config, settings)
    metrics = ", ".join(
        f"{k.removeprefix('test_')} {v:.3f}" for k, v in result.test_metrics.items()
    )
    typer.echo(f"{result.stop_reason}; test: {metrics}")
    typer.secho("== where to look", bold=True)
    typer.echo(f"MLflow UI:   {settings.mlflow_tracking_uri} (experiment {settings.experiment})")
    import mlflow

    experiment_id = mlflow.get_run(str(result.run_id)).info.experiment_id
    run_url = f"{settings.mlflow_tracking_uri}/#/experiments/{experiment_id}/runs/{result.run_id}"
    typer.echo(f"this run:    {run_url}")
    typer.echo(f"model:       {result.model_uri}")
    typer.echo("stop the stack with: tirelib stack down")

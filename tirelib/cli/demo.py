"""``tirelib demo``: the main job on the local stack, each step a command a user can run too."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Annotated

import typer

from tirelib.cli import data as data_cli
from tirelib.cli import stack as stack_cli
from tirelib.settings import Settings, get_settings
from tirelib.urls import masked_url

SENSOR = "tire_data_sensor"
PIPELINE = "tire_training_pipeline"


def demo(
    version: Annotated[
        str | None, typer.Option(help="Dataset version to upload [demo-<seed>-<count>].")
    ] = None,
    count: Annotated[int, typer.Option(help="Synthetic images to draw.")] = 800,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic images.")] = 7,
    timeout: Annotated[int, typer.Option(help="Seconds to wait for the pipeline.")] = 900,
) -> None:
    """Start the stack, upload a synthetic version, and let Airflow take it to production."""
    from tirelib.airflow_api import AirflowClient
    from tirelib.data import processed_versions
    from tirelib.stack import airflow_password, airflow_url
    from tirelib.storage import ObjectStore

    settings = get_settings()
    version = version or f"demo-{seed}-{count}"
    started = datetime.now(UTC).isoformat()
    typer.secho("== 1. the local stack: S3, MLflow, Airflow", bold=True)
    stack_cli.up()

    typer.secho("== 2. synthetic tires", bold=True)
    source = settings.home / "demo" / f"synthetic-{seed}-{count}"
    data_cli.synth(out=source, count=count, seed=seed, size=128, defect_ratio=0.5)

    typer.secho(f"== 3. upload as dataset version {version}", bold=True)
    data_cli.upload(source, version=version, force=False)
    data_cli.list_(as_json=False)

    typer.secho("== 4. the sensor notices it; the training pipeline runs", bold=True)
    url = airflow_url(settings)
    if version in processed_versions(ObjectStore.for_data(settings)):
        typer.echo(f"version {version} was processed by an earlier run; nothing to wait for")
        _show_production(settings, url)
        return
    store = ObjectStore.for_data(settings)
    with AirflowClient(url, "admin", airflow_password(settings) or "") as client:
        client.wait_for_dag(PIPELINE)
        client.wait_for_dag(SENSOR)
        client.trigger(SENSOR)  # the schedule would too, within minutes
        typer.echo(f"waiting for {PIPELINE} (follow it at {url}/dags/{PIPELINE}) ...")
        # Done when the version's processed marker exists: the last step of its pipeline run.
        deadline = time.monotonic() + timeout
        while version not in processed_versions(store):
            failed = [r for r in client.dag_runs(PIPELINE) if r["state"] == "failed"]
            if failed and failed[0]["start_date"] and failed[0]["start_date"] >= started:
                typer.secho(f"the pipeline run {failed[0]['dag_run_id']} failed", fg="red")
                raise typer.Exit(1)
            if time.monotonic() > deadline:
                typer.secho(f"{version} was not processed within {timeout} s", fg="red")
                raise typer.Exit(1)
            time.sleep(5)
        done = [r for r in client.dag_runs(PIPELINE) if r["state"] == "success"]
        for task in client.task_instances(PIPELINE, done[0]["dag_run_id"]) if done else []:
            index = f"[{task['map_index']}]" if task["map_index"] >= 0 else ""
            typer.echo(f"  {task['task_id'] + index:<18} {task['state']}")

    _show_production(settings, url)


def _show_production(settings: Settings, url: str) -> None:
    from tirelib.registry import info
    from tirelib.stack import airflow_password

    typer.secho("== 5. the production model", bold=True)
    production = info(settings).production
    typer.echo(json.dumps(production.summary() if production else None, indent=1, default=str))

    typer.secho("== where to look", bold=True)
    password = airflow_password(settings)
    typer.echo(f"Airflow UI: {url}  (user admin, password {password})")
    typer.echo(
        f"MLflow UI:  {masked_url(settings.mlflow_tracking_uri)}  "
        f"(experiment {settings.experiment})"
    )
    typer.echo("stop everything with: .venv/bin/tirelib stack down")

"""``tirelib demo``: the main job on the local stack, each step a command a user can run too.

It ends with the loop closed: the model server serving the production model, a handful of
predictions on unseen synthetic tires with their true labels sent back as feedback, and where to
watch it all (MLflow, Airflow, the server, Prometheus, Alertmanager, the Pushgateway).
"""

from __future__ import annotations

import base64
import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from tirelib.cli import data as data_cli
from tirelib.cli import stack as stack_cli
from tirelib.settings import Settings, get_settings
from tirelib.urls import mask_credentials, masked_url

SENSOR = "tire_data_sensor"
PIPELINE = "tire_training_pipeline"
MODEL = "tire"  # the server's model name in URLs (TIRE_SERVE_NAME's default)
LIVE_IMAGES = 6  # predictions the demo sends, each with its feedback
SERVE_TIMEOUT_S = 180.0  # for the server to load the production version
HTTP_TIMEOUT_S = 60.0


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
    typer.secho("== 1. the local stack: S3, MLflow, monitoring, model server, Airflow", bold=True)
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
        _show_production(settings, url, seed)
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

    _show_production(settings, url, seed)


def _show_production(settings: Settings, url: str, seed: int) -> None:
    from tirelib.registry import info

    typer.secho("== 5. the production model", bold=True)
    production = info(settings).production
    typer.echo(json.dumps(production.summary() if production else None, indent=1, default=str))

    if production is None:
        typer.secho("nothing is in production, so there is nothing to serve", fg="yellow")
    else:
        typer.secho("== 6. the model server serves it; predictions and their feedback", bold=True)
        server = serve_production(settings, production.version)
        live = settings.home / "demo" / f"live-{seed}"
        send_live_traffic(server, _live_images(live, seed))

    _where_to_look(settings, url)


def serve_production(settings: Settings, version: str) -> str:
    """Make sure the stack's model server runs and serves ``version``; return its URL."""
    from tirelib.stack import server_component, server_url, wait_serving

    url = server_url(settings)
    component = server_component(settings)
    if not component.status().ready:  # neither the stack's server nor another one answers
        typer.echo(f"starting the model server on {url} ...")
        component.up()
    typer.echo(f"waiting for {url} to serve version {version} (it follows the alias) ...")
    wait_serving(url, version, timeout=SERVE_TIMEOUT_S)
    typer.echo(f"the model server serves version {version}")
    return url


def _live_images(folder: Path, seed: int) -> list[tuple[str, Path]]:
    """``LIVE_IMAGES`` synthetic tires the model never saw (another seed), with true labels."""
    from tirelib.synth import generate

    generate(folder, LIVE_IMAGES, seed=seed + 1, size=128)
    images = [(path.parent.name, path) for path in sorted(folder.glob("*/*.png"))]
    return sorted(images, key=lambda item: item[1].name)[:LIVE_IMAGES]


def send_live_traffic(
    url: str, images: list[tuple[str, Path]], *, model: str = MODEL
) -> list[dict[str, Any]]:
    """Send each image for a prediction, then its true label as the request's feedback.

    Prints one line per image (true label, predicted label and probability, the request id,
    what the feedback route answered) and returns the same as rows. A prediction refused is a
    red line and exit status 1; feedback refused is a yellow line, and the demo goes on.
    """
    import httpx

    rows = []
    with httpx.Client(base_url=url, timeout=HTTP_TIMEOUT_S) as client:
        for label, path in images:
            body = {"instances": [{"b64": base64.b64encode(path.read_bytes()).decode()}]}
            try:
                answer = client.post(f"/v1/models/{model}:predict?labels=true", json=body)
            except httpx.HTTPError as error:
                typer.secho(f"cannot reach the model server at {url}: {error}", fg="red")
                raise typer.Exit(1) from error
            if answer.status_code != 200:
                typer.secho(f"{path.name}: predict answered {_refusal(answer)}", fg="red")
                raise typer.Exit(1)
            prediction = answer.json()
            predicted = str(prediction["labels"][0])
            probability = max(prediction["predictions"][0])
            request_id = answer.headers.get("X-Request-ID", "")
            row: dict[str, Any] = {
                "image": path.name,
                "label": label,
                "predicted": predicted,
                "probability": probability,
                "request_id": request_id,
            }
            feedback = {"request_id": request_id, "labels": [label]}
            try:
                taken = client.post(f"/v1/models/{model}:feedback", json=feedback)
            except httpx.HTTPError as error:
                taken = None
                row["feedback"] = f"not sent: {error}"
            if taken is not None and taken.status_code == 200:
                row["feedback"] = "correct" if taken.json().get("correct") else "wrong"
            elif taken is not None:
                row["feedback"] = f"refused: {_refusal(taken)}"
            mark = "ok " if predicted == label else "MISS"
            typer.secho(
                f"  {mark} {path.name:<16} true {label:<10} predicted {predicted:<10} "
                f"p={probability:.2f}  request {request_id[:12]}  feedback {row['feedback']}",
                fg=None if row["feedback"] in ("correct", "wrong") else "yellow",
            )
            rows.append(row)
    right = sum(row["predicted"] == row["label"] for row in rows)
    typer.echo(
        f"{right} of {len(rows)} predictions right; the feedback counts towards live accuracy "
        "(tire_feedback_correct_total / tire_feedback_labels_total in the server's /metrics)"
    )
    return rows


def _refusal(answer: Any) -> str:
    try:
        message = answer.json().get("error", answer.text)
    except ValueError:
        message = answer.text
    return mask_credentials(f"{answer.status_code} {str(message)[:300]}")


def _where_to_look(settings: Settings, url: str) -> None:
    from tirelib.stack import Stack, airflow_password, server_url
    from tirelib.stack.monitoring import PACKAGES

    typer.secho("== where to look", bold=True)
    password = airflow_password(settings)
    typer.echo(f"Airflow UI:    {url}  (user admin, password {password})")
    typer.echo(
        f"MLflow UI:     {masked_url(settings.mlflow_tracking_uri)}  "
        f"(experiment {settings.experiment})"
    )
    typer.echo(f"Model server:  {server_url(settings)}/v1/models/{MODEL}  (metrics: /metrics)")
    running = {status.name: status for status in Stack(settings).status()}
    for name, title, page in (
        ("prometheus", "Prometheus", "/alerts"),
        ("alertmanager", "Alertmanager", ""),
        ("pushgateway", "Pushgateway", ""),
    ):
        status = running.get(name)
        if not settings.stack_with_monitoring:
            typer.echo(f"{title + ':':<14} not started (TIRE_STACK_WITH_MONITORING is off)")
        elif status is None:
            typer.echo(f"{title + ':':<14} not installed (apt-get install {PACKAGES[name]})")
        else:
            typer.echo(f"{title + ':':<14} {status.url}{page}  ({status.describe()})")
    typer.echo("stop everything with: .venv/bin/tirelib stack down")

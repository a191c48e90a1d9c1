"""The whole pipeline on the real scheduler: upload -> sensor -> training pipeline -> production.

Airflow (``airflow standalone``, metadata on PostgreSQL), SeaweedFS S3, an MLflow server on
PostgreSQL and a local Slack receiver all run on loopback. The tests run in order and share
one stack: each scenario leaves the lake and the registry as the next one expects.
"""

from __future__ import annotations

import random
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.conftest import S3Server, SlackReceiver, fresh_database
from tests.factories import upload_with_boto3, write_image_folder
from tirelib.airflow_api import AirflowClient
from tirelib.data import VersionState, list_versions, upload_version
from tirelib.registry import info
from tirelib.settings import Settings, load_settings
from tirelib.stack import (
    airflow_component,
    airflow_password,
    airflow_url,
    create_buckets,
    free_port,
)
from tirelib.storage import ObjectStore, failed_key, processed_key

pytestmark = pytest.mark.e2e

SENSOR = "tire_data_sensor"
PIPELINE = "tire_training_pipeline"


@dataclass
class Stack:
    settings: Settings
    airflow: AirflowClient
    slack: SlackReceiver
    store: ObjectStore
    data: Path

    def run_pipeline_after_upload(self) -> dict:
        """Let the sensor notice what was uploaded; wait for the pipeline run it schedules."""
        before = {r["dag_run_id"] for r in self.airflow.dag_runs(PIPELINE)}
        self.airflow.trigger(SENSOR)
        return self.airflow.wait_for_run(PIPELINE, after=before, timeout=900)

    def run_pipeline(self, **conf: object) -> dict:
        run_id = self.airflow.trigger(PIPELINE, conf)
        return self.airflow.wait_for_run(PIPELINE, run_id, timeout=900)

    def counts(self) -> tuple[int, int]:
        """MLflow runs in the experiment, and versions of the registered model."""
        client = MlflowClient(self.settings.mlflow_tracking_uri)
        experiment = client.get_experiment_by_name(self.settings.experiment)
        runs = client.search_runs([experiment.experiment_id]) if experiment else []
        versions = client.search_model_versions(f"name = '{self.settings.model_name}'")
        return len(runs), len(versions)


def e2e_settings(
    home: Path,
    name: str,
    s3_server: S3Server,
    mlflow_server: str,
    slack: SlackReceiver,
    **overrides: object,
) -> Settings:
    """Settings of an Airflow stack on the session's servers, with a bucket, an experiment and
    a model of its own, the sensor looking every 5 s and uploads settling after 5 s."""
    suffix = secrets.token_hex(4)
    values: dict[str, object] = {
        "home": home / "home",
        "s3_endpoint_url": s3_server.endpoint_url,
        "aws_access_key_id": s3_server.access_key,
        "aws_secret_access_key": s3_server.secret_key,
        "data_bucket": f"tire-data-{suffix}",
        "mlflow_tracking_uri": mlflow_server,
        "experiment": f"tire-{name}-{suffix}",
        "model_name": f"tire-{name}-{suffix}",
        "slack_webhook_url": slack.url,
        "airflow_port": free_port(),
        "sensor_poke_seconds": 5,
        "settle_seconds": 5,
    }
    return load_settings(**{**values, **overrides})


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory,
    s3_server: S3Server,
    mlflow_server: str,
    _slack_server: SlackReceiver,
) -> Iterator[Stack]:
    home = tmp_path_factory.mktemp("e2e")
    with fresh_database("tirelib_test_airflow") as airflow_db:
        settings = e2e_settings(
            home,
            "e2e",
            s3_server,
            mlflow_server,
            _slack_server,
            airflow_database_url=airflow_db,
            pipeline_epochs=3,
            min_accuracy=0.7,
            min_f1=0.6,
        )
        create_buckets(settings, [settings.data_bucket])
        component = airflow_component(settings)
        component.up()
        try:
            client = AirflowClient(airflow_url(settings), "admin", airflow_password(settings) or "")
            with client:
                client.wait_for_dag(SENSOR)
                client.wait_for_dag(PIPELINE)
                yield Stack(settings, client, _slack_server, ObjectStore.for_data(settings), home)
        finally:
            component.down()


def _easy(root: Path, count: int, start: int) -> Path:
    """Images any model tells apart in an epoch or two: this test is about orchestration."""
    write_image_folder(root, {"good": count // 2, "defective": count // 2}, size=16, start=start)
    return root


def _shuffled_labels(source: Path, target: Path, seed: int) -> Path:
    """The same images under random labels: nothing left to learn."""
    rng = random.Random(seed)
    files = sorted(source.rglob("*.png"))
    for index, path in enumerate(files):
        label = rng.choice(["good", "defective"])
        (target / label).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target / label / f"img_{index:05d}.png")
    return target


def test_an_upload_is_noticed_trained_and_promoted(stack: Stack) -> None:
    stack.slack.start()
    stack.slack.clear()
    upload_version(stack.store, _easy(stack.data / "v1", 240, start=0), "v1", progress=False)
    run = stack.run_pipeline_after_upload()
    assert run["state"] == "success"
    production = info(stack.settings).production
    assert production is not None and production.dataset_version == "v1"
    assert stack.store.exists(processed_key("v1"))
    assert any("production" in text and "now version" in text for text in stack.slack.texts())


def test_a_worse_version_is_not_promoted_and_slack_hears_of_it(stack: Stack) -> None:
    stack.slack.clear()
    before = info(stack.settings).production
    noise = _shuffled_labels(_easy(stack.data / "v2-src", 240, start=1000), stack.data / "v2", 7)
    upload_version(stack.store, noise, "v2", progress=False)
    run = stack.run_pipeline_after_upload()
    assert run["state"] == "success"
    after = info(stack.settings).production
    assert before is not None and after is not None and after.version == before.version
    assert any("metric drop" in text for text in stack.slack.texts())


def test_a_rerun_with_slack_down_succeeds_and_duplicates_nothing(stack: Stack) -> None:
    runs, versions = stack.counts()
    stack.slack.stop()
    try:
        run = stack.run_pipeline(dataset_version="v1")
    finally:
        stack.slack.start()
    assert run["state"] == "success"
    assert stack.counts() == (runs, versions)


def test_a_failing_task_reaches_slack(stack: Stack) -> None:
    stack.slack.clear()
    run = stack.run_pipeline(dataset_version="no-such-version")
    assert run["state"] == "failed"
    texts = stack.slack.wait_for(1, timeout=60) and stack.slack.texts()
    assert any("resolve_version failed" in text and "no-such-version" in text for text in texts)


def _wait_for(what: str, check: Callable[[], bool], timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"gave up waiting for {what} after {timeout:.0f} s"
        time.sleep(1)


def test_a_bad_version_is_marked_failed_once_and_a_newer_one_goes_ahead(stack: Stack) -> None:
    stack.slack.clear()
    before = {r["dag_run_id"] for r in stack.airflow.dag_runs(PIPELINE)}
    bad, good = "v3-one-label", "v4"
    # One label only, put with plain boto3 (no manifest): the sensor ingests it once it settles.
    write_image_folder(stack.data / bad, {"good": 40}, size=16, start=5000)
    upload_with_boto3(stack.settings, stack.data / bad, bad)
    upload_version(stack.store, _easy(stack.data / good, 240, start=6000), good, progress=False)

    def state(version: str) -> VersionState:
        infos = list_versions(stack.store, settle_seconds=stack.settings.settle_seconds)
        return next(i.state for i in infos if i.version == version)

    _wait_for(f"{bad} to settle", lambda: state(bad) is VersionState.NEW, timeout=60)
    # The older version goes first and fails on its data. Scheduled sensor runs may announce
    # too, so the test waits on the lake's markers rather than on one particular run.
    stack.airflow.trigger(SENSOR)
    _wait_for(f"{bad} to be marked failed", lambda: stack.store.exists(failed_key(bad)))
    marker = stack.store.get_json(failed_key(bad))
    assert marker["task"] == "validate_data" and marker["kind"] == "bad_input"
    assert "labels" in marker["reason"] and marker["run_url"]

    stack.airflow.trigger(SENSOR)  # the newer version is not held up behind the failed one
    _wait_for(f"{good} to be processed", lambda: stack.store.exists(processed_key(good)))
    production = info(stack.settings).production
    assert production is not None and production.dataset_version == good

    def finished() -> list[dict]:
        runs = [r for r in stack.airflow.dag_runs(PIPELINE) if r["dag_run_id"] not in before]
        return runs if all(r["state"] in ("success", "failed") for r in runs) else []

    _wait_for("the pipeline runs to finish", lambda: bool(finished()), timeout=300)
    assert [r["state"] for r in finished()].count("failed") == 1
    assert state(bad) is VersionState.FAILED and state(good) is VersionState.PROCESSED
    told = [text for text in stack.slack.texts() if bad in text]
    assert len(told) == 1, told
    assert "failed at once: bad input" in told[0] and "of 4" not in told[0]
    assert f"tirelib data retry {bad}" in told[0]

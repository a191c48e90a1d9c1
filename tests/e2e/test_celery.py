"""The pipeline on CeleryExecutor: Airflow's components as separate processes, two workers.

api-server, scheduler, dag-processor and triggerer run as processes of their own on a fresh
PostgreSQL metadata database, with Redis (on this machine) as the broker and one Celery worker
per queue, as ``tirelib stack up --executor celery`` starts them. A version is uploaded and
followed to production; then the metadata database must show every training task on the
``training`` worker and every other task on the ``default`` one.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tests.conftest import S3Server, SlackReceiver, fresh_database
from tests.e2e.test_pipeline import PIPELINE, SENSOR, _easy, e2e_settings
from tests.e2e.test_pipeline import Stack as Pipeline
from tirelib.airflow_api import AirflowClient
from tirelib.data import upload_version
from tirelib.registry import info
from tirelib.stack import (
    Stack,
    airflow_password,
    airflow_url,
    celery_components,
    create_buckets,
    worker_name,
)
from tirelib.storage import ObjectStore, processed_key

# Startup (migration, four components, two workers) and one pipeline run; slow on a busy host.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]

REDIS_URL = "redis://127.0.0.1:6379"
# Databases 8-15 of the local Redis; a run claims an empty one and flushes only that one.
REDIS_DATABASES = range(8, 16)
CLAIM_KEY = "tirelib-test:claim"
TRAINING_QUEUE = "training"


@contextmanager
def claimed_redis_database() -> Iterator[str]:
    """The URL of an empty Redis database claimed for this run; flushed (only it) afterwards.

    The claim is a key set only if absent, so two runs never share a database; a database
    holding anything else is left alone.
    """
    import redis

    token = secrets.token_hex(8)
    for db in REDIS_DATABASES:
        client = redis.Redis.from_url(f"{REDIS_URL}/{db}", socket_timeout=5)
        try:
            if client.set(CLAIM_KEY, token, nx=True, ex=6 * 3600) and client.dbsize() == 1:
                break
            if client.get(CLAIM_KEY) == token.encode():
                client.delete(CLAIM_KEY)  # claimed, but it holds someone else's keys
        except redis.ConnectionError as error:
            pytest.fail(f"Redis is not reachable at {REDIS_URL} ({error})", pytrace=False)
        client.close()
    else:
        pytest.fail(f"no empty Redis database among {REDIS_DATABASES}", pytrace=False)
    try:
        yield f"{REDIS_URL}/{db}"
    finally:
        client.flushdb()
        client.close()


@pytest.fixture(scope="module")
def pipeline(
    tmp_path_factory: pytest.TempPathFactory,
    s3_server: S3Server,
    mlflow_server: str,
    _slack_server: SlackReceiver,
) -> Iterator[Pipeline]:
    home = tmp_path_factory.mktemp("celery")
    with (
        fresh_database("tirelib_test_celery") as airflow_db,
        claimed_redis_database() as broker,
    ):
        settings = e2e_settings(
            home,
            "celery",
            s3_server,
            mlflow_server,
            _slack_server,
            airflow_database_url=airflow_db,
            airflow_executor="CeleryExecutor",
            celery_broker_url=broker,
            celery_worker_concurrency=2,
            training_queue=TRAINING_QUEUE,
            pipeline_epochs=1,
            min_accuracy=0.0,  # any trained model is good enough: this test is about where
            min_f1=0.0,  # the tasks run
        )
        create_buckets(settings, [settings.data_bucket])
        stack = Stack(settings, celery_components(settings))
        try:
            stack.up()
            client = AirflowClient(airflow_url(settings), "admin", airflow_password(settings) or "")
            with client:
                client.wait_for_dag(SENSOR)
                client.wait_for_dag(PIPELINE)
                yield Pipeline(
                    settings, client, _slack_server, ObjectStore.for_data(settings), home
                )
        finally:
            stack.down()


def test_training_runs_on_the_training_worker_and_the_rest_on_default(pipeline: Pipeline) -> None:
    upload_version(pipeline.store, _easy(pipeline.data / "v1", 80, start=0), "v1", progress=False)
    run = pipeline.run_pipeline_after_upload()
    assert run["state"] == "success"
    production = info(pipeline.settings).production
    assert production is not None and production.dataset_version == "v1"
    assert pipeline.store.exists(processed_key("v1"))

    ran: dict[str, set[tuple[str, str]]] = {}
    sensor_runs = [r["dag_run_id"] for r in pipeline.airflow.dag_runs(SENSOR)]
    for dag_id, run_ids in ((PIPELINE, [run["dag_run_id"]]), (SENSOR, sensor_runs)):
        for run_id in run_ids:
            for ti in pipeline.airflow.task_instances(dag_id, run_id):
                if ti["state"] == "success":
                    ran.setdefault(ti["task_id"], set()).add((ti["queue"], ti["hostname"]))
    training = (TRAINING_QUEUE, worker_name(TRAINING_QUEUE))
    default = ("default", worker_name("default"))
    assert ran.pop("train") == {training}
    assert {"announce_versions", "promote", "mark_processed"} <= ran.keys()
    assert all(where == {default} for where in ran.values()), ran

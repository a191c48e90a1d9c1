"""tire_data_sensor: notice a new dataset version in the lake and announce it as an asset event.

A version is complete when its ``raw/<version>/_manifest.json`` exists (the uploader writes it
last); the sensor keeps only versions without a ``state/processed/<version>.json`` marker. The
asset event's extra names the version, and schedules ``tire_training_pipeline``.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.providers.amazon.aws.sensors.s3 import S3KeySensor
from airflow.sdk import DAG, Metadata, task

from tirelib.orchestration import failure_notifier, io_retries, raw_data_asset
from tirelib.pipeline import AWS_CONN_ID, has_new_versions
from tirelib.settings import get_settings

settings = get_settings()
RAW_DATA = raw_data_asset(settings)

with DAG(
    dag_id="tire_data_sensor",
    description="Wait for a complete, unprocessed dataset version in S3 and announce it.",
    schedule=timedelta(minutes=5),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args={**io_retries(), "on_failure_callback": [failure_notifier()]},
    tags=["tire", "data"],
    doc_md=__doc__,
):
    wait_for_new_version = S3KeySensor(
        task_id="wait_for_new_version",
        aws_conn_id=AWS_CONN_ID,
        bucket_name=settings.data_bucket,
        bucket_key="raw/*/_manifest.json",
        wildcard_match=True,
        check_fn=has_new_versions,
        mode="reschedule",
        poke_interval=settings.sensor_poke_seconds,
        # Give up shortly before the next scheduled run; nothing new is not a failure.
        timeout=timedelta(minutes=4, seconds=30).total_seconds(),
        soft_fail=True,
    )

    @task(outlets=[RAW_DATA])
    def announce_versions():
        from tirelib import pipeline

        yield Metadata(RAW_DATA, pipeline.announce_versions())

    wait_for_new_version >> announce_versions()

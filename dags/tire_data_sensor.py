"""tire_data_sensor: notice a new dataset version in the lake and announce it as an asset event.

A version is ready when ``raw/<version>/_manifest.json`` exists and no ``state/processed/``,
``state/processing/`` or ``state/failed/`` marker names it. A version uploaded by any other S3
client (``aws s3 sync``, the console, a camera gateway) has no manifest: once no object under
``raw/<version>/`` has changed for ``TIRE_SETTLE_SECONDS`` (120 by default), the sensor ingests
it (checks every object, writes the manifest with the skipped files listed). A version with no
usable image is marked failed and newer versions go ahead. The asset event's extra names the
oldest ready version and schedules ``tire_training_pipeline``.

**When a version is marked failed**: `tirelib data list` shows it as `failed` with the reason;
fix the data, then `tirelib data retry <version>` and the sensor takes it again.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG, Metadata, task

from tirelib.orchestration import (
    NewVersionSensor,
    failure_notifier,
    io_retries,
    raw_data_asset,
)
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
    # Reschedule mode frees the worker slot between pokes; each poke decides from S3 alone.
    # (The amazon provider's S3KeysUnchangedSensor keeps its state in memory between pokes,
    # which reschedule mode loses, so it cannot watch the settle period here.)
    wait_for_new_version = NewVersionSensor(
        task_id="wait_for_new_version",
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

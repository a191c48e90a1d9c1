"""tire_batch_predict: score images dropped under ``inbox/<batch>/`` with the production model.

Copy a batch of images to ``s3://<data bucket>/inbox/<batch>/`` with any S3 client. Once no
object under it has changed for ``TIRE_SETTLE_SECONDS`` (120 by default), `wait_for_batches`
takes it and `predict` (one mapped task per batch) scores every image with the model that
``@production`` names when the task starts, writing ``predictions/<batch>.jsonl``: one line per
image with its key, label, probabilities by class, and the model's name and version. An image
that cannot be decoded gets a line with an ``error`` instead; the rest of the batch is scored.

**A batch is scored once**: the presence of ``predictions/<batch>.jsonl`` marks it done, and the
file is written whole after the last image. Images added to a batch after that are not scored:
put them in a new batch. To score a batch again (a new production model), delete its predictions
file. The same scoring runs without Airflow: `tirelib predict <batch>` (or a folder, or an
``s3://`` prefix).

**When it fails**: no production model, or MLflow or S3 unreachable (retried with backoff first):
Slack hears of it, and the next run takes the batch again.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG, task

from tirelib.orchestration import NewBatchSensor, failure_notifier, io_retries
from tirelib.settings import get_settings

settings = get_settings()

with DAG(
    dag_id="tire_batch_predict",
    description="Score the image batches dropped under inbox/ with the production model.",
    schedule=timedelta(minutes=5),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args={**io_retries(), "on_failure_callback": [failure_notifier()]},
    tags=["tire", "prediction"],
    doc_md=__doc__,
):
    # Reschedule mode frees the worker slot between pokes; each poke decides from S3 alone.
    wait_for_batches = NewBatchSensor(
        task_id="wait_for_batches",
        mode="reschedule",
        poke_interval=settings.sensor_poke_seconds,
        # Give up shortly before the next scheduled run; nothing new is not a failure.
        timeout=timedelta(minutes=4, seconds=30).total_seconds(),
        soft_fail=True,
    )

    @task(execution_timeout=timedelta(hours=1), map_index_template="{{ task.op_kwargs['name'] }}")
    def predict(name: str):
        from tirelib import pipeline

        return pipeline.predict_batch(name)

    predict.expand(name=wait_for_batches.output)

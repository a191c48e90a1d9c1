"""tire_model_monitoring: every hour, the production model's live traffic against its baseline.

One task, `check`, reads the model server's live statistics from Prometheus
(`TIRE_PROMETHEUS_URL`) over the last hour (`TIRE_MONITOR_WINDOW_SECONDS`), or since the
production version was promoted when that is shorter, and compares them with the baseline its
training run stored:

- **drift**: prediction mix, confidence, input brightness and contrast, each by the population
  stability index over the baseline's buckets; over `TIRE_MONITOR_PSI_THRESHOLD` (0.25) is drift,
  judged on at least `TIRE_MONITOR_MIN_OBSERVATIONS` (100) live images;
- **live accuracy** from the feedback route's labels of the production version, judged on at
  least `TIRE_MONITOR_MIN_LABELS` (50) labels: under `TIRE_MONITOR_ACCURACY_FLOOR` (0.8), or more
  than `TIRE_MONITOR_MAX_ACCURACY_DROP` (0.1) under its offline test accuracy, is an alert.

Slack hears only when a threshold is crossed, with the numbers. With `TIRE_AUTO_ROLLBACK` on,
live accuracy under the floor rolls production back to the version it replaced
(`tirelib registry rollback`), and the message says so. Prometheus or MLflow unreachable is
retried with backoff; the task's XCom is the whole report.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG, task

from tirelib.orchestration import failure_notifier, io_retries

with DAG(
    dag_id="tire_model_monitoring",
    description="Drift and live accuracy of the production model; optional auto-rollback.",
    schedule=timedelta(hours=1),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args={
        **io_retries(),
        "execution_timeout": timedelta(minutes=10),
        "on_failure_callback": [failure_notifier()],
    },
    tags=["tire", "monitoring"],
    doc_md=__doc__,
):

    @task
    def check():
        from tirelib import pipeline

        return pipeline.monitor()

    check()

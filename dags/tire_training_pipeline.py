"""tire_training_pipeline: from a new dataset version to a promoted model.

Scheduled by the ``tire_raw_data`` asset (``tire_data_sensor`` emits it with the version in the
event's extra), or triggered by hand with params. Each task is one call into ``tirelib.pipeline``
and passes small JSON values on; a version processed already makes the run skip itself.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG, Param, task

from tirelib.config import dag_params
from tirelib.orchestration import failure_notifier, io_retries, raw_data_asset
from tirelib.settings import get_settings

settings = get_settings()
RAW_DATA = raw_data_asset(settings)
# Defaults, bounds, allowed values and descriptions come from tirelib.config's models.
PARAMS = dag_params(
    epochs=settings.pipeline_epochs, min_accuracy=settings.min_accuracy, min_f1=settings.min_f1
)

with DAG(
    dag_id="tire_training_pipeline",
    description="Validate, split, train, evaluate against production, register, promote.",
    schedule=[RAW_DATA],
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args={
        **io_retries(retries=1),
        "execution_timeout": timedelta(minutes=30),
        "on_failure_callback": [failure_notifier()],
    },
    params={name: Param(**schema) for name, schema in PARAMS.items()},
    tags=["tire", "training"],
    doc_md=__doc__,
):

    @task.short_circuit(**io_retries())
    def resolve_version(params=None, triggering_asset_events=None):
        from tirelib import pipeline

        return pipeline.resolve_version(params, triggering_asset_events)

    @task(**io_retries())
    def validate_data(jobs: list[dict]):
        from tirelib import pipeline

        return pipeline.validate_data(pipeline.version_of(jobs))

    @task(**io_retries())
    def split(jobs: list[dict]):
        from tirelib import pipeline

        return pipeline.split(pipeline.version_of(jobs))

    @task(
        pool="training",
        queue=settings.training_queue,
        execution_timeout=timedelta(hours=2),
        max_active_tis_per_dag=2,
    )
    def train(job: dict):
        from tirelib import pipeline

        return pipeline.train(job)

    @task(**io_retries())  # reads only: scoring again is safe
    def evaluate(jobs: list[dict], trained: list[dict]):
        from tirelib import pipeline

        return pipeline.evaluate(pipeline.version_of(jobs), list(trained))

    @task(**io_retries())
    def register(trained: list[dict], params=None):
        from tirelib import pipeline

        return pipeline.register(list(trained), params["thresholds"])

    @task(**io_retries())
    def stage(registered: list[dict], params=None):
        from tirelib import pipeline

        return pipeline.stage(registered, params["metric"])

    @task(**io_retries())
    def promote(staged: dict, params=None):
        from tirelib import pipeline

        return pipeline.promote(staged, params["metric"], params["thresholds"])

    @task(**io_retries())
    def mark_processed(jobs: list[dict], promotion: dict):
        from tirelib import pipeline

        return pipeline.mark_processed(pipeline.version_of(jobs), {"promotion": promotion})

    @task(**io_retries())
    def report(jobs: list[dict], evaluation: dict, promotion: dict):
        from tirelib import pipeline

        return pipeline.report(pipeline.version_of(jobs), evaluation, promotion)

    # One job per model type (times a sweep's combinations); none (skip the rest) when nothing
    # is new.
    jobs = resolve_version()
    trained = train.expand(job=jobs)
    validate_data(jobs) >> split(jobs) >> trained
    evaluation = evaluate(jobs, trained)
    promotion = promote(stage(register(trained)))
    evaluation >> promotion
    mark_processed(jobs, promotion) >> report(jobs, evaluation, promotion)

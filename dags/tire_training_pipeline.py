"""tire_training_pipeline: from a new dataset version to a promoted model.

Scheduled by the ``tire_raw_data`` asset (``tire_data_sensor`` emits it with the version in the
event's extra), or triggered by hand with params. Each task is one call into ``tirelib.pipeline``
and passes small JSON values on; a version processed already makes the run skip itself.

`resolve_version` checks every param before any work and logs which dataset version the run
processes and where that came from (the sensor's asset event, the params, or the newest waiting
version). Then: `validate_data` -> `split` -> `train` (one mapped task per training job, shown by
model type, and by place for a sweep's members) -> `evaluate` (challengers and the production
model on the same test split) -> `register` (those that pass the thresholds) -> `stage` (the best
by `metric`) -> `promote` (the gate against production) -> `mark_processed` -> `report` (Slack).

**Triggered by hand**: leave `dataset_version` empty to process the newest version waiting (the
run fails saying so when none waits), or name a version to process it again. Keys the form does
not know are refused.

**When a version fails**: a failure on bad data (one label only, unreadable images, too few
images for a split) fails at once; an outage of S3, MLflow or PostgreSQL is retried first. Either
way, once the task gives up the version is marked failed: `state/failed/<version>.json` in the
data bucket holds the reason, the task, a link to the run and the time. Slack hears of it once,
the sensor skips the version and newer versions go ahead. To retry it: read the reason
(`tirelib data list`, or the failed task's log), fix the data under `raw/<version>/` (or the
service), then run `tirelib data retry <version>`: the mark is cleared and the sensor announces
the version again. A manual run naming the version retries it too; success clears the mark.

**Params** (the trigger form shows the same descriptions, with bounds and allowed values):

"""

from __future__ import annotations

import json
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

# What the UI shows as the DAG's documentation: the text above, then every param.
DOC_MD = (__doc__ or "") + "\n".join(
    f"- `{name}` (default `{json.dumps(spec['default'])}`): {spec['description']}"
    for name, spec in PARAMS.items()
)
# A mapped training task is named by its job (tirelib.config.expand_jobs): "cnn", or
# "cnn (sweep 3/8)" for a sweep's member, instead of "train [2]".
TRAIN_LABEL = (
    "{% set job = task.op_kwargs['job'] %}{{ job['model_type'] }}"
    "{% if job.get('sweep') %} (sweep {{ job['sweep']['index'] + 1 }}/{{ job['sweep']['size'] }})"
    "{% endif %}"
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
    doc_md=DOC_MD,
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
        map_index_template=TRAIN_LABEL,
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
    def promote(staged: dict, evaluation: dict, params=None):
        from tirelib import pipeline

        return pipeline.promote(staged, evaluation, params["metric"], params["thresholds"])

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
    promotion = promote(stage(register(trained)), evaluation)  # the gate judges evaluate's result
    mark_processed(jobs, promotion) >> report(jobs, evaluation, promotion)

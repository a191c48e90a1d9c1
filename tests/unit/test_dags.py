"""The DAG files: they import without errors, parse fast, and import no heavy library."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]

# Runs in a fresh interpreter with its own AIRFLOW_HOME, so no test leaks Airflow config.
PROBE = """
import json, sys, time
from airflow.dag_processing.dagbag import DagBag
timings = {}
for path in sorted(__import__("pathlib").Path(sys.argv[1]).glob("*.py")):
    start = time.perf_counter()
    bag = DagBag(dag_folder=str(path))
    timings[path.name] = round(time.perf_counter() - start, 3)
bag = DagBag(dag_folder=sys.argv[1])
# The name a mapped training task shows, rendered as Airflow does once the task is unmapped.
labels = {}
pipeline = bag.dags.get("tire_training_pipeline")
if pipeline is not None:
    train = pipeline.get_task("train")
    jobs = {
        "plain": {"model_type": "cnn"},
        "sweep": {"model_type": "tinyvgg", "sweep": {"id": "s1", "index": 2, "size": 8}},
    }
    for name, job in jobs.items():
        task = train.unmap({"op_kwargs": {"job": job}})
        template = train.map_index_template or ""
        labels[name] = pipeline.get_template_env().from_string(template).render({"task": task})
batch = bag.dags.get("tire_batch_predict")
if batch is not None:
    predict = batch.get_task("predict")
    task = predict.unmap({"op_kwargs": {"name": "2026-12-01-line-3"}})
    labels["batch"] = batch.get_template_env().from_string(
        predict.map_index_template or ""
    ).render({"task": task})
print(json.dumps({
    "errors": {k: str(v)[-500:] for k, v in bag.import_errors.items()},
    "dags": {d.dag_id: sorted(t.task_id for t in d.tasks) for d in bag.dags.values()},
    "docs": {d.dag_id: d.doc_md or "" for d in bag.dags.values()},
    "params": {d.dag_id: sorted(d.params) for d in bag.dags.values()},
    "labels": labels,
    "sensors": {
        d.dag_id: {t.task_id: t.mode for t in d.tasks if hasattr(t, "poke")}
        for d in bag.dags.values()
    },
    "failure_callbacks": {
        d.dag_id: sorted(t.task_id for t in d.tasks if t.on_failure_callback)
        for d in bag.dags.values()
    },
    "mapped": {
        d.dag_id: sorted(t.task_id for t in d.tasks if getattr(t, "is_mapped", False))
        for d in bag.dags.values()
    },
    "monitoring": {
        t.task_id: {
            "retries": t.retries,
            "retry_policy": t.retry_policy is not None,
            "timeout": t.execution_timeout.total_seconds() if t.execution_timeout else None,
        }
        for t in getattr(bag.dags.get("tire_model_monitoring"), "tasks", [])
    },
    "schedules": {d.dag_id: str(getattr(d.timetable, "delta", "")) for d in bag.dags.values()},
    "timings": timings,
    "heavy": sorted(m for m in ("torch", "mlflow", "torchvision", "sklearn") if m in sys.modules),
}))
"""


@pytest.fixture(scope="module")
def dagbag(tmp_path_factory: pytest.TempPathFactory) -> dict:
    home = tmp_path_factory.mktemp("airflow")
    env = {**os.environ, "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(ROOT / "dags")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_dags_import_without_errors(dagbag: dict) -> None:
    assert dagbag["errors"] == {}
    assert set(dagbag["dags"]) == {
        "tire_data_sensor",
        "tire_training_pipeline",
        "tire_batch_predict",
        "tire_model_monitoring",
    }


def test_the_pipeline_has_the_designed_tasks(dagbag: dict) -> None:
    assert dagbag["dags"]["tire_data_sensor"] == ["announce_versions", "wait_for_new_version"]
    assert dagbag["dags"]["tire_training_pipeline"] == sorted(
        [
            "resolve_version",
            "validate_data",
            "split",
            "train",
            "evaluate",
            "register",
            "stage",
            "promote",
            "mark_processed",
            "report",
        ]
    )


def test_batch_prediction_scores_each_settled_batch_in_a_task_of_its_own(dagbag: dict) -> None:
    assert dagbag["dags"]["tire_batch_predict"] == ["predict", "wait_for_batches"]
    # The sensor holds no worker slot while it waits; one mapped task per batch, named by it.
    assert dagbag["sensors"]["tire_batch_predict"] == {"wait_for_batches": "reschedule"}
    assert dagbag["mapped"]["tire_batch_predict"] == ["predict"]
    assert dagbag["labels"]["batch"] == "2026-12-01-line-3"
    assert dagbag["failure_callbacks"]["tire_batch_predict"] == ["predict", "wait_for_batches"]
    doc = dagbag["docs"]["tire_batch_predict"]
    assert "predictions/<batch>.jsonl" in doc and "tirelib predict" in doc


def test_monitoring_is_one_hourly_task_with_the_io_retries(dagbag: dict) -> None:
    assert dagbag["dags"]["tire_model_monitoring"] == ["check"]
    assert dagbag["schedules"]["tire_model_monitoring"] == "1:00:00"
    # An unreachable Prometheus or MLflow is retried; a failure for good reaches Slack.
    assert dagbag["monitoring"]["check"] == {"retries": 3, "retry_policy": True, "timeout": 600}
    assert dagbag["failure_callbacks"]["tire_model_monitoring"] == ["check"]
    doc = " ".join(dagbag["docs"]["tire_model_monitoring"].split())
    assert "TIRE_AUTO_ROLLBACK" in doc and "population stability index" in doc


def test_parsing_imports_no_heavy_library(dagbag: dict) -> None:
    assert dagbag["heavy"] == []
    # The parse time of each file, for the record (`pytest -rA` shows it); not asserted.
    print("DAG parse seconds:", dagbag["timings"])


def test_mapped_training_tasks_are_named_by_their_job(dagbag: dict) -> None:
    assert dagbag["labels"]["plain"] == "cnn"
    assert dagbag["labels"]["sweep"] == "tinyvgg (sweep 3/8)"


def test_the_docs_say_what_each_param_does_and_what_to_do_when_a_version_fails(
    dagbag: dict,
) -> None:
    doc = dagbag["docs"]["tire_training_pipeline"]
    params = dagbag["params"]["tire_training_pipeline"]
    assert {"dataset_version", "model_types", "metric", "thresholds", "sweep"} <= set(params)
    for name in params:
        assert f"- `{name}` (default " in doc, name
    for dag_id in ("tire_training_pipeline", "tire_data_sensor"):
        assert "tirelib data retry <version>" in dagbag["docs"][dag_id], dag_id
    assert "state/failed/<version>.json" in doc

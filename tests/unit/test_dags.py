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
print(json.dumps({
    "errors": {k: str(v)[-500:] for k, v in bag.import_errors.items()},
    "dags": {d.dag_id: sorted(t.task_id for t in d.tasks) for d in bag.dags.values()},
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
    assert set(dagbag["dags"]) == {"tire_data_sensor", "tire_training_pipeline"}


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


def test_parsing_imports_no_heavy_library(dagbag: dict) -> None:
    assert dagbag["heavy"] == []
    # The parse time of each file, for the record (`pytest -rA` shows it); not asserted.
    print("DAG parse seconds:", dagbag["timings"])

"""Task logs: MLflow's chatter and progress bars stay out, its warnings reach the task log."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit

# Runs in a fresh interpreter: logging and MLflow's import-time setup are process-wide.
# The root handler on stdout stands for Airflow's task log; stderr is what Airflow shows as ERROR.
PROBE = """
import json, logging, sys
FORMAT = "%(levelname)s %(name)s %(message)s"
logging.basicConfig(stream=sys.stdout, level=logging.INFO, format=FORMAT)
from tirelib.logs import quiet_task_logs
if sys.argv[1] == "mlflow first":
    import mlflow
quiet_task_logs()
import mlflow
from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR
logging.getLogger("mlflow.tracking").info("chatter from mlflow")
logging.getLogger("mlflow.tracking").warning("a warning from mlflow")
logging.getLogger("botocore.credentials").info("found credentials")
logging.getLogger("tirelib.pipeline").info("a line of our own")
sys.stderr.flush()
print(json.dumps({"progress_bar": MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.get()}))
"""


@pytest.mark.parametrize("order", ["mlflow first", "mlflow later"])
def test_task_logs_keep_what_an_operator_needs(order: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    done = subprocess.run(
        [sys.executable, "-c", PROBE, order],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "WARNING mlflow.tracking a warning from mlflow" in done.stdout
    assert "INFO tirelib.pipeline a line of our own" in done.stdout
    assert "chatter from mlflow" not in done.stdout + done.stderr
    assert "found credentials" not in done.stdout + done.stderr
    assert "from mlflow" not in done.stderr  # nothing of MLflow's becomes a red ERROR line
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"progress_bar": False}

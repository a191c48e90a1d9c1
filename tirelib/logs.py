"""How loud the libraries tirelib calls may be: their warnings, not their chatter.

Entry points set logging up (the CLI, an Airflow task); modules only log. Inside an Airflow task
everything the process writes to stderr is shown as an ERROR line, and MLflow writes there twice
over: through a handler of its own (INFO and up) and with tqdm bars for artifact transfers.
:func:`quiet_task_logs` keeps a task's log to what an operator needs: tirelib's own lines, and
the libraries' warnings at their real level.
"""

from __future__ import annotations

import logging
import os
import sys

# Clients that log every request or credential lookup at INFO.
NOISY_LOGGERS = ("botocore", "boto3", "urllib3", "s3transfer", "httpx")


def quiet_libraries() -> None:
    """Keep only the warnings and errors of chatty third-party clients."""
    for name in NOISY_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))


def quiet_task_logs() -> None:
    """Quiet the libraries inside a task, and send MLflow's warnings to the task log.

    Idempotent and cheap: every pipeline step calls it when it starts. MLflow installs its own
    stderr handler when it is first imported unless ``MLFLOW_CONFIGURE_LOGGING`` is false, so
    an import still to come is told so, and one that happened already loses that handler.
    """
    quiet_libraries()
    # Both are read when used (a transfer, the first import), so setting them now is enough.
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    os.environ["MLFLOW_CONFIGURE_LOGGING"] = "false"
    mlflow_logger = logging.getLogger("mlflow")
    mlflow_logger.setLevel(logging.WARNING)
    if "mlflow" in sys.modules:
        mlflow_logger.handlers.clear()
        mlflow_logger.propagate = True

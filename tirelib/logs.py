"""How loud the libraries tirelib calls may be: their warnings, not their chatter.

Entry points set logging up (the CLI, an Airflow task); modules only log. Inside an Airflow task
everything the process writes to stderr is shown as an ERROR line, and MLflow writes there twice
over: through a handler of its own (INFO and up) and with tqdm bars for artifact transfers.
:func:`quiet_task_logs` keeps a task's log to what an operator needs: tirelib's own lines, and
the libraries' warnings at their real level. :func:`install_redaction` masks every credential in
every record the process makes (a client's exception text often quotes a URL with its password).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from tirelib.urls import mask_credentials

# How the command line (and each worker of the model server) writes its log lines.
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Clients that log every request or credential lookup at INFO.
NOISY_LOGGERS = ("botocore", "boto3", "urllib3", "s3transfer", "httpx")


def quiet_libraries() -> None:
    """Keep only the warnings and errors of chatty third-party clients."""
    for name in NOISY_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))


def quiet_task_logs() -> None:
    """Quiet the libraries inside a task, and send MLflow's warnings to the task log.

    Credentials are masked in every record (:func:`install_redaction`). Idempotent and cheap:
    every pipeline step calls it when it starts. MLflow installs its own stderr handler when it
    is first imported unless ``MLFLOW_CONFIGURE_LOGGING`` is false, so an import still to come
    is told so, and one that happened already loses that handler.
    """
    install_redaction()
    quiet_libraries()
    # Both are read when used (a transfer, the first import), so setting them now is enough.
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    os.environ["MLFLOW_CONFIGURE_LOGGING"] = "false"
    mlflow_logger = logging.getLogger("mlflow")
    mlflow_logger.setLevel(logging.WARNING)
    if "mlflow" in sys.modules:
        mlflow_logger.handlers.clear()
        mlflow_logger.propagate = True


# --- credentials --------------------------------------------------------------------------------


def redact_record(record: logging.LogRecord) -> logging.LogRecord:
    """``record`` with every credential masked in its message, arguments, traceback and stack.

    When masking changes the message, the record carries the masked text and no arguments; a
    traceback that held a credential is folded into the message, masked, since a handler may
    format ``exc_info`` itself (Airflow's structlog does). Masking twice changes nothing.
    """
    try:
        message = record.getMessage()
    except (TypeError, ValueError):  # a bad format string: logging reports it when emitted
        return record
    masked = mask_credentials(message)
    if record.exc_info and record.exc_info[1] is not None:
        trace = logging.Formatter().formatException(record.exc_info)
        masked_trace = mask_credentials(trace)
        if masked_trace != trace:
            masked = f"{masked}\n{masked_trace}"
            record.exc_info, record.exc_text = None, None
    if record.stack_info:
        record.stack_info = mask_credentials(record.stack_info)
    if masked != message:
        record.msg, record.args = masked, ()
    return record


class RedactingFilter(logging.Filter):
    """Masks credentials in every record it sees (for a handler configured by hand)."""

    def filter(self, record: logging.LogRecord) -> bool:
        redact_record(record)
        return True


class _RedactingFactory:
    """Wraps the log record factory: each record is masked when it is made."""

    def __init__(self, inner: Callable[..., logging.LogRecord]) -> None:
        self.inner = inner

    def __call__(self, *args: Any, **kwargs: Any) -> logging.LogRecord:
        return redact_record(self.inner(*args, **kwargs))


def install_redaction() -> None:
    """Mask credentials in every log record this process makes, whoever writes it.

    Entry points call it (the CLI, the model server, an Airflow task). Records are masked when
    made, so handlers added later (uvicorn's, Airflow's, MLflow's own) only ever see masked
    text. Idempotent.
    """
    factory = logging.getLogRecordFactory()
    if not isinstance(factory, _RedactingFactory):
        logging.setLogRecordFactory(_RedactingFactory(factory))

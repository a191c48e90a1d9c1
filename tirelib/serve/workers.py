"""Many server processes on one port: ``tirelib serve --workers N``.

uvicorn's own multi-process mode runs them: the parent binds the port and starts N workers (fresh
interpreters), replaces one that dies, stops them all on SIGTERM or SIGINT and replaces them one by
one on SIGHUP. Each worker builds its app with :func:`create_worker_app`: it loads its own model,
watches the alias itself and batches its own requests; the kernel hands each new connection to
one of them.

A worker learns what to serve from its environment, which the parent sets before the first one
starts: the resolved settings (command-line options included) as ``TIRE_SERVE_*`` variables, and
``PROMETHEUS_MULTIPROC_DIR``, a fresh temporary directory where every worker writes its metrics
and from which ``/metrics`` merges them (:mod:`.metrics`); the parent removes it when it stops. A
worker whose parent is gone (killed by SIGKILL) stops by itself, so none is left orphaned.
"""

from __future__ import annotations

import atexit
import json
import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tirelib.logs import LOG_FORMAT, NOISY_LOGGERS
from tirelib.serve.config import ServeConfig, load_serve_config
from tirelib.serve.metrics import MULTIPROC_DIR_VARIABLE, forget_worker, multiprocess_dir
from tirelib.serve.protocol import HeadGuardedProtocol, server_options

if TYPE_CHECKING:
    from fastapi import FastAPI

log = logging.getLogger(__name__)


def config_env(config: ServeConfig) -> dict[str, str | None]:
    """``config`` as the ``TIRE_SERVE_*`` variables from which :func:`load_serve_config` reads it
    back (None: the variable is to be unset, the field's default is None)."""
    prefix = ServeConfig.model_config.get("env_prefix", "")
    env: dict[str, str | None] = {}
    for field, value in config.model_dump(mode="json").items():
        name = f"{prefix}{field}".upper()
        env[name] = value if value is None or isinstance(value, str) else json.dumps(value)
    return env


def _set_environ(values: Mapping[str, str | None]) -> None:
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@contextmanager
def worker_environment(config: ServeConfig) -> Iterator[Path]:
    """This process's environment as the workers are to inherit it; yields the metrics directory
    (new and empty, removed afterwards, when the environment is restored)."""
    directory = Path(tempfile.mkdtemp(prefix="tirelib-metrics-"))
    values = {**config_env(config), MULTIPROC_DIR_VARIABLE: str(directory)}
    saved = {name: os.environ.get(name) for name in values}
    try:
        _set_environ(values)
        yield directory
    finally:
        _set_environ(saved)
        shutil.rmtree(directory, ignore_errors=True)


def worker_log_config(level: int) -> dict[str, Any]:
    """The command line's logging (format, level, quiet libraries) as uvicorn sets it up in each
    worker: a worker is a fresh interpreter, which the command line never configured."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"plain": {"format": LOG_FORMAT}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "plain",
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"level": logging.getLevelName(level), "handlers": ["stderr"]},
        "loggers": {name: {"level": "WARNING"} for name in NOISY_LOGGERS},
    }


@cache
def _worker_config() -> ServeConfig:
    return load_serve_config()


class WorkerProtocol(HeadGuardedProtocol):
    """:class:`~tirelib.serve.protocol.HeadGuardedProtocol` with the limits of the worker's own
    settings: uvicorn sends its protocol class to each worker by name, so the class that
    ``server_options`` makes for one config cannot travel; this one reads the limits where it runs.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        config = _worker_config()
        self.header_timeout_s = config.header_timeout_s
        self.max_header_bytes = config.max_header_bytes
        super().__init__(*args, **kwargs)


def _stop_with_parent() -> None:
    """Stop this worker (gracefully, as SIGTERM does) when the parent process is gone."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        parent.join()  # waits on the parent's sentinel: returns when the parent has exited
        log.warning(
            "the server's main process %s is gone; worker %d stops", parent.pid, os.getpid()
        )
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="watch-parent", daemon=True).start()


def create_worker_app() -> FastAPI:
    """One worker's app (uvicorn's factory): the settings the parent put in the environment."""
    from tirelib.serve.app import create_app

    directory = multiprocess_dir()
    if directory is not None:  # a worker that stops drops its model from the merged metrics
        atexit.register(forget_worker, directory, os.getpid())
    _stop_with_parent()
    return create_app(_worker_config())


def serve_workers(config: ServeConfig, **options: Any) -> None:
    """Serve on ``config.host:config.port`` with ``config.workers`` processes until stopped.

    ``options`` go to ``uvicorn.run`` (access log, graceful shutdown).
    """
    import uvicorn

    level = logging.getLogger().getEffectiveLevel()
    with worker_environment(config) as directory:
        log.info(
            "starting %d workers, %d threads each; metrics merged in %s",
            config.workers, config.resolved_threads(), directory,
        )  # fmt: skip
        uvicorn.run(
            f"{__name__}:{create_worker_app.__name__}",
            factory=True,
            workers=config.workers,
            host=config.host,
            port=config.port,
            log_config=worker_log_config(level),
            **{**server_options(config), "http": WorkerProtocol},
            **options,
        )

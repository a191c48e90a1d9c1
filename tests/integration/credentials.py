"""Helpers of the credential tests: a credential in every setting, an MLflow stand-in that
refuses, and a model server run with them while no model can be loaded.

Every setting that can hold a credential holds one, each with its own marker (:class:`Secrets`):
the MLflow tracking URI (``user:password@``), the S3 endpoint, both database URLs, the Slack
webhook (whose path is the secret) and the AWS secret key.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import _FOREIGN_ENV, SlackReceiver
from tirelib.stack import HttpCheck, ManagedProcess, free_port

MODEL = "tire-defect-classifier"
# A 1x1 image as TF Serving clients send it.
TINY = {"instances": [[[[0.5, 0.5, 0.5]]]]}


@dataclass(frozen=True)
class Secrets:
    """The credential of each setting, all sharing one random marker."""

    marker: str

    @property
    def values(self) -> dict[str, str]:
        return {
            name: f"{self.marker}{name}"
            for name in ("mlflow", "s3", "db", "airflow", "slack", "aws")
        }

    def env(self, *, tracking_uri: str, s3_port: int, slack_url: str) -> dict[str, str]:
        v = self.values
        scheme, _, rest = tracking_uri.partition("://")
        return {
            "MLFLOW_TRACKING_URI": f"{scheme}://alice:{v['mlflow']}@{rest}",
            "TIRE_S3_ENDPOINT_URL": f"http://key:{v['s3']}@127.0.0.1:{s3_port}",
            "TIRE_DATABASE_URL": f"postgresql://tire:{v['db']}@127.0.0.1:{free_port()}/mlflow",
            "TIRE_AIRFLOW_DATABASE_URL": (
                f"postgresql://airflow:{v['airflow']}@127.0.0.1:{free_port()}/airflow"
            ),
            "TIRE_SLACK_WEBHOOK_URL": f"{slack_url.rsplit('/', 1)[0]}/{v['slack']}",
            "AWS_ACCESS_KEY_ID": "tirelib-test",
            "AWS_SECRET_ACCESS_KEY": v["aws"],
            "TIRE_S3_MAX_ATTEMPTS": "1",
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
            "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
        }

    def leaks(self, text: str) -> list[str]:
        """The settings whose credential appears in ``text``."""
        return [name for name, value in self.values.items() if value in text]


def clean_env(tmp_path: Path, extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _FOREIGN_ENV}
    env = {k: v for k, v in env.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    env.update({"TIRE_HOME": str(tmp_path / "home"), **extra})
    return env


class RefusingTracker:
    """An MLflow stand-in that names a production version, then drops every other request.

    The server resolves ``@production`` to version 7 and fails to load it: MLflow's error for a
    dropped connection quotes the whole tracking URI, credentials included.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.startswith("/api/2.0/mlflow/registered-models/alias"):
                    body = json.dumps(
                        {"model_version": {"name": MODEL, "version": "7", "aliases": []}}
                    ).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                self.close_connection = True  # no answer at all

            do_POST = do_GET

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


@contextmanager
def model_server(tmp_path: Path, env: dict[str, str]) -> Iterator[tuple[str, ManagedProcess]]:
    """``tirelib serve`` with ``env`` on a free port, ready when it answers ``/healthz``."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = ManagedProcess(
        "serve",
        [sys.executable, "-m", "tirelib", "serve", "--port", str(port), "--poll-interval", "0.5"],
        state_dir=tmp_path / "serve-process",
        ready=HttpCheck(f"{url}/healthz"),
        env={**env, "TIRE_SERVE_STARTUP_TIMEOUT_S": "2"},
        url=url,
        ports=(port,),
    )
    process.start()
    try:
        process.wait_ready(120)
        yield url, process
    finally:
        process.stop(timeout=20)


def every_answer(url: str) -> list[tuple[str, int, str]]:
    """(request, status, body) of every endpoint, while no model is loaded."""
    base = "/v1/models/tire"
    gets = [
        "/healthz", "/readyz", "/metrics", base, f"{base}/versions/7", f"{base}/labels/production",
        f"{base}/metadata", f"{base}/versions/7/metadata", "/v2", "/v2/health/ready",
        "/v2/models/tire", "/v2/models/tire/ready", "/no/such/endpoint",
    ]  # fmt: skip
    infer = {"inputs": [{"name": "input", "shape": [1, 1, 1, 3], "datatype": "FP32",
                         "data": [0.5, 0.5, 0.5]}]}  # fmt: skip
    posts: list[tuple[str, Any]] = [
        (f"{base}:predict", TINY),
        (f"{base}/versions/7:predict", TINY),
        (f"{base}/labels/production:predict", TINY),
        (f"{base}:classify", {"examples": [{"image": {"b64": "aGVsbG8="}}]}),
        ("/v2/models/tire/infer", infer),
        (f"{base}:predict", {"instances": "not a list"}),
    ]
    answers = []
    with httpx.Client(base_url=url, timeout=30) as client:
        for path in gets:
            response = client.get(path)
            answers.append((f"GET {path}", response.status_code, response.text))
        for path, body in posts:
            response = client.post(path, json=body)
            answers.append((f"POST {path}", response.status_code, response.text))
    return answers


def wait_until(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@dataclass
class Observed:
    """Everything a model server said while its tracking server was down or refusing."""

    answers: list[tuple[str, int, str]]  # (request, status, body)
    log: str
    slack: list[str]  # the Slack messages, as JSON


def server_without_its_tracker(
    tracker: str, secret: Secrets, slack_receiver: SlackReceiver, tmp_path: Path
) -> Observed:
    """Run ``tirelib serve`` with ``secret`` in every setting and MLflow ``down`` (a closed
    port: the alias cannot be looked up) or ``refusing`` (:class:`RefusingTracker`: version 7
    fails to load); return every answer, the server's log and its Slack messages."""
    refusing = RefusingTracker() if tracker == "refusing" else None
    tracking_uri = refusing.url if refusing else f"http://127.0.0.1:{free_port()}"
    env = clean_env(
        tmp_path,
        secret.env(tracking_uri=tracking_uri, s3_port=free_port(), slack_url=slack_receiver.url),
    )
    try:
        with model_server(tmp_path, env) as (url, process):
            if refusing:  # version 7 is known, and failed to load
                wait_until(
                    lambda: "UNAVAILABLE" in httpx.get(f"{url}/v1/models/tire").text, 60,
                    "version 7 to fail",
                )  # fmt: skip
                slack = slack_receiver.wait_for(1, timeout=30)
            else:  # the alias cannot even be looked up
                wait_until(lambda: "***" in httpx.get(f"{url}/readyz").text, 60, "the reason")
                slack = []
            answers = every_answer(url)
            log_path = process.log_path
        log_text = log_path.read_text(errors="replace")
    finally:
        if refusing:
            refusing.close()
    return Observed(answers, log_text, [json.dumps(message) for message in slack])

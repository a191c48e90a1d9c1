"""The model server in the local stack: ``tirelib serve`` on 127.0.0.1:``TIRE_SERVE_PORT``.

It serves ``models:/<TIRE_MODEL_NAME>@production`` (``TIRE_SERVE_MODEL_URI`` and the other
``TIRE_SERVE_*`` variables apply as they do to ``tirelib serve``) from the stack's MLflow, and
follows the alias: a model promoted later is loaded without a restart. Before the first
promotion it runs without a model (``/readyz`` answers 503), so the stack counts it as up once
``/healthz`` answers; :func:`wait_serving` waits for a given version.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request

from tirelib.errors import StackError
from tirelib.settings import Settings, settings_env
from tirelib.stack.ports import HOST, HttpCheck
from tirelib.stack.process import Component, ManagedProcess, inherited_env

# The server waits up to TIRE_SERVE_STARTUP_TIMEOUT_S (300 s) for its first model to load.
READY_TIMEOUT_S = 360.0


def server_url(settings: Settings) -> str:
    """The local model server's base URL for ``settings.serve_port``."""
    return f"http://{HOST}:{settings.serve_port}"


def server_component(settings: Settings) -> Component:
    """``tirelib serve`` on 127.0.0.1:``settings.serve_port``, against the stack's MLflow."""
    state_dir = settings.stack_dir.absolute()
    url = server_url(settings)
    env = inherited_env(drop=("MLFLOW_TRACKING_URI",))
    env.update(settings_env(settings, secrets=True))
    env["MLFLOW_TRACKING_URI"] = settings.mlflow_tracking_uri
    process = ManagedProcess(
        "serve",
        [
            sys.executable,
            "-m",
            "tirelib",
            "serve",
            "--host",
            HOST,
            "--port",
            str(settings.serve_port),
        ],
        state_dir=state_dir,
        ready=HttpCheck(f"{url}/healthz"),
        env=env,
        cwd=state_dir,
        title="Model server",
        url=url,
        ports=(settings.serve_port,),
    )
    return Component(process, ready_timeout=READY_TIMEOUT_S, stop_timeout=40.0)


def served_version(url: str, timeout: float = 5.0) -> str | None:
    """The model version the server at ``url`` serves now (None: no model, or no answer)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"{url}/readyz", timeout=timeout) as response:
            body = json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None
    version = body.get("model_version") if isinstance(body, dict) else None
    return str(version) if version is not None else None


def wait_serving(url: str, version: str, timeout: float = 180.0, interval: float = 1.0) -> None:
    """Wait until the server at ``url`` serves model ``version``; StackError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        current = served_version(url)
        if current == version:
            return
        if time.monotonic() >= deadline:
            now = f"version {current}" if current else "no model"
            raise StackError(
                f"the model server at {url} serves {now}, not version {version}, after "
                f"{timeout:.0f} s; its log (logs/serve.log in the stack's folder) says why"
            )
        time.sleep(interval)

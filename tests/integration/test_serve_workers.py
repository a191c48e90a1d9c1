"""``tirelib serve --workers 2`` as a real process: two workers on one port, each with its own
model from the real MLflow registry (PostgreSQL backend, S3 artifacts).

One server for the module (:func:`server`), following ``@production`` every 0.5 s. The main
process makes its metrics directory under the ``TMPDIR`` the test gives it, so a test can read
each worker's own counters beside the merged ``/metrics``. Stopping the module's server is a
check of its own: SIGTERM to the main process alone stops every worker and removes the directory;
:func:`test_workers_stop_when_the_main_process_is_killed` kills another one with SIGKILL.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tests.conftest import S3Server, module_env
from tests.integration.model_server import running_server, save_model_folder
from tirelib import tracking
from tirelib.models import get_model, get_spec
from tirelib.preprocessing import Preprocessing
from tirelib.stack import ManagedProcess

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes in /proc"),
]

WORKERS = 2
CLASSES = ["good", "defective"]


# --- processes and metrics -------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state first, then the ppid)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] not in "ZX"


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None and int(fields[1]) == pid and fields[0] not in "ZX":
                found.append(int(entry.name))
    return found


def workers_of(pid: int) -> list[int]:
    """The worker processes of the server ``pid`` (not multiprocessing's resource tracker)."""
    return [
        child
        for child in children(pid)
        if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes()
    ]


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


def scrape(url: str) -> list[Sample]:
    # A connection of its own each time: any worker may answer.
    text = httpx.get(f"{url}/metrics", headers={"Connection": "close"}).text
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def total(samples: list[Sample], name: str, **labels: str) -> float:
    return sum(
        s.value
        for s in samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def served_versions(url: str) -> set[str]:
    return {s.labels.get("version", "") for s in scrape(url) if s.name == "tire_model_info"}


@dataclass
class Server:
    process: ManagedProcess
    url: str
    tmp: Path  # the main process's TMPDIR

    @property
    def pid(self) -> int:
        assert self.process.pid is not None
        return self.process.pid

    def metrics_dirs(self) -> list[Path]:
        return sorted(self.tmp.glob("tirelib-metrics-*"))

    def worker_samples(self, pid: int, scratch: Path) -> list[Sample]:
        """What worker ``pid`` alone counted: its counter file, read on its own."""
        (directory,) = self.metrics_dirs()
        source = directory / f"counter_{pid}.db"
        if not source.exists():
            return []
        target = scratch / str(pid)
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        shutil.copy(source, target / source.name)
        return [
            s for m in MultiProcessCollector(None, path=str(target)).collect() for s in m.samples
        ]


def loaded_everywhere(url: str, loads: int = WORKERS) -> bool:
    return total(scrape(url), "tire_model_reloads_total", result="success") >= loads


def b64_png(seed: int) -> dict[str, str]:
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return {"b64": base64.b64encode(buffer.getvalue()).decode()}


def predict(url: str, body: dict[str, Any]) -> httpx.Response:
    # A connection of its own: the kernel hands it to either worker.
    return httpx.post(
        f"{url}/v1/models/tire:predict", json=body, headers={"Connection": "close"}, timeout=60
    )


# --- fixtures --------------------------------------------------------------------------------


@dataclass
class Registry:
    client: MlflowClient
    name: str


@pytest.fixture(scope="module")
def registry(
    tmp_path_factory: pytest.TempPathFactory, s3_server: S3Server, mlflow_server: str
) -> Iterator[Registry]:
    """Two versions of an untrained CNN (other weights each) in a model of the module's own;
    ``@production`` on version 1."""
    root = tmp_path_factory.mktemp("workers")
    with module_env(root, s3_server, mlflow_server, "workers", own_model=True) as settings:
        tracking.configure(settings)
        spec = get_spec("cnn")
        for seed in (0, 1):
            torch.manual_seed(seed)
            network = get_model("cnn", num_classes=len(CLASSES)).eval()
            with mlflow.start_run():
                uri = tracking.log_model(
                    network,
                    model_type="cnn",
                    classes=CLASSES,
                    prep=Preprocessing(32, spec.mean, spec.std),
                )
            mlflow.register_model(uri, settings.model_name)
        client = MlflowClient(settings.mlflow_tracking_uri)
        client.set_registered_model_alias(settings.model_name, "production", "1")
        yield Registry(client, settings.model_name)


def stop_main_process(server: Server, signum: signal.Signals) -> list[int]:
    """Signal the main process alone (not its group); wait for its workers; return them."""
    main = server.pid  # read once: the pid file may be gone once the process is
    workers = workers_of(main)
    assert len(workers) == WORKERS, f"workers of {main}: {workers}"
    everything = [main, *children(main)]
    os.kill(main, signum)
    wait_until(
        lambda: not any(alive(pid) for pid in everything),
        timeout=60,
        what=f"the server {main} and its processes {everything[1:]} to exit",
    )
    return workers


@pytest.fixture(scope="module")
def server(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """``tirelib serve --workers 2`` following ``@production``, both workers with a model.

    Stopped as a supervisor stops it, SIGTERM to the main process's pid alone: every worker
    exits and the metrics directory is removed (checked here, after the module's tests).
    """
    state = tmp_path_factory.mktemp("workers-process")
    tmp = state / "tmp"
    tmp.mkdir()
    args = ["--workers", str(WORKERS), "--poll-interval", "0.5", "--max-wait-ms", "2"]
    env = {"TMPDIR": str(tmp)}
    with running_server(state, args, env=env) as process:
        assert process.url is not None
        server = Server(process, process.url, tmp)
        wait_until(lambda: loaded_everywhere(server.url), 180, "both workers to load a model")
        assert len(server.metrics_dirs()) == 1
        yield server
        stop_main_process(server, signal.SIGTERM)
        assert server.metrics_dirs() == []


# --- tests -----------------------------------------------------------------------------------


def test_the_workers_share_the_port_and_metrics_sum_over_them(
    server: Server, tmp_path: Path
) -> None:
    workers = workers_of(server.pid)
    assert len(workers) == WORKERS
    # The main process only watches: torch is in the workers' memory, not in its own.
    assert b"libtorch" not in Path(f"/proc/{server.pid}/maps").read_bytes()
    assert all(b"libtorch" in Path(f"/proc/{pid}/maps").read_bytes() for pid in workers)
    for pid in workers:  # each loaded a model of its own
        assert total(server.worker_samples(pid, tmp_path), "tire_model_reloads_total") >= 1

    def answered(pid: int) -> float:
        counts = server.worker_samples(pid, tmp_path)
        return total(counts, "tire_http_requests_total", method="POST", status="200")

    before = total(scrape(server.url), "tire_http_requests_total", method="POST", status="200")
    before_each = {pid: answered(pid) for pid in workers}
    body = {"instances": [b64_png(0), b64_png(1)]}
    sent = 0
    with ThreadPoolExecutor(4) as pool:
        deadline = time.monotonic() + 120
        while not all(answered(pid) > before_each[pid] for pid in workers):
            assert time.monotonic() < deadline, "one worker answered no request in 2 minutes"
            responses = list(pool.map(lambda _: predict(server.url, body), range(8)))
            sent += len(responses)
            assert [r.status_code for r in responses] == [200] * len(responses)
            for response in responses:
                probabilities = np.asarray(response.json()["predictions"])
                assert probabilities.shape == (2, len(CLASSES))
                np.testing.assert_allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    # A request is counted as its response ends: a count may trail the answer by a moment.
    wait_until(
        lambda: sum(answered(pid) - before_each[pid] for pid in workers) == sent,
        10,
        f"the workers' own counts to add up to the {sent} requests sent",
    )
    for _ in range(4):  # whichever worker answers /metrics shows the sum
        samples = scrape(server.url)
        assert total(samples, "tire_http_requests_total", method="POST", status="200") == (
            before + sent
        )
        assert total(samples, "tire_predictions_total") >= 2 * sent


def test_a_promotion_reaches_every_worker(server: Server, registry: Registry) -> None:
    (current,) = served_versions(server.url)
    target = "2" if current == "1" else "1"
    loads = total(scrape(server.url), "tire_model_reloads_total", result="success")
    registry.client.set_registered_model_alias(registry.name, "production", target)
    # The info shows each version a live worker serves: only the new one once both swapped.
    wait_until(lambda: served_versions(server.url) == {target}, 120, f"version {target} only")
    wait_until(
        lambda: loaded_everywhere(server.url, int(loads) + WORKERS), 10, "both reloads counted"
    )
    assert total(scrape(server.url), "tire_model_reloads_total", result="success") == (
        loads + WORKERS
    )
    for _ in range(8):
        status = httpx.get(f"{server.url}/v1/models/tire", headers={"Connection": "close"})
        (available,) = status.json()["model_version_status"]
        assert (available["version"], available["state"]) == (target, "AVAILABLE")


def test_workers_stop_when_the_main_process_is_killed(tmp_path: Path) -> None:
    """SIGKILL leaves the main process no time to stop its workers: each stops by itself."""
    folder = save_model_folder(tmp_path / "model")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    args = ["--model-uri", str(folder), "--workers", str(WORKERS)]
    env = {"TMPDIR": str(tmp), "TIRE_HOME": str(tmp_path / "home")}
    with running_server(tmp_path / "state", args, env=env) as process:
        assert process.url is not None
        server = Server(process, process.url, tmp)
        wait_until(lambda: loaded_everywhere(server.url), 180, "both workers to load the model")
        workers = stop_main_process(server, signal.SIGKILL)
        assert not any(alive(pid) for pid in workers)

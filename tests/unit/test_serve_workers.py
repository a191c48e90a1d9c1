"""Many workers: the settings a worker reads back from its environment, the refused counts,
and the metrics of several processes merged (prometheus_client's multiprocess mode, each worker
stood in for by a value class of its own in this process)."""

from __future__ import annotations

import logging
import logging.config
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from prometheus_client import values
from prometheus_client.parser import text_string_to_metric_families

from tests.cli import tirelib
from tirelib.errors import ConfigurationError
from tirelib.serve.config import MAX_WORKERS, ServeConfig, load_serve_config
from tirelib.serve.metrics import MULTIPROC_DIR_VARIABLE, ServeMetrics, forget_worker
from tirelib.serve.workers import config_env, worker_environment, worker_log_config

pytestmark = pytest.mark.unit


# --- settings ------------------------------------------------------------------------------


def test_a_worker_reads_back_the_settings_of_the_main_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    given = load_serve_config(
        model_uri="models:/tire@staging",
        port=9001,
        poll_interval_s=0.25,
        max_wait_ms=2.5,
        num_threads=3,
        workers=4,
        device="cpu",
        optimize=False,
        capture_rate=0.125,
    )
    monkeypatch.setenv("TIRE_SERVE_PORT", "1234")  # inherited, replaced by the given value
    with worker_environment(given) as directory:
        assert directory.is_dir() and not any(directory.iterdir())
        assert os.environ[MULTIPROC_DIR_VARIABLE] == str(directory)
        assert load_serve_config() == given
    assert not directory.exists()
    assert MULTIPROC_DIR_VARIABLE not in os.environ
    assert os.environ["TIRE_SERVE_PORT"] == "1234"


def test_a_default_of_none_unsets_an_inherited_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIRE_SERVE_MODEL_URI", "models:/other@production")
    given = ServeConfig(workers=2, model_uri=None)  # the variable is overridden
    env = config_env(given)
    assert env["TIRE_SERVE_MODEL_URI"] is None
    assert env["TIRE_SERVE_WORKERS"] == "2"
    with worker_environment(given):
        assert "TIRE_SERVE_MODEL_URI" not in os.environ
        assert load_serve_config().model_uri is None
    assert os.environ["TIRE_SERVE_MODEL_URI"] == "models:/other@production"


@pytest.mark.parametrize(
    ("workers", "allowed"),
    [(0, "greater than or equal to 1"), (MAX_WORKERS + 1, f"less than or equal to {MAX_WORKERS}")],
)
def test_a_bad_worker_count_is_refused_with_what_is_allowed(workers: int, allowed: str) -> None:
    done = tirelib("serve", "--workers", str(workers))
    assert done.returncode != 0
    assert f"TIRE_SERVE_WORKERS={workers}" in done.stderr and allowed in done.stderr
    with pytest.raises(ConfigurationError, match=allowed):
        load_serve_config(workers=workers)


def test_the_workers_share_the_cpus_unless_threads_are_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert load_serve_config().resolved_threads() == 16
    assert load_serve_config(workers=4).resolved_threads() == 4
    assert load_serve_config(workers=MAX_WORKERS).resolved_threads() == 1
    assert load_serve_config(workers=4, num_threads=8).resolved_threads() == 8


def test_a_worker_logs_as_the_command_line_does(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = (root.level, list(root.handlers), logging.getLogger("botocore").level)
    try:
        logging.config.dictConfig(worker_log_config(logging.DEBUG))
        logging.getLogger("tirelib.test").debug("worker line %d", 7)
        logging.getLogger("botocore").info("chatter")
        err = capsys.readouterr().err
        assert " DEBUG tirelib.test: worker line 7" in err
        assert "chatter" not in err
    finally:
        root.handlers[:] = saved[1]
        root.setLevel(saved[0])
        logging.getLogger("botocore").setLevel(saved[2])


# --- metrics merged over the workers --------------------------------------------------------


@pytest.fixture
def shared_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    directory = tmp_path / "metrics"
    directory.mkdir()
    monkeypatch.setenv(MULTIPROC_DIR_VARIABLE, str(directory))
    yield directory


class Worker:
    """A worker process stood in for: what it records goes to the files of ``pid``.

    prometheus_client makes a labelled series' value when the labels are first used, with the
    value class of that moment, so each call runs with this worker's class in place.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch, pid: int) -> None:
        self.monkeypatch = monkeypatch
        self.value_class = values.MultiProcessValue(lambda: pid)
        with self.running():
            self.metrics = ServeMetrics()

    @contextmanager
    def running(self) -> Iterator[None]:
        saved = values.ValueClass
        values.ValueClass = self.value_class
        try:
            yield
        finally:
            values.ValueClass = saved

    def load(self, version: str, model_type: str = "cnn") -> None:
        with self.running():
            self.metrics.model_loaded(version=version, model_type=model_type, name="tire")

    def answer(self, requests: int) -> None:
        with self.running():
            for _ in range(requests):
                self.metrics.requests.labels(**ROUTE).inc()
            self.metrics.observe_batch(requests, 0.01)


ROUTE = {"endpoint": "/v1/models/{model_name}:predict", "method": "POST", "status": "200"}


def samples(metrics: ServeMetrics, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    text = metrics.render().decode()
    return {
        tuple(sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    }


def served_versions(metrics: ServeMetrics) -> set[str]:
    return {dict(labels).get("version", "") for labels in samples(metrics, "tire_model_info")}


def dead_pid() -> int:
    """A pid no process has now (a child that has exited and been reaped)."""
    done = subprocess.Popen(["true"])
    done.wait()
    return done.pid


def test_counters_and_histograms_are_summed_over_the_workers(
    shared_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = Worker(monkeypatch, os.getpid()), Worker(monkeypatch, os.getppid())
    first.answer(3)
    second.answer(4)
    for worker in (first, second):  # whichever worker answers /metrics
        requests = samples(worker.metrics, "tire_http_requests_total")
        assert requests[tuple(sorted(ROUTE.items()))] == 7
        assert samples(worker.metrics, "tire_inference_batch_size_count")[()] == 2
        assert samples(worker.metrics, "tire_inference_batch_size_sum")[()] == 7


def test_the_model_info_shows_each_version_a_live_worker_serves(
    shared_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = Worker(monkeypatch, os.getpid()), Worker(monkeypatch, os.getppid())
    killed = Worker(monkeypatch, dead_pid())  # it never dropped its own series
    merged = first.metrics
    assert served_versions(merged) == {""}  # no model anywhere yet: no version label
    killed.load("9")
    first.load("1")
    second.load("1")
    assert served_versions(merged) == {"1"}  # the killed worker's version is left out
    second.load("2", "resnet18")
    assert served_versions(merged) == {"1", "2"}  # a rollout in progress
    info = samples(merged, "tire_model_info")
    assert info[(("model_type", "resnet18"), ("name", "tire"), ("version", "2"))] == 1
    first.load("2", "resnet18")
    assert served_versions(second.metrics) == {"2"}
    assert samples(merged, "tire_model_reloads_total")[(("result", "success"),)] == 5
    forget_worker(shared_dir, os.getppid())  # the second worker stops
    assert served_versions(merged) == {"2"}
    forget_worker(shared_dir, os.getpid())
    assert served_versions(merged) == set()
    assert samples(merged, "tire_model_reloads_total")[(("result", "success"),)] == 5


def test_alone_a_server_keeps_its_own_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MULTIPROC_DIR_VARIABLE, raising=False)
    metrics = ServeMetrics()
    assert metrics.multiprocess_dir is None and metrics.exposed is metrics.registry
    metrics.model_loaded(version="4", model_type="cnn", name="tire")
    assert served_versions(metrics) == {"4"}
    assert "tire_model_info" in metrics.render().decode()

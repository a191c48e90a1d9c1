"""Every panel of the Grafana dashboards returns data from a real Prometheus.

One module fixture (:func:`stack`) runs what Grafana would read in production: ``tirelib serve``
with a small model folder (an untrained ``cnn`` carrying a drift baseline), Debian's
Pushgateway and Debian's Prometheus, on free loopback ports. Prometheus scrapes the server and the
Pushgateway every second under the job names the rules expect (``model-server``, and
``pushgateway`` with ``honor_labels``) and evaluates the repository's recording and alert rules
every second. The test sends predictions (concurrent, so the server batches them; of varied
brightness, so the model predicts both classes), one bad request, the true labels of the
predictions as feedback, and pushes the pipeline's metrics through :mod:`tirelib.jobmetrics`.
It then evaluates every panel's every query as Grafana would (template variables resolved from
their own queries, ``$__rate_interval`` and ``$__range`` from the time range) and asserts that
each returns a finite value.

With ``TIRE_GRAFANA_PREVIEWS=<folder>``, :func:`test_previews` runs a longer scenario (a briefly
trained model on synthetic tires, two replicas, a burst, a shift to darker images, pipeline runs
that fail and recover) and draws the README's pictures of the dashboards into the folder.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import math
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

from tests.integration.model_server import running_server, save_model_folder
from tirelib import jobmetrics
from tirelib.drift import Baseline, compute_baseline, image_statistics
from tirelib.settings import Settings
from tirelib.stack import HttpCheck, ManagedProcess, free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "docker" / "grafana"
RULES = sorted((ROOT / "docker" / "prometheus" / "rules").glob("*.yml"))
CLASSES = ("good", "defective")
SCRAPE_S = 1.0
DEADLINE_S = 90.0


def load_module(name: str) -> ModuleType:
    """A script of docker/grafana/ as a module (the folder is no package)."""
    spec = importlib.util.spec_from_file_location(f"tire_grafana_{name}", GRAFANA / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


render = load_module("render")


def binary(*names: str) -> str:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    reason = f"{names[0]} is not installed (Debian's package of that name; `make system-deps`)"
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


# --- the monitoring stack --------------------------------------------------------------------


@dataclass
class Stack:
    servers: list[str]
    prometheus: str
    pushgateway: str
    started: float = field(default_factory=time.time)

    @property
    def server(self) -> str:
        return self.servers[0]


def _process(name: str, argv: list[str], root: Path, port: int, ready: str) -> ManagedProcess:
    url = f"http://127.0.0.1:{port}"
    process = ManagedProcess(
        name, argv, state_dir=root, ready=HttpCheck(url + ready), url=url, ports=(port,)
    )
    process.start()
    return process


@contextmanager
def monitoring_stack(root: Path, model: Path, *, replicas: int = 1) -> Iterator[Stack]:
    """Model server replicas, a Pushgateway and a Prometheus that scrapes both every second."""
    prometheus_bin = binary("prometheus")
    pushgateway_bin = binary("prometheus-pushgateway", "pushgateway")
    with ExitStack() as stack:
        args = ["--model-uri", str(model), "--max-wait-ms", "20", "--max-batch-size", "32"]
        servers = [
            stack.enter_context(running_server(root / f"serve-{i}", args)).url
            for i in range(replicas)
        ]
        port = free_port()
        pushgateway = _process(
            "pushgateway",
            # Debian's build persists to /var/lib/prometheus by default: keep this one's
            # metrics in memory, so no run sees another's.
            [pushgateway_bin, f"--web.listen-address=127.0.0.1:{port}", "--persistence.file="],
            root / "pushgateway",
            port,
            "/-/ready",
        )
        stack.callback(pushgateway.stop)
        pushgateway.wait_ready(30)
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(path) for path in RULES],
            "scrape_configs": [
                {
                    "job_name": "model-server",
                    "static_configs": [{"targets": [s.removeprefix("http://") for s in servers]}],
                },
                {
                    "job_name": "pushgateway",
                    "honor_labels": True,
                    "static_configs": [{"targets": [f"127.0.0.1:{port}"]}],
                },
            ],
        }
        (root / "prometheus").mkdir(parents=True, exist_ok=True)
        path = root / "prometheus" / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        prom_port = free_port()
        prometheus = _process(
            "prometheus",
            [
                prometheus_bin,
                f"--config.file={path}",
                f"--storage.tsdb.path={root / 'prometheus' / 'data'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
            ],
            root / "prometheus",
            prom_port,
            "/-/ready",
        )
        stack.callback(prometheus.stop)
        prometheus.wait_ready(60)
        yield Stack(servers, prometheus.url or "", pushgateway.url or "")


# --- traffic ---------------------------------------------------------------------------------


def encode(pixels: np.ndarray) -> str:
    """HWC pixels in [0, 1] as a base64 PNG."""
    buffer = io.BytesIO()
    Image.fromarray((np.clip(pixels, 0, 1) * 255).astype(np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@dataclass
class Answer:
    request_id: str
    predicted: list[str]


def predict(client: httpx.Client, url: str, images: Sequence[str]) -> Answer:
    answer = client.post(
        f"{url}/v1/models/tire:predict", json={"instances": [{"b64": b} for b in images]}
    )
    assert answer.status_code == 200, answer.text
    rows = answer.json()["predictions"]
    return Answer(answer.headers["x-request-id"], [CLASSES[int(np.argmax(r))] for r in rows])


def feedback(client: httpx.Client, url: str, request_id: str, labels: Sequence[str]) -> None:
    body = {"request_id": request_id, "labels": list(labels)}
    answer = client.post(f"{url}/v1/models/tire:feedback", json=body)
    assert answer.status_code == 200, answer.text


def noise(rng: np.random.Generator, brightness: float, contrast: float, size: int = 32) -> str:
    return encode(rng.normal(brightness, contrast, (size, size, 3)))


def send_traffic(stack: Stack, *, seed: int = 0) -> None:
    """Concurrent predictions of varied brightness and contrast, a bad request, and feedback:
    the predicted class as the true one, except every fourth request's first label."""
    rng = np.random.default_rng(seed)
    looks = [(b, c) for b in (0.15, 0.3, 0.5, 0.8) for c in (0.05, 0.2, 0.3)]
    batches = [
        [noise(rng, *looks[(i + j) % len(looks)]) for j in range(1 + i % 4)] for i in range(36)
    ]
    with httpx.Client(timeout=60) as client, ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda b: predict(client, stack.server, b), batches))
        bad = client.post(f"{stack.server}/v1/models/tire:predict", json={"instances": "none"})
        assert bad.status_code == 400, bad.text
        for index, answer in enumerate(answers):
            labels = list(answer.predicted)
            if index % 4 == 0:
                labels[0] = CLASSES[1 - CLASSES.index(labels[0])]
            feedback(client, stack.server, answer.request_id, labels)
    predicted = {c for a in answers for c in a.predicted}
    assert predicted == set(CLASSES), f"the model predicted only {predicted}: vary the images"


def push_pipeline(stack: Stack, dag_id: str, *, succeeded: bool, **values: Any) -> None:
    settings = Settings(pushgateway_url=stack.pushgateway)
    assert jobmetrics.push(jobmetrics.RunMetrics(dag_id, succeeded, **values), settings)


def promoted(accuracy: float) -> dict[str, float]:
    return {
        "accuracy": accuracy,
        "precision": accuracy - 0.02,
        "recall": accuracy + 0.01,
        "f1": accuracy - 0.005,
        "roc_auc": min(accuracy + 0.04, 0.995),
        "loss": 0.31,
    }


def made_up_baseline() -> Baseline:
    """A plausible baseline for the untrained model: the gauges need one, its numbers no truth."""
    return Baseline(
        classes=list(CLASSES),
        images=100,
        class_share={"good": 0.5, "defective": 0.5},
        label_share={"good": 0.5, "defective": 0.5},
        confidence_mean=0.9,
        test_accuracy=0.9,
        confidence_counts=[0] * 5 + [10, 40, 50, 0],
        brightness_counts=[0, 10, 30, 30, 20, 10, 0, 0, 0, 0, 0],
        contrast_counts=[0, 0, 10, 20, 40, 20, 10, 0, 0, 0],
    )


# --- evaluating the panels -------------------------------------------------------------------


def has_data(result: list[dict[str, Any]]) -> bool:
    """A finite value in an instant or range query's answer."""
    for item in result:
        samples = item.get("values") or [item.get("value")]
        if any(s is not None and math.isfinite(float(s[1])) for s in samples):
            return True
    return False


def empty_targets(prom: Any, board: dict[str, Any], start: float, end: float) -> list[str]:
    """The panels' queries of ``board`` that return no finite value, as Grafana would ask them."""
    step = max(1.0, (end - start) / 240)
    try:
        variables = render.resolve_variables(board, prom, start, end, {})
    except LookupError as error:
        return [f"{board['title']}: {error}"]
    values = {**render.builtins(start, end, SCRAPE_S, step), **variables}
    empty = []
    for panel in render.panels(board):
        for target in panel["targets"]:
            expr = render.interpolate(target["expr"], values)
            if target.get("instant"):
                result = prom.query(expr, end)
            else:
                result = prom.query_range(expr, start, end, step)
            if not has_data(result):
                empty.append(f"{board['title']} / {panel['title']} [{target['refId']}]: {expr}")
    return empty


def wait_for(check: Callable[[], list[str]], what: str, timeout: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout
    while True:
        missing = check()
        if not missing:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"after {timeout:.0f} s, {what}:\n  " + "\n  ".join(missing))
        time.sleep(0.5)


def not_scraped_since(prom: Any, moment: float) -> list[str]:
    """The jobs with a target whose last successful scrape began before ``moment`` (read from
    the raw samples of ``up``: ``timestamp()`` of an expression is the evaluation time)."""
    late = []
    for job in ("model-server", "pushgateway"):
        targets = prom.query(f'up{{job="{job}"}}[30s]', time.time())
        last = [item["values"][-1] for item in targets]
        if not last or any(float(t) <= moment or v != "1" for t, v in last):
            late.append(job)
    return late


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("grafana")
    model = save_model_folder(root / "model", baseline=made_up_baseline())
    with monitoring_stack(root, model) as running:
        push_pipeline(
            running,
            "tire_training_pipeline",
            succeeded=False,
            at=time.time() - 3600,
            versions_failed=1,
        )
        prom = render.Prometheus(running.prometheus)
        wait_for(lambda: not_scraped_since(prom, 0), "Prometheus' first scrapes")
        # Two rounds with a scrape between: a labelled series (a class, a version) appears in
        # the first and grows in the second, so rates and ratios have an increase to show.
        for seed in (0, 1):
            sent = time.time()
            send_traffic(running, seed=seed)
            wait_for(lambda: not_scraped_since(prom, sent), "a scrape after the traffic")  # noqa: B023
        push_pipeline(
            running,
            "tire_training_pipeline",
            succeeded=True,
            versions_processed=3,
            versions_failed=1,
            training_seconds={"cnn": 42.0, "resnet18": 180.0},
            promoted_version=2,
            promoted_metrics=promoted(0.93),
        )
        push_pipeline(running, "tire_data_sensor", succeeded=True)
        yield running


def test_every_panel_of_every_dashboard_returns_data(stack: Stack) -> None:
    prom = render.Prometheus(stack.prometheus)
    boards = render.load()
    assert set(boards) == {"tire-serving", "tire-model-quality", "tire-pipeline"}

    def missing() -> list[str]:
        end = time.time()
        return [m for b in boards.values() for m in empty_targets(prom, b, stack.started, end)]

    wait_for(missing, "these panels' queries returned no data")
    # The check can fail: a misspelt metric, or a variable the data does not have.
    end = time.time()
    misspelt = {
        "title": "t",
        "panels": [{"title": "p", "targets": [{"refId": "A", "expr": "tire_prediction_total"}]}],
    }
    assert len(empty_targets(prom, misspelt, stack.started, end)) == 1
    unknown = {**misspelt, "templating": {"list": [{"name": "v", "query": "label_values(x, y)"}]}}
    assert "returns no values" in empty_targets(prom, unknown, stack.started, end)[0]
    variables = render.resolve_variables(boards["tire-serving"], prom, stack.started, end, {})
    assert variables == {"job": "model-server", "instance": ".*"}


# --- the README's pictures -------------------------------------------------------------------

PREVIEWS = os.environ.get("TIRE_GRAFANA_PREVIEWS")
PREVIEW_MINUTES = float(os.environ.get("TIRE_GRAFANA_PREVIEW_MINUTES", "8"))


Tire = tuple[np.ndarray, str]  # HWC pixels in [0, 1], true label


def trained_model(root: Path) -> tuple[Path, list[Tire]]:
    """A ``cnn`` trained for a minute on synthetic tires (64 px), with its real baseline, and
    held-out tires for the traffic."""
    import torch

    from tirelib.models import get_model, get_spec
    from tirelib.synth import DEFECT_KINDS, draw_tire

    size = 64
    spec = get_spec("cnn")

    def tires(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        images, labels = [], []
        for index in range(count):
            defect = DEFECT_KINDS[index % len(DEFECT_KINDS)] if index % 2 else None
            image = draw_tire(np.random.default_rng((seed, index)), size, defect)
            images.append(np.asarray(image, dtype=np.float32) / 255)
            labels.append(1 if defect else 0)
        return np.stack(images), np.asarray(labels)

    train_x, train_y = tires(800, 1)
    test_x, test_y = tires(200, 2)
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)

    def tensor(x: np.ndarray) -> torch.Tensor:
        return (torch.from_numpy(x).permute(0, 3, 1, 2) - mean) / std

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    network = get_model("cnn", num_classes=len(CLASSES))
    optimizer = torch.optim.AdamW(network.parameters(), lr=3e-3)
    for _ in range(6):
        network.train()
        order = rng.permutation(len(train_x))
        for batch in np.array_split(order, len(order) // 32):
            loss = torch.nn.functional.cross_entropy(
                network(tensor(train_x[batch])), torch.from_numpy(train_y[batch])
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    network.eval()
    with torch.no_grad():
        probabilities = torch.softmax(network(tensor(test_x)), dim=1).numpy()
    brightness, contrast = image_statistics(test_x)
    baseline = compute_baseline(CLASSES, test_y, probabilities, brightness, contrast)
    folder = save_model_folder(root / "model", image_size=size, baseline=baseline, network=network)
    return folder, [(x, CLASSES[y]) for x, y in zip(test_x, test_y.tolist(), strict=True)]


@pytest.mark.skipif(not PREVIEWS, reason="TIRE_GRAFANA_PREVIEWS names no folder for pictures")
@pytest.mark.timeout(PREVIEW_MINUTES * 60 + 900)  # training and the stack's start on top
def test_previews(tmp_path: Path) -> None:
    assert PREVIEWS is not None
    minutes = PREVIEW_MINUTES
    model, tires = trained_model(tmp_path)
    with monitoring_stack(tmp_path, model, replicas=2) as running:
        scenario(running, tires, seconds=minutes * 60)
        prom = render.Prometheus(running.prometheus)
        end = time.time()
        for name, board in render.load().items():
            render.render_dashboard(
                board,
                prom,
                Path(PREVIEWS) / f"{name}.png",
                start=running.started,
                end=end,
                scrape_interval=SCRAPE_S,
            )
    for name in ("tire-serving", "tire-model-quality", "tire-pipeline"):
        assert (Path(PREVIEWS) / f"{name}.png").stat().st_size > 10_000


def scenario(stack: Stack, tires: list[Tire], *, seconds: float) -> None:
    """Steady traffic with feedback; a burst; then darker images (a lighting fault). The
    pipeline succeeds, fails once and recovers, and promotes a second model."""
    start = time.monotonic()
    stop = threading.Event()
    sent = {"pushes": 0}

    def phase() -> float:
        return (time.monotonic() - start) / seconds

    def client_loop(worker: int) -> None:
        rng = np.random.default_rng(worker)
        with httpx.Client(timeout=60) as client:
            while not stop.is_set():
                now = phase()
                burst = 0.4 <= now < 0.6
                if worker >= 2 and not burst:
                    time.sleep(0.2)
                    continue
                dark = 0.4 if now >= 0.7 else 1.0
                count = 1 + int(rng.integers(4))
                picked = [tires[int(i)] for i in rng.integers(0, len(tires), count)]
                url = stack.servers[worker % len(stack.servers)]
                answer = predict(client, url, [encode(x * dark) for x, _ in picked])
                if rng.random() < 0.7:
                    feedback(client, url, answer.request_id, [label for _, label in picked])
                if burst and rng.random() < 0.05:
                    client.post(f"{url}/v1/models/tire:predict", json={"instances": [[1, 2]]})
                time.sleep(0.05 if burst else 0.25)

    first = {
        "promoted_version": 1,
        "promoted_metrics": promoted(0.88),
        "training_seconds": {"cnn": 61.0},
        "versions_processed": 1,
        "versions_failed": 0,
    }
    second = {
        "promoted_version": 2,
        "promoted_metrics": promoted(0.93),
        "training_seconds": {"cnn": 58.0, "resnet18": 212.0},
        "versions_processed": 2,
        "versions_failed": 1,
    }
    events: list[tuple[float, str, bool, dict[str, Any]]] = [
        (0.0, "tire_training_pipeline", True, first),
        (0.25, "tire_training_pipeline", False, {"versions_failed": 1}),
        (0.5, "tire_training_pipeline", True, second),
        (0.8, "tire_data_sensor", False, {}),
    ]
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(client_loop, worker) for worker in range(8)]
        try:
            while phase() < 1 and not any(f.done() for f in futures):
                while events and events[0][0] <= phase():
                    _, dag_id, succeeded, values = events.pop(0)
                    push_pipeline(stack, dag_id, succeeded=succeeded, **values)
                if int(phase() * 20) > sent["pushes"]:  # the sensor succeeds now and then
                    sent["pushes"] = int(phase() * 20)
                    if phase() < 0.8 or phase() > 0.9:
                        push_pipeline(stack, "tire_data_sensor", succeeded=True)
                time.sleep(0.5)
        finally:
            stop.set()
        for future in futures:
            future.result()

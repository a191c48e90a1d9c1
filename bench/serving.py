"""Serving: ``tirelib serve`` against ``mlflow models serve`` and the bare forward pass.

One model (resnet18 at 224 px, random weights) is logged with ``tirelib.tracking.log_model`` and
registered in a private local stack (SeaweedFS + MLflow on free loopback ports), then driven by
the same client with the same images, one image per request, at concurrency 1 and 8:

(a) ``tirelib serve`` (TF Serving REST API, dynamic batching), following ``@production``;
(b) ``mlflow models serve --env-manager local`` of the same registered version;
(c) the bare in-process forward pass, the limit: the server's own prepared network in a process
    of its own (as each server has), with as many torch threads as the server, fed the same
    images, ``concurrency`` images per forward pass (the batches a server at that concurrency
    can form at best), each image prepared (decoded or taken as floats, resized, normalised)
    then the batch's forward pass, with no HTTP, JSON or queueing at all.

Two request forms. *b64*: a JPEG, ``{"instances": [{"b64": ...}]}`` for tirelib and the
equivalent ``{"dataframe_split": {"columns": ["image"], "data": [[<base64>]]}}`` for MLflow (its
scoring server has no ``b64`` objects; the logged model's signature is a binary ``image``
column). *float*: the same image as HWC floats in [0, 1] written with 4 decimals (``0.2941``,
enough for 8-bit pixels: 1.3 MB per image; ``--full-digits`` writes every digit of each float64,
as ``json.dumps((image / 255.0).tolist())`` does: 3.1 MB), ``{"instances": [<HWC>]}``, the very
same body for both servers: the logged model takes encoded bytes only, so MLflow serves a second
pyfunc variant of the same weights and preprocessing whose signature is a float32 tensor
``[-1, -1, -1, 3]`` (MLflow reads TF Serving's ``instances`` for tensor signatures).

The client runs in a process of its own, so it shares no interpreter with anything measured:
every body is encoded before the clock starts, and each of ``concurrency`` threads posts its
share over one keep-alive ``http.client`` connection (the lightest client in the standard
library; the answers are read after the clock stops). The client's CPU time is printed: on a
small machine it shares the CPUs with the server it drives.

Run:  .venv/bin/python bench/serving.py [--requests 32] [--c1-requests 8] [--rounds 3]
Prints requests/s, p50 and p99 per server, form and concurrency, then the ratios. Targets:
tirelib at least 3x ``mlflow models serve`` on the same requests, float requests at least 0.6 of
the bare forward pass, b64 requests at concurrency 8 at least 0.9 of it. Every server is up for
the whole run but only one is driven at a time (the others idle), in rounds of shuffled order;
requests/s is the median over the rounds, so load from elsewhere on the machine falls on all of
them alike. ``--no-mlflow`` measures tirelib and the bare forward pass only (a quicker run).

The harness is importable (``bench/serving_backends.py`` and ``bench/serving_cifar.py`` use it):
:func:`local_stack` (the private SeaweedFS + MLflow), :func:`server` (a server process, ready),
:func:`make_requests` and :class:`Requests` (images and encoded bodies), :func:`client_process`
(the client in a process of its own: :meth:`Client.drive`), :func:`drive` (the same client in
this process), :func:`bare_process` (the bare forward pass), :class:`Result` and :func:`report`.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import logging
import multiprocessing
import os
import random
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema, TensorSpec
from PIL import Image

from tirelib import tracking
from tirelib.models import get_model, get_spec
from tirelib.preprocessing import Preprocessing
from tirelib.pyfunc import TireClassifier, write_model_files
from tirelib.serve.model import ServedModel
from tirelib.settings import Settings, load_settings
from tirelib.stack import (
    HttpCheck,
    ManagedProcess,
    Stack,
    free_port,
    mlflow_component,
    s3_url,
    seaweedfs_component,
)
from tirelib.synth import generate

TARGETS = ("tirelib", "mlflow", "bare")
FORMS = ("b64", "float")
MODEL_TYPE = "resnet18"
FORMS_NOTE = """\
b64:   tirelib gets {"instances": [{"b64": <JPEG>}]}; MLflow gets the same JPEG as
       {"dataframe_split": {"columns": ["image"], "data": [[<base64>]]}}: its scoring server has
       no b64 objects, and the logged model's input is a binary `image` column.
float: both get the very same body {"instances": [<HWC floats in [0, 1]>]}; MLflow serves a
       pyfunc variant with the same weights and preprocessing and a float32 [-1,-1,-1,3] tensor
       signature, because the logged model takes encoded images only."""
CLASSES = ["good", "defective"]
NAME = "bench-tire"
HOST = "127.0.0.1"
JSON_HEADERS = {"Content-Type": "application/json"}
TARGET_MLFLOW = 3.0
"""tirelib serve's requests/s at least this many times mlflow models serve's."""
TARGET_BARE = {"float": 0.6, "b64": 0.9}
"""tirelib serve's requests/s at least this share of the bare forward pass's (b64: at c=8)."""


class FloatTireClassifier(TireClassifier):
    """The same network and preprocessing, taking HWC float images (a float32 tensor)."""

    def predict(
        self, context: Any, model_input: Any, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        images = np.asarray(model_input, dtype=np.float32)
        tensors = [self.prep.from_array(image) for image in images]
        probabilities = self.predict_proba(self.prep.batch(tensors))
        frame = pd.DataFrame(probabilities, columns=self.classes)
        frame["label"] = [self.classes[i] for i in probabilities.argmax(axis=1)]
        return frame


# --------------------------------------------------------------------------- the stack and model


@contextmanager
def local_stack(home: Path) -> Iterator[Settings]:
    """SeaweedFS and MLflow of the local stack on free loopback ports, stopped at the end."""
    s3_port, mlflow_port = free_port(), free_port()
    settings = load_settings(
        home=home,
        s3_port=s3_port,
        s3_endpoint_url=f"http://{HOST}:{s3_port}",
        mlflow_port=mlflow_port,
        mlflow_tracking_uri=f"http://{HOST}:{mlflow_port}",
        experiment="bench-serving",
        model_name=NAME,
    )
    stack = Stack(
        settings,
        [
            seaweedfs_component(settings),
            mlflow_component(settings, s3_endpoint_url=s3_url(settings)),
        ],
    )
    try:
        stack.up()
        yield settings
    finally:
        stack.down()  # also what started before a failure


def register_models(settings: Settings, folder: Path) -> tuple[str, str]:
    """Log and register the model; log the float variant. Return both URIs to serve."""
    tracking.configure(settings)
    torch.manual_seed(0)
    network = get_model(MODEL_TYPE, num_classes=len(CLASSES)).eval()
    spec = get_spec(MODEL_TYPE)
    prep = Preprocessing(spec.image_size, spec.mean, spec.std)
    with mlflow.start_run(run_name="bench-serving"):
        uri = tracking.log_model(network, model_type=MODEL_TYPE, classes=CLASSES, prep=prep)
        artifacts = write_model_files(
            folder, network, model_type=MODEL_TYPE, classes=CLASSES, prep=prep
        )
        floats = Schema([TensorSpec(np.dtype(np.float32), (-1, -1, -1, 3))])
        outputs = Schema([*(ColSpec("double", c) for c in CLASSES), ColSpec("string", "label")])
        with warnings.catch_warnings():  # no input example, no list[...] type hint: both fine
            warnings.simplefilter("ignore", UserWarning)
            variant = mlflow.pyfunc.log_model(
                name="float-variant",
                python_model=FloatTireClassifier(),
                artifacts=artifacts,
                signature=ModelSignature(inputs=floats, outputs=outputs),
                pip_requirements=[],
            )
    version = mlflow.register_model(uri, NAME).version
    mlflow.MlflowClient().set_registered_model_alias(NAME, "production", version)
    return f"models:/{NAME}/{version}", f"models:/{variant.model_id}"


# --------------------------------------------------------------------------- requests


@dataclass
class Requests:
    """The same images as JPEGs and as HWC floats in [0, 1] (nested lists, as a client has
    them), and the JSON text of each float image (written once: it is what every float body
    holds)."""

    jpegs: list[bytes]
    floats: list[list[Any]]
    float_texts: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.float_texts:
            self.float_texts = [json.dumps(image) for image in self.floats]

    def arrays(self) -> list[np.ndarray]:
        """The float images as float32 ``[H, W, 3]`` arrays (what the bare forward pass gets)."""
        return [np.asarray(image, dtype=np.float32) for image in self.floats]

    def bodies(self, form: str, target: str) -> list[bytes]:
        """One image per body: ``form`` (b64, float) as ``target`` (tirelib, mlflow) takes it."""
        if form == "float":
            return [f'{{"instances": [{text}]}}'.encode() for text in self.float_texts]
        encoded = [base64.b64encode(j).decode() for j in self.jpegs]
        if target == "mlflow":
            return [
                json.dumps({"dataframe_split": {"columns": ["image"], "data": [[e]]}}).encode()
                for e in encoded
            ]
        return [json.dumps({"instances": [{"b64": e}]}).encode() for e in encoded]


def make_requests(folder: Path, count: int, size: int, *, full_digits: bool = False) -> Requests:
    """``count`` synthetic tires of ``size`` px as JPEGs (quality 90) and as the floats of the
    decoded JPEG: 4 decimals, or every digit of each float64 with ``full_digits``."""
    generate(folder, count, seed=3, size=size)
    jpegs, floats = [], []
    for path in sorted(folder.rglob("*.png"))[:count]:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
        buffer = io.BytesIO()
        rgb.save(buffer, format="JPEG", quality=90)
        jpegs.append(buffer.getvalue())
        with Image.open(io.BytesIO(buffer.getvalue())) as decoded:
            pixels = np.asarray(decoded.convert("RGB"), dtype=np.float64) / 255.0
        floats.append((pixels if full_digits else np.round(pixels, 4)).tolist())
    return Requests(jpegs, floats)


# --------------------------------------------------------------------------- measuring


@dataclass
class Result:
    target: str
    form: str
    concurrency: int
    count: int
    seconds: float
    latencies: list[float]
    answers: list[Any]
    client_cpu_s: float = 0.0  # the client process's CPU time while it drove (0: not measured)
    cpu_s: float = 0.0  # the measured process's CPU time (the server's, or the bare pass's)
    batches: float = 0.0  # forward passes it ran (0: not known)

    @property
    def throughput(self) -> float:
        return self.count / self.seconds

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) * 1000


def post_all(
    url: str, bodies: Sequence[bytes], concurrency: int, headers: Mapping[str, str] = JSON_HEADERS
) -> Result:
    """POST every body, ``concurrency`` at a time: one thread and one keep-alive
    ``http.client`` connection per share. The answers are parsed after the clock stops; a
    failed request ends the run (SystemExit)."""
    parts = urlsplit(url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    latencies: list[float] = [0.0] * len(bodies)
    raw: list[tuple[int, bytes]] = [(0, b"")] * len(bodies)

    def worker(indices: list[int]) -> None:
        connection = http.client.HTTPConnection(parts.hostname or HOST, parts.port, timeout=600)
        try:
            for i in indices:
                began = time.perf_counter()
                connection.request("POST", path, body=bodies[i], headers=dict(headers))
                response = connection.getresponse()
                content = response.read()
                latencies[i] = time.perf_counter() - began
                raw[i] = (response.status, content)
        finally:
            connection.close()

    shares = [list(range(k, len(bodies), concurrency)) for k in range(concurrency)]
    threads = [threading.Thread(target=worker, args=(share,)) for share in shares if share]
    cpu = time.process_time()
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - began
    cpu = time.process_time() - cpu
    failures = [f"{status}: {content[:300]!r}" for status, content in raw if status != 200]
    if failures:
        raise SystemExit(f"{url}: {len(failures)} failed requests, e.g. {failures[0]}")
    answers = [json.loads(content) for _, content in raw]
    return Result("", "", concurrency, len(bodies), seconds, latencies, answers, cpu)


def drive(url: str, bodies: Sequence[bytes], concurrency: int) -> Result:
    """:func:`post_all` in this process (a warm-up, a probe); measure with :class:`Client`."""
    return post_all(url, bodies, concurrency)


def client_worker(connection: Connection, bodies: Mapping[str, Sequence[bytes]]) -> None:
    """The client's process: answers each ``(url, key, concurrency, count)`` with the
    :class:`Result` of posting the first ``count`` bodies of ``key``."""
    connection.send("ready")
    while (job := connection.recv()) is not None:
        url, key, concurrency, count = job
        connection.send(post_all(url, bodies[key][:count], concurrency))


class Client:
    """The client in a process of its own (:func:`client_process`), holding its bodies."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection

    def drive(self, url: str, key: str, concurrency: int, count: int) -> Result:
        """POST the first ``count`` bodies of ``key`` to ``url``, ``concurrency`` at a time."""
        self._connection.send((url, key, concurrency, count))
        result: Result = self._connection.recv()
        return result


@contextmanager
def client_process(bodies: Mapping[str, Sequence[bytes]]) -> Iterator[Client]:
    """A :class:`Client` in a process of its own, the bodies (by key) handed over once."""
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    process = context.Process(target=client_worker, args=(theirs, dict(bodies)), name="client")
    process.start()
    theirs.close()  # so that a child that dies is an EOFError here, not a wait forever
    try:
        if ours.recv() != "ready":
            raise SystemExit("the client process did not start")
        yield Client(ours)
    finally:
        ours.send(None)
        process.join(30)


def bare(
    model: ServedModel,
    requests: Requests,
    form: str,
    concurrency: int,
    count: int,
    inference: ThreadPoolExecutor,
) -> Result:
    """Prepare and predict in process: ``concurrency`` images per forward pass.

    Each batch's images are prepared in the calling thread (a JPEG decoded, a float array
    taken as it is; resized and normalised) and its forward pass runs in ``inference``'s
    thread, as the server runs it (OpenMP then sees two threads that use it and stops
    spinning between parallel regions, which matters when other processes share the CPUs).
    """
    items = list(range(count))
    prep = model.prep
    arrays = requests.arrays()[:count]

    def tensor(i: int) -> torch.Tensor:
        return prep.from_array(arrays[i]) if form == "float" else prep.from_bytes(requests.jpegs[i])

    for i in items[:2]:
        inference.submit(model.predict_proba, prep.batch([tensor(i)])).result()
    latencies, answers = [], []
    cpu = time.process_time()
    began = time.perf_counter()
    for start in range(0, count, concurrency):
        group = items[start : start + concurrency]
        t0 = time.perf_counter()
        images = prep.batch([tensor(i) for i in group])
        probabilities = inference.submit(model.predict_proba, images).result()
        took = time.perf_counter() - t0
        latencies += [took] * len(group)
        answers += probabilities.tolist()
    seconds = time.perf_counter() - began
    result = Result("bare", form, concurrency, count, seconds, latencies, answers)
    result.cpu_s = time.process_time() - cpu
    result.batches = len(range(0, count, concurrency))
    return result


def bare_worker(
    connection: Connection, uri: str, tracking_uri: str, requests: Requests, threads: int
) -> None:
    """A process of its own for the bare forward pass, like each server has, so it shares
    nothing with the client's threads and heap. Answers ``(form, concurrency, count)``."""
    torch.set_num_threads(threads)
    mlflow.set_tracking_uri(tracking_uri)
    loaded = mlflow.pyfunc.load_model(uri).unwrap_python_model()
    model = ServedModel.build(loaded, version="1", uri=uri)  # exactly as the server prepares it
    connection.send("ready")
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference") as inference:
        while (job := connection.recv()) is not None:
            form, concurrency, count = job
            connection.send(bare(model, requests, form, concurrency, count, inference))


@contextmanager
def bare_process(
    uri: str, tracking_uri: str, requests: Requests, threads: int | None = None
) -> Iterator[Connection]:
    """The bare forward pass in a process of its own with ``threads`` torch threads (default:
    every CPU, as the server): send ``(form, concurrency, count)``, receive a :class:`Result`."""
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    process = context.Process(
        target=bare_worker,
        args=(theirs, uri, tracking_uri, requests, threads or os.cpu_count() or 1),
        name="bare",
    )
    process.start()
    theirs.close()  # so that a child that dies is an EOFError here, not a wait forever
    try:
        if ours.recv() != "ready":
            raise SystemExit("the bare forward pass worker did not start")
        yield ours
    finally:
        ours.send(None)
        process.join(30)


@contextmanager
def server(
    name: str, argv: list[str], ready: str, env: dict[str, str], state: Path
) -> Iterator[ManagedProcess]:
    """A server process (``argv``), ready when ``ready`` answers 200; stopped at the end."""
    process = ManagedProcess(
        name, argv, state_dir=state, ready=HttpCheck(ready), env=env, url=ready
    )
    process.start()
    try:
        process.wait_ready(300)
        yield process
    finally:
        process.stop(timeout=30)


def process_cpu_s(pid: int | None) -> float:
    """CPU time (user + system) of process ``pid`` and its waited-for children so far,
    seconds; 0 where /proc does not tell."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def forward_passes(metrics_url: str) -> float:
    """The server's ``tire_inference_batch_size_count``: forward passes so far (0: unknown)."""
    try:
        with urllib.request.urlopen(metrics_url, timeout=30) as response:
            text = response.read().decode()
    except OSError:
        return 0.0
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("tire_inference_batch_size_count")
    )


@dataclass
class Probe:
    """What a server process spends on a run: its CPU time and forward passes."""

    pid: int | None
    metrics_url: str | None = None

    def measure(self, run: Callable[..., Result], *args: Any) -> Result:
        """``run(*args)``, with the server's CPU time and forward passes it took."""
        cpu, passes = process_cpu_s(self.pid), self._passes()
        result = run(*args)
        result.cpu_s = process_cpu_s(self.pid) - cpu
        result.batches = self._passes() - passes
        return result

    def _passes(self) -> float:
        return forward_passes(self.metrics_url) if self.metrics_url else 0.0


def probabilities(result: Result) -> np.ndarray:
    """One row per request, whatever the server's answer shape."""
    rows = []
    for answer in result.answers:
        if isinstance(answer, dict) and "predictions" in answer:
            first = answer["predictions"][0]
            rows.append([first[c] for c in CLASSES] if isinstance(first, dict) else first)
        else:
            rows.append(answer)
    return np.asarray(rows, dtype=np.float64)


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f} (1, 5, 15 min; {os.cpu_count()} CPUs)"


def processor() -> str:
    """The CPU's model and the vector instructions it offers (Linux; elsewhere ``unknown``).

    Forward passes depend on them more than on anything in tirelib: the same network can take
    three times as long on a CPU without AVX2 as on one with AVX-512, so absolute figures are
    only comparable on the same processor."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                  if line.startswith("model name")), "unknown")  # fmt: skip
    flags = next((set(line.split(":", 1)[1].split()) for line in info.splitlines()
                  if line.startswith("flags")), set())  # fmt: skip
    wanted = ("avx", "avx2", "fma", "avx512f", "avx512_vnni", "amx_tile")
    return f"{model}; " + (" ".join(f for f in wanted if f in flags) or "no AVX")


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=32, help="per round, at concurrency 8")
    parser.add_argument("--c1-requests", type=int, default=8, help="per round, at concurrency 1")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over every measurement")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument(
        "--full-digits",
        action="store_true",
        help="float bodies with every digit of each float64 (3.1 MB per image), not 4 decimals",
    )
    parser.add_argument(
        "--no-mlflow", action="store_true", help="measure tirelib and the bare forward pass only"
    )
    parser.add_argument(
        "--serve-arg",
        action="append",
        default=[],
        help="an option for tirelib serve (repeatable): --serve-arg=--max-wait-ms=5",
    )
    args = parser.parse_args()
    for name in ("requests", "c1_requests", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    logging.basicConfig(level=logging.WARNING)
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    plan = [(1, args.c1_requests), (8, args.requests)]
    targets = [t for t in TARGETS if not (args.no_mlflow and t == "mlflow")]
    results: dict[tuple[str, str, int], list[Result]] = {}
    print(f"load average at start: {load_average()}")
    print(f"processor: {processor()}")

    with tempfile.TemporaryDirectory(prefix="tire-bench-serving-") as tmp, ExitStack() as stack:
        root = Path(tmp)
        size = get_spec(MODEL_TYPE).image_size
        count = max(args.requests, args.c1_requests, args.warmup)
        requests = make_requests(root / "images", count, size, full_digits=args.full_digits)
        print(FORMS_NOTE)
        float_mb = statistics.mean(len(t) for t in requests.float_texts) / 1e6
        print(
            f"{MODEL_TYPE} at {size} px, random weights; {len(requests.jpegs)} JPEG tires "
            f"(~{statistics.mean(map(len, requests.jpegs)) / 1024:.0f} KiB each; float bodies "
            f"{float_mb:.1f} MB, {'every digit' if args.full_digits else '4 decimals'}); "
            f"one image per request; {threads} CPU threads; torch {torch.__version__}"
        )
        settings = stack.enter_context(local_stack(root / "home"))
        registered, variant = register_models(settings, root / "variant")
        # mlflow models serve execs `uvicorn` by name: the virtualenv's bin must be on PATH.
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        env = {**os.environ, "MLFLOW_TRACKING_URI": settings.mlflow_tracking_uri, "PATH": path}
        env.pop("TIRE_SERVE_MODEL_URI", None)
        state = root / "processes"

        # Every server is started first and driven in turn, round after round, so a burst of
        # load from elsewhere on the machine falls on all of them alike. An idle server waits.
        urls: dict[tuple[str, str], str] = {}
        port = free_port()
        argv = [sys.executable, "-m", "tirelib", "serve", "--port", str(port),
                "--model-uri", f"models:/{NAME}@production", *args.serve_arg]  # fmt: skip
        base = f"http://{HOST}:{port}"
        served = stack.enter_context(server("tirelib-serve", argv, f"{base}/readyz", env, state))
        probes = {"tirelib": Probe(served.pid, f"{base}/metrics")}
        for form in FORMS:
            urls[("tirelib", form)] = f"{base}/v1/models/tire:predict"
        if "mlflow" in targets:
            # mlflow models serve: the registered version (b64), the float variant (float).
            for form, uri in (("b64", registered), ("float", variant)):
                port = free_port()
                argv = [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri,
                        "--env-manager", "local", "-h", HOST, "-p", str(port)]  # fmt: skip
                base = f"http://{HOST}:{port}"
                stack.enter_context(
                    server(f"mlflow-serve-{form}", argv, f"{base}/ping", env, state)
                )
                urls[("mlflow", form)] = f"{base}/invocations"
        # The bare forward pass uses the model exactly as the server prepares it.
        worker = stack.enter_context(
            bare_process(registered, settings.mlflow_tracking_uri, requests, threads)
        )
        # Bodies by key: the float body is the same for both servers.
        keys = {(t, f): f if f == "float" else f"{f}-{t}" for t, f in urls}
        bodies = {keys[(t, f)]: requests.bodies(f, t) for t, f in urls}
        client = stack.enter_context(client_process(bodies))
        for which, url in urls.items():
            client.drive(url, keys[which], 1, args.warmup)
            client.drive(url, keys[which], 8, min(8, count))
        # Every round runs every measurement once, in a shuffled order, so that neither the
        # order nor a burst of load from elsewhere on the machine favours one of them.
        runs = [(t, f, c, n) for t in targets for f in FORMS for c, n in plan]
        order = random.Random(0)
        print(f"load average before the measurements: {load_average()}")
        for _ in range(args.rounds):
            order.shuffle(runs)
            for target, form, concurrency, count in runs:
                if target == "bare":
                    worker.send((form, concurrency, count))
                    result = worker.recv()
                else:
                    probe = probes.get(target, Probe(None))
                    url, key = urls[(target, form)], keys[(target, form)]
                    result = probe.measure(client.drive, url, key, concurrency, count)
                result.target, result.form = target, form
                results.setdefault((target, form, concurrency), []).append(result)
        print(f"load average after the measurements: {load_average()}")
    report(results)


def report(results: dict[tuple[str, str, int], list[Result]]) -> None:
    """Requests/s: the median over the rounds; latencies: every request of every round."""
    labels = {
        "tirelib": "tirelib serve",
        "mlflow": "mlflow models serve",
        "bare": "bare forward pass",
    }
    rate = {key: statistics.median(r.throughput for r in rounds) for key, rounds in results.items()}
    print(
        f"\n{'server':<22} {'form':<6} {'conc':>4} {'req/s':>8} {'p50 ms':>9} {'p99 ms':>9} "
        f"{'of bare':>8} {'CPU ms/img':>11} {'client':>7} {'img/pass':>9}"
    )
    for key, rounds in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        target, form, concurrency = key
        latencies = np.array([t for r in rounds for t in r.latencies]) * 1000
        cpu = statistics.median(1000 * r.cpu_s / r.count for r in rounds)
        client = statistics.median(1000 * r.client_cpu_s / r.count for r in rounds)
        passes = sum(r.batches for r in rounds)
        print(
            f"{labels[target]:<22} {form:<6} {concurrency:>4} {rate[key]:>8.2f} "
            f"{np.percentile(latencies, 50):>9.1f} {np.percentile(latencies, 99):>9.1f} "
            f"{rate[key] / rate[('bare', form, concurrency)]:>8.2f} "
            f"{f'{cpu:.1f}' if cpu else '':>11} {f'{client:.1f}' if client else '':>7} "
            f"{f'{sum(r.count for r in rounds) / passes:.1f}' if passes else '':>9}"
        )
    print(
        "\nof bare: requests/s over the bare forward pass's at the same concurrency; CPU ms/img: "
        "the server's (or the bare pass's) process CPU time per image, client: the client "
        "process's; img/pass: images per forward pass (from the server's metrics)\n"
    )
    for form in FORMS:
        for concurrency in (1, 8):
            ours = rate[("tirelib", form, concurrency)]
            versus_bare = ours / rate[("bare", form, concurrency)]
            same = float(
                np.abs(
                    probabilities(results[("tirelib", form, concurrency)][-1])
                    - probabilities(results[("bare", form, concurrency)][-1])
                ).max()
            )
            line = (
                f"{form:<5} c={concurrency}: tirelib = {versus_bare:4.2f} of the bare forward pass"
                f" (max |diff| {same:.1e})"
            )
            goal = TARGET_BARE[form]
            if form == "float" or concurrency == 8:
                line += f" ({'meets' if versus_bare >= goal else 'MISSES'} >= {goal})"
            if ("mlflow", form, concurrency) in rate:
                versus_mlflow = ours / rate[("mlflow", form, concurrency)]
                agree = float(
                    np.abs(
                        probabilities(results[("tirelib", form, concurrency)][-1])
                        - probabilities(results[("mlflow", form, concurrency)][-1])
                    ).max()
                )
                line += (
                    f", {versus_mlflow:5.2f}x mlflow models serve "
                    f"({'meets' if versus_mlflow >= TARGET_MLFLOW else 'MISSES'} "
                    f">= {TARGET_MLFLOW:g}x); same answers (max |diff| {agree:.1e})"
                )
            print(line)


if __name__ == "__main__":
    main()

"""Serving: ``tirelib serve`` against ``mlflow models serve`` and the bare forward pass.

One model (resnet18 at 224 px, random weights) is logged with ``tirelib.tracking.log_model`` and
registered in a private local stack (SeaweedFS + MLflow on free loopback ports), then driven by
the same client with the same images, one image per request, at concurrency 1 and 8:

(a) ``tirelib serve`` (TF Serving REST API, dynamic batching), following ``@production``;
(b) ``mlflow models serve --env-manager local`` of the same registered version;
(c) the bare in-process forward pass, the limit: the server's own prepared network in a process
    of its own (as each server has), fed the same images, ``concurrency`` images per forward
    pass, with no HTTP, JSON or queueing at all.

Two request forms. *b64*: a JPEG, ``{"instances": [{"b64": ...}]}`` for tirelib and the
equivalent ``{"dataframe_split": {"columns": ["image"], "data": [[<base64>]]}}`` for MLflow (its
scoring server has no ``b64`` objects; the logged model's signature is a binary ``image``
column). *float*: the same image as HWC floats in [0, 1], ``{"instances": [<HWC>]}``, the very
same body for both servers: the logged model takes encoded bytes only, so MLflow serves a second
pyfunc variant of the same weights and preprocessing whose signature is a float32 tensor
``[-1, -1, -1, 3]`` (MLflow reads TF Serving's ``instances`` for tensor signatures).

Run:  .venv/bin/python bench/serving.py [--requests 32] [--c1-requests 8] [--rounds 3]
Prints requests/s, p50 and p99 per server, form and concurrency, then the ratios. Targets:
tirelib at least 3x ``mlflow models serve`` on the same requests, and at least 0.8 of the bare
forward pass on b64 requests at concurrency 8. Every server is up for the whole run but only
one is driven at a time (the others idle), in rounds of shuffled order; requests/s is the median
over the rounds, so load from elsewhere on the machine falls on all of them alike. The client
shares the CPUs with the server it drives. On a small CPU the b64 form is bound by the forward
pass itself (the same network and numbers on both sides), so the ratio to MLflow there shows the
serving overhead and batching gain only; a GPU is where batching pays most.
"""

from __future__ import annotations

import argparse
import base64
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
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import httpx
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
    jpegs: list[bytes]
    floats: list[list[Any]]  # HWC in [0, 1], 4 decimals (what a JSON client sends)

    def bodies(self, form: str, target: str) -> list[bytes]:
        if form == "float":
            return [json.dumps({"instances": [image]}).encode() for image in self.floats]
        encoded = [base64.b64encode(j).decode() for j in self.jpegs]
        if target == "mlflow":
            return [
                json.dumps({"dataframe_split": {"columns": ["image"], "data": [[e]]}}).encode()
                for e in encoded
            ]
        return [json.dumps({"instances": [{"b64": e}]}).encode() for e in encoded]


def make_requests(folder: Path, count: int, size: int) -> Requests:
    generate(folder, count, seed=3, size=size)
    jpegs, floats = [], []
    for path in sorted(folder.rglob("*.png"))[:count]:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
        buffer = io.BytesIO()
        rgb.save(buffer, format="JPEG", quality=90)
        jpegs.append(buffer.getvalue())
        with Image.open(io.BytesIO(buffer.getvalue())) as decoded:
            pixels = np.asarray(decoded.convert("RGB"), dtype=np.float32) / 255.0
        floats.append(np.round(pixels, 4).tolist())
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

    @property
    def throughput(self) -> float:
        return self.count / self.seconds

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) * 1000


def drive(url: str, bodies: Sequence[bytes], concurrency: int) -> Result:
    """POST every body, ``concurrency`` at a time (one client per thread, keep-alive)."""
    latencies: list[float] = []
    answers: list[Any] = [None] * len(bodies)
    failures: list[str] = []
    lock = threading.Lock()

    def worker(indices: list[int]) -> None:
        with httpx.Client(timeout=600) as client:
            for i in indices:
                began = time.perf_counter()
                response = client.post(
                    url, content=bodies[i], headers={"Content-Type": "application/json"}
                )
                took = time.perf_counter() - began
                with lock:
                    if response.status_code != 200:
                        failures.append(f"{response.status_code}: {response.text[:300]}")
                    latencies.append(took)
                    answers[i] = response.json()

    shares = [list(range(k, len(bodies), concurrency)) for k in range(concurrency)]
    threads = [threading.Thread(target=worker, args=(share,)) for share in shares]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - began
    if failures:
        raise SystemExit(f"{url}: {len(failures)} failed requests, e.g. {failures[0]}")
    return Result("", "", concurrency, len(bodies), seconds, latencies, answers)


def bare(
    model: ServedModel,
    requests: Requests,
    form: str,
    concurrency: int,
    count: int,
    inference: ThreadPoolExecutor,
) -> Result:
    """Decode/prepare and predict in process: ``concurrency`` images per forward pass.

    The images are prepared in the calling thread and the forward pass runs in ``inference``'s
    thread, as the server runs them (OpenMP then sees two threads that use it and stops
    spinning between parallel regions, which matters when other processes share the CPUs).
    """
    items = list(range(count))
    prep = model.prep
    arrays = [np.asarray(image, dtype=np.float32) for image in requests.floats[:count]]

    def tensor(i: int) -> torch.Tensor:
        return prep.from_array(arrays[i]) if form == "float" else prep.from_bytes(requests.jpegs[i])

    for i in items[:2]:
        inference.submit(model.predict_proba, prep.batch([tensor(i)])).result()
    latencies, answers = [], []
    began = time.perf_counter()
    for start in range(0, count, concurrency):
        group = items[start : start + concurrency]
        t0 = time.perf_counter()
        images = prep.batch([tensor(i) for i in group])
        probabilities = inference.submit(model.predict_proba, images).result()
        took = time.perf_counter() - t0
        latencies += [took] * len(group)
        answers += probabilities.tolist()
    return Result("bare", form, concurrency, count, time.perf_counter() - began, latencies, answers)


def bare_worker(connection: Connection, uri: str, tracking_uri: str, requests: Requests) -> None:
    """A process of its own for the bare forward pass, like each server has, so it shares
    nothing with the client's threads and heap. Answers ``(form, concurrency, count)``."""
    torch.set_num_threads(os.cpu_count() or 1)
    mlflow.set_tracking_uri(tracking_uri)
    loaded = mlflow.pyfunc.load_model(uri).unwrap_python_model()
    model = ServedModel.build(loaded, version="1", uri=uri)  # exactly as the server prepares it
    connection.send("ready")
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference") as inference:
        while (job := connection.recv()) is not None:
            connection.send(bare(model, requests, *job, inference))


@contextmanager
def bare_process(uri: str, tracking_uri: str, requests: Requests) -> Iterator[Connection]:
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    process = context.Process(
        target=bare_worker, args=(theirs, uri, tracking_uri, requests), name="bare"
    )
    process.start()
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
) -> Iterator[None]:
    process = ManagedProcess(
        name, argv, state_dir=state, ready=HttpCheck(ready), env=env, url=ready
    )
    process.start()
    try:
        process.wait_ready(300)
        yield
    finally:
        process.stop(timeout=30)


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


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=32, help="per round, at concurrency 8")
    parser.add_argument("--c1-requests", type=int, default=8, help="per round, at concurrency 1")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over every measurement")
    parser.add_argument("--warmup", type=int, default=4)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    plan = [(1, args.c1_requests), (8, args.requests)]
    results: dict[tuple[str, str, int], list[Result]] = {}

    with tempfile.TemporaryDirectory(prefix="tire-bench-serving-") as tmp, ExitStack() as stack:
        root = Path(tmp)
        size = get_spec(MODEL_TYPE).image_size
        requests = make_requests(root / "images", max(args.requests, args.c1_requests), size)
        print(FORMS_NOTE)
        print(
            f"{MODEL_TYPE} at {size} px, random weights; {len(requests.jpegs)} JPEG tires "
            f"(~{statistics.mean(map(len, requests.jpegs)) / 1024:.0f} KiB each); "
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
                "--model-uri", f"models:/{NAME}@production"]  # fmt: skip
        base = f"http://{HOST}:{port}"
        stack.enter_context(server("tirelib-serve", argv, f"{base}/readyz", env, state))
        for form in ("b64", "float"):
            urls[("tirelib", form)] = f"{base}/v1/models/tire:predict"
        # mlflow models serve: the registered version (b64), the float variant (float).
        for form, uri in (("b64", registered), ("float", variant)):
            port = free_port()
            argv = [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri,
                    "--env-manager", "local", "-h", HOST, "-p", str(port)]  # fmt: skip
            base = f"http://{HOST}:{port}"
            stack.enter_context(server(f"mlflow-serve-{form}", argv, f"{base}/ping", env, state))
            urls[("mlflow", form)] = f"{base}/invocations"
        # The bare forward pass uses the model exactly as the server prepares it.
        worker = stack.enter_context(
            bare_process(registered, settings.mlflow_tracking_uri, requests)
        )

        bodies = {key: requests.bodies(key[1], key[0]) for key in urls}
        for key, url in urls.items():
            drive(url, bodies[key][: args.warmup], 1)
        # Every round runs every measurement once, in a shuffled order, so that neither the
        # order nor a burst of load from elsewhere on the machine favours one of them.
        runs = [(t, f, c, n) for t in TARGETS for f in FORMS for c, n in plan]
        order = random.Random(0)
        load_before = os.getloadavg()[0]
        for _ in range(args.rounds):
            order.shuffle(runs)
            for target, form, concurrency, count in runs:
                if target == "bare":
                    worker.send((form, concurrency, count))
                    result = worker.recv()
                else:
                    result = drive(
                        urls[(target, form)], bodies[(target, form)][:count], concurrency
                    )
                result.target, result.form = target, form
                results.setdefault((target, form, concurrency), []).append(result)
        load_after = os.getloadavg()[0]
    print(f"load average (1 min) before/after the measurements: {load_before:.1f}/{load_after:.1f}")
    report(results)


def report(results: dict[tuple[str, str, int], list[Result]]) -> None:
    """Requests/s: the median over the rounds; latencies: every request of every round."""
    labels = {
        "tirelib": "tirelib serve",
        "mlflow": "mlflow models serve",
        "bare": "bare forward pass",
    }
    rate = {key: statistics.median(r.throughput for r in rounds) for key, rounds in results.items()}
    print(f"\n{'server':<22} {'form':<6} {'conc':>4} {'req/s':>8} {'p50 ms':>9} {'p99 ms':>9}")
    for key, rounds in sorted(results.items()):
        target, form, concurrency = key
        latencies = np.array([t for r in rounds for t in r.latencies]) * 1000
        print(
            f"{labels[target]:<22} {form:<6} {concurrency:>4} {rate[key]:>8.2f} "
            f"{np.percentile(latencies, 50):>9.1f} {np.percentile(latencies, 99):>9.1f}"
        )
    print()
    for form in FORMS:
        for concurrency in (1, 8):
            ours = rate[("tirelib", form, concurrency)]
            versus_mlflow = ours / rate[("mlflow", form, concurrency)]
            versus_bare = ours / rate[("bare", form, concurrency)]
            agree = float(
                np.abs(
                    probabilities(results[("tirelib", form, concurrency)][-1])
                    - probabilities(results[("mlflow", form, concurrency)][-1])
                ).max()
            )
            line = (
                f"{form:<5} c={concurrency}: tirelib = {versus_mlflow:5.2f}x mlflow models serve "
                f"({'meets' if versus_mlflow >= 3 else 'MISSES'} >= 3x), "
                f"{versus_bare:4.2f} of the bare forward pass"
            )
            if form == "b64" and concurrency == 8:
                line += f" ({'meets' if versus_bare >= 0.8 else 'MISSES'} >= 0.8)"
            print(f"{line}; same answers (max |diff| {agree:.1e})")


if __name__ == "__main__":
    main()

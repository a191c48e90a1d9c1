"""Serving a CIFAR-sized workload: TF Serving's published figure against ``tirelib serve``.

The earlier system served a small CNN on 32 x 32 images with TensorFlow Serving at 0.45 ms per
image, in requests of 100 images. This benchmark sends the same workload to ``tirelib serve``:
a small CNN (tirelib's ``cnn``, random weights) logged for 32 px input as training logs a model
(with its ONNX export and a sample of test images, so the server chooses its backend as it does
for a trained model: ``--backend auto`` takes ONNX Runtime when its answers match PyTorch's) and
registered in a private local stack (SeaweedFS + MLflow on free loopback ports, shared with
``serving.py``), 10,000 synthetic tires of 32 x 32 pixels in requests of 100, one request at a
time (the server's ``--max-batch-size`` set to the request's 100 images, so that each request is
one forward pass, as in the bare pass), in these wire formats (every body is encoded before the
clock starts):

float     TF Serving's row form ``{"instances": [<HWC floats>, ...]}``, the pixels divided by
          255 and written in full (``json.dumps`` of ``(image / 255.0).tolist()``, as TF
          Serving's own REST tutorial does);
b64       ``{"instances": [{"b64": <PNG>}, ...]}``;
v2        the Open Inference Protocol's JSON tensor: one FP32 ``[100, 32, 32, 3]`` input with
          flat data, as ``tritonclient`` sends it with ``binary_data=False``;
v2-binary the protocol's binary tensor data extension (a JSON header followed by the raw
          little-endian bytes, ``Inference-Header-Content-Length``), as ``tritonclient`` sends
          it by default, the probabilities asked for as binary data too; left out, saying
          why, when the server refuses it.

Reported per form: milliseconds per image (the mean request latency / 100, and the median),
the ratio to the bare forward pass of the same batches (the server's own prepared network in a
process of its own, one forward pass per batch of 100 already-preprocessed images: 1.0 would
mean the server adds nothing), TF Serving's 0.45 ms per image beside it, and the errors over
every image (there must be none: the run fails otherwise). Each form's answers are checked
against the bare forward pass's probabilities of the same images.

Run:  .venv/bin/python bench/serving_cifar.py [--images 10000] [--batch 100] [--quick]
                                             [--backend auto|torch|onnxruntime]
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
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

import httpx
import mlflow
import numpy as np
import torch
from PIL import Image
from serving import HOST, local_stack, processor, server

from tirelib import tracking
from tirelib.models import get_model, get_spec
from tirelib.preprocessing import Preprocessing
from tirelib.runtime import BACKENDS, Backend, TestSample, sample_limit
from tirelib.serve.model import ServedModel
from tirelib.settings import Settings
from tirelib.stack import free_port
from tirelib.synth import DEFECT_KINDS, draw_tire

MODEL_TYPE = "cnn"
IMAGE_SIZE = 32
CLASSES = ["good", "defective"]
NAME = "bench-tire"
TF_SERVING_MS = 0.45
"""The earlier system's TensorFlow Serving: milliseconds per image, requests of 100 images."""


# --------------------------------------------------------------------------- the wire formats


@dataclass(frozen=True)
class Body:
    content: bytes
    headers: dict[str, str]


@dataclass(frozen=True)
class Form:
    """A wire format: how a batch of uint8 HWC images is sent and how the answer is read."""

    name: str
    path: str  # under the model's base URL
    encode: Callable[[np.ndarray], Body]
    probabilities: Callable[[httpx.Response, int], np.ndarray]
    optional: bool = False  # left out when the server refuses it (an extension it lacks)


JSON = {"Content-Type": "application/json"}


def _float_body(images: np.ndarray) -> Body:
    pixels = (images / 255.0).tolist()  # float64, every digit: what TF Serving's tutorial sends
    return Body(json.dumps({"instances": pixels}).encode(), JSON)


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _b64_body(images: np.ndarray) -> Body:
    instances = [{"b64": base64.b64encode(_png(image)).decode()} for image in images]
    return Body(json.dumps({"instances": instances}).encode(), JSON)


def _v2_tensor(images: np.ndarray) -> dict[str, object]:
    return {"name": "images", "datatype": "FP32", "shape": list(images.shape)}


def _v2_body(images: np.ndarray) -> Body:
    data = (images.astype(np.float32) / 255.0).ravel().tolist()  # flat, as tritonclient sends
    tensor = {**_v2_tensor(images), "data": data}
    return Body(json.dumps({"inputs": [tensor]}).encode(), JSON)


def _v2_binary_body(images: np.ndarray) -> Body:
    """The binary tensor data extension: a JSON header, then each tensor's raw bytes."""
    raw = (images.astype(np.float32) / 255.0).astype("<f4").tobytes()
    tensor = {**_v2_tensor(images), "parameters": {"binary_data_size": len(raw)}}
    output = {"name": "probabilities", "parameters": {"binary_data": True}}
    header = json.dumps({"inputs": [tensor], "outputs": [output]}).encode()
    headers = {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(header)),
    }
    return Body(header + raw, headers)


def _tfserving_answer(response: httpx.Response, count: int) -> np.ndarray:
    return np.asarray(response.json()["predictions"], dtype=np.float64)


def _v2_answer(response: httpx.Response, count: int) -> np.ndarray:
    """JSON outputs, or binary ones after the JSON header (the extension's response form)."""
    length = response.headers.get("Inference-Header-Content-Length")
    content = response.content
    header = json.loads(content[: int(length)] if length else content)
    (output,) = [o for o in header["outputs"] if o["name"] == "probabilities"]
    size = (output.get("parameters") or {}).get("binary_data_size")
    if size is not None:
        offset = int(length or 0)  # one binary output: its bytes follow the header
        values = np.frombuffer(content[offset : offset + size], dtype="<f4")
    else:
        values = np.asarray(output["data"], dtype=np.float64)
    return values.reshape(output["shape"]).astype(np.float64)


FORMS = (
    Form("float", ":predict", _float_body, _tfserving_answer),
    Form("b64", ":predict", _b64_body, _tfserving_answer),
    Form("v2", "/infer", _v2_body, _v2_answer),
    # Triton's default (tritonclient's binary_data=True), an extension of the protocol.
    Form("v2-binary", "/infer", _v2_binary_body, _v2_answer, optional=True),
)


# --------------------------------------------------------------------------- images and model


def make_images(count: int, seed: int = 3) -> np.ndarray:
    """``count`` synthetic tires (half defective), uint8 ``[count, 32, 32, 3]``."""
    return labelled_tires(count, IMAGE_SIZE, seed)[0]


def labelled_tires(count: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` synthetic tires (every other one defective), uint8 HWC, and their labels."""
    rng = np.random.default_rng(seed)
    images = np.empty((count, size, size, 3), dtype=np.uint8)
    labels = np.empty(count, dtype=np.int64)
    for i in range(count):
        defect = None if i % 2 == 0 else DEFECT_KINDS[(i // 2) % len(DEFECT_KINDS)]
        images[i] = np.asarray(draw_tire(rng, size, defect).convert("RGB"))
        labels[i] = CLASSES.index("good" if defect is None else "defective")
    return images, labels


def logged_sample(size: int) -> TestSample:
    """The test images a logged model carries (other tires than the measured ones)."""
    images, labels = labelled_tires(sample_limit(size), size, seed=11)
    return TestSample(np.ascontiguousarray(images.transpose(0, 3, 1, 2)), labels)


def register_model(settings: Settings) -> str:
    """Log the CNN for 32 px input as training does (ONNX export and test sample), register it
    and point ``production`` at it."""
    tracking.configure(settings)
    torch.manual_seed(0)
    network = get_model(MODEL_TYPE, num_classes=len(CLASSES)).eval()
    with torch.no_grad():  # random weights give ~0.5 everywhere: spread the probabilities, so
        network[-1].weight.mul_(100)  # that an answer for the wrong pixels shows in the check
    spec = get_spec(MODEL_TYPE)
    prep = Preprocessing(IMAGE_SIZE, spec.mean, spec.std)
    sample = logged_sample(IMAGE_SIZE)
    with mlflow.start_run(run_name="bench-serving-cifar"):
        uri = tracking.log_model(
            network, model_type=MODEL_TYPE, classes=CLASSES, prep=prep, sample=sample
        )
    version = mlflow.register_model(uri, NAME).version
    mlflow.MlflowClient().set_registered_model_alias(NAME, "production", version)
    return f"models:/{NAME}/{version}"


# --------------------------------------------------------------------------- measuring


@dataclass
class Run:
    """One pass over every batch: request latencies (s), answers and errors."""

    form: str
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    answers: list[np.ndarray] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def ms_per_image(self, batch: int) -> float:
        return 1000 * statistics.fmean(self.latencies) / batch

    def p50_ms_per_image(self, batch: int) -> float:
        return 1000 * statistics.median(self.latencies) / batch


def drive(url: str, form: Form, bodies: list[Body], sizes: list[int], concurrency: int) -> Run:
    """POST every body, ``concurrency`` at a time (one keep-alive client per thread)."""
    run = Run(form.name, answers=[np.empty(0)] * len(bodies))
    lock = threading.Lock()

    def worker(indices: list[int]) -> None:
        with httpx.Client(timeout=600) as client:
            for i in indices:
                began = time.perf_counter()
                response = client.post(url, content=bodies[i].content, headers=bodies[i].headers)
                took = time.perf_counter() - began
                try:
                    if response.status_code != 200:
                        raise ValueError(f"{response.status_code}: {response.text[:300]}")
                    answer = form.probabilities(response, sizes[i])
                    if answer.shape != (sizes[i], len(CLASSES)):
                        raise ValueError(f"answer of shape {answer.shape} for {sizes[i]} images")
                except (ValueError, KeyError, TypeError) as error:
                    with lock:
                        run.errors.append(f"request {i}: {error}")
                    continue
                with lock:
                    run.latencies.append(took)
                    run.answers[i] = answer

    shares = [list(range(k, len(bodies), concurrency)) for k in range(concurrency)]
    threads = [threading.Thread(target=worker, args=(share,)) for share in shares]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    run.seconds = time.perf_counter() - began
    return run


def bare_worker(
    connection: Connection,
    uri: str,
    tracking_uri: str,
    images: np.ndarray,
    batch: int,
    backend: Backend,
) -> None:
    """The server's prepared network in a process of its own; answers each job with
    ``(seconds per batch, probabilities)``. The batches are preprocessed before the clock
    starts; the forward pass runs in an inference thread, as the server runs it."""
    torch.set_num_threads(os.cpu_count() or 1)
    mlflow.set_tracking_uri(tracking_uri)
    loaded = mlflow.pyfunc.load_model(uri).unwrap_python_model()
    # exactly as the server prepares it: the same backend choice and network rewrite
    model = ServedModel.build(loaded, version="1", uri=uri, backend=backend)
    prep = model.prep
    pixels = images.astype(np.float32) / 255.0
    batches = [
        prep.batch([prep.from_array(image) for image in pixels[start : start + batch]])
        for start in range(0, len(pixels), batch)
    ]
    connection.send(("ready", model.backend, model.backend_reason))
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference") as inference:
        for tensor in batches[:3]:
            inference.submit(model.predict_proba, tensor).result()
        while connection.recv() is not None:
            seconds, answers = [], []
            for tensor in batches:
                began = time.perf_counter()
                answers.append(inference.submit(model.predict_proba, tensor).result())
                seconds.append(time.perf_counter() - began)
            connection.send((seconds, answers))


@contextmanager
def bare_process(
    uri: str, tracking_uri: str, images: np.ndarray, batch: int, backend: Backend
) -> Iterator[Connection]:
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    process = context.Process(
        target=bare_worker, args=(theirs, uri, tracking_uri, images, batch, backend), name="bare"
    )
    process.start()
    try:
        started = ours.recv()
        if not (isinstance(started, tuple) and started[0] == "ready"):
            raise SystemExit("the bare forward pass worker did not start")
        print(f"backend: {started[1]} ({started[2]})")
        yield ours
    finally:
        ours.send(None)
        process.join(30)


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=10_000, help="images per form")
    parser.add_argument("--batch", type=int, default=100, help="images per request")
    parser.add_argument("--concurrency", type=int, default=1, help="requests in flight")
    parser.add_argument("--rounds", type=int, default=1, help="passes over every form")
    parser.add_argument("--quick", action="store_true", help="300 images: a smoke test")
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="what runs the network, in the server and in the bare forward pass alike",
    )
    parser.add_argument(
        "--serve-arg",
        action="append",
        default=[],
        help="an option for tirelib serve (repeatable, after the bench's own): "
        "--serve-arg=--max-wait-ms=0",
    )
    args = parser.parse_args()
    if args.quick:
        args.images = min(args.images, 3 * args.batch)
    logging.basicConfig(level=logging.WARNING)
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    load_start = os.getloadavg()
    print(
        f"load average at start: {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f} "
        f"({threads} CPUs)"
    )
    print(f"processor: {processor()}")

    images = make_images(args.images)
    sizes = [len(images[s : s + args.batch]) for s in range(0, len(images), args.batch)]
    with tempfile.TemporaryDirectory(prefix="tire-bench-cifar-") as tmp, ExitStack() as stack:
        root = Path(tmp)
        settings = stack.enter_context(local_stack(root / "home"))
        registered = register_model(settings)
        env = {**os.environ, "MLFLOW_TRACKING_URI": settings.mlflow_tracking_uri}
        env.pop("TIRE_SERVE_MODEL_URI", None)
        port = free_port()
        argv = [sys.executable, "-m", "tirelib", "serve", "--port", str(port),
                "--model-uri", f"models:/{NAME}@production", "--backend", args.backend,
                # a request of 100 is one forward pass, as in the bare pass (the default, 32,
                # would split it in four)
                "--max-batch-size", str(args.batch), *args.serve_arg]  # fmt: skip
        base = f"http://{HOST}:{port}"
        stack.enter_context(server("tirelib-serve", argv, f"{base}/readyz", env, root / "state"))
        worker = stack.enter_context(
            bare_process(registered, settings.mlflow_tracking_uri, images, args.batch, args.backend)
        )
        urls = {f.name: f"{base}/{'v1' if f.path == ':predict' else 'v2'}/models/tire{f.path}"
                for f in FORMS}  # fmt: skip
        forms = []
        for form in FORMS:  # does the server take it?
            probe = drive(urls[form.name], form, [form.encode(images[:10])], [10], 1)
            if not probe.errors:
                forms.append(form)
            elif form.optional:
                print(f"{form.name:<9} not measured: the server refuses it ({probe.errors[0]})")
            else:
                raise SystemExit(f"{form.name}: the first request failed: {probe.errors[0]}")

        encoded: dict[str, list[Body]] = {}
        for form in forms:
            began = time.perf_counter()
            encoded[form.name] = [
                form.encode(images[s : s + args.batch]) for s in range(0, len(images), args.batch)
            ]
            size = statistics.fmean(len(b.content) for b in encoded[form.name]) / 2**20
            print(
                f"{form.name:<9} bodies: {size:6.2f} MiB per request of {args.batch} "
                f"(encoded in {time.perf_counter() - began:.1f} s, before the clock)"
            )
        print(
            f"{MODEL_TYPE} at {IMAGE_SIZE} px, random weights; {len(images):,} images per form "
            f"in {len(sizes)} requests of {args.batch}, concurrency {args.concurrency}; "
            f"{threads} CPU threads; torch {torch.__version__}"
        )
        for form in forms:  # warm-up: every route and the allocator, at full size
            drive(urls[form.name], form, encoded[form.name][:3], sizes[:3], 1)
        served: dict[str, list[Run]] = {}
        bare: list[tuple[list[float], list[np.ndarray]]] = []
        order = random.Random(0)
        jobs = ["bare", *(f.name for f in forms)]
        for _ in range(args.rounds):
            order.shuffle(jobs)
            for job in jobs:
                if job == "bare":
                    worker.send("run")
                    bare.append(worker.recv())
                    continue
                form = next(f for f in forms if f.name == job)
                run = drive(urls[job], form, encoded[job], sizes, args.concurrency)
                served.setdefault(job, []).append(run)
        load_end = os.getloadavg()
    report(served, bare, args.batch, len(images), load_end)


def difference(answers: list[np.ndarray], reference: np.ndarray) -> float:
    """The largest difference of the answered probabilities from ``reference`` (NaN: none)."""
    got = [a for a in answers if a.size]
    if len(got) != len(answers):
        return float("nan")
    return float(np.abs(np.concatenate(got) - reference).max())


def report(
    served: dict[str, list[Run]],
    bare: list[tuple[list[float], list[np.ndarray]]],
    batch: int,
    count: int,
    load_end: tuple[float, float, float],
) -> None:
    """Per form: the median over the rounds of each figure; errors summed over every round."""
    bare_ms = statistics.median(1000 * sum(s) / count for s, _ in bare)
    reference = np.concatenate(bare[-1][1])
    print(f"load average at the end: {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}")
    print(
        f"\n{'form':<10} {'ms/image':>9} {'p50':>7} {'e2e':>7} {'of bare':>8} "
        f"{'TF Serving':>11} {'errors':>12} {'max |diff|':>11}"
    )
    print(f"{'bare':<10} {bare_ms:>9.3f} {'':>7} {'':>7} {1:>8.2f} {TF_SERVING_MS:>11.2f}")
    failed = False
    for name, runs in served.items():
        mean = statistics.median(r.ms_per_image(batch) for r in runs if r.latencies)
        p50 = statistics.median(r.p50_ms_per_image(batch) for r in runs if r.latencies)
        e2e = statistics.median(1000 * r.seconds / count for r in runs)
        errors = sum(len(r.errors) * batch for r in runs)
        total = count * len(runs)
        diff = difference(runs[-1].answers, reference)
        print(
            f"{name:<10} {mean:>9.3f} {p50:>7.3f} {e2e:>7.3f} {bare_ms / mean:>8.2f} "
            f"{TF_SERVING_MS:>11.2f} {f'{errors}/{total:,}':>12} {diff:>11.1e}"
        )
        for run in runs:
            for error in run.errors[:3]:
                print(f"  {name}: {error}")
        failed |= errors > 0 or not diff <= 1e-4
    print(
        "\nms/image: the mean request latency / images per request; p50: the median's; e2e: "
        "the pass's wall time / images; of bare: the bare forward pass's ms/image / the form's "
        f"(1.0 = no serving cost); TF Serving: the earlier system's {TF_SERVING_MS} ms per image; "
        "max |diff|: the answers' largest difference from the bare forward pass's probabilities."
    )
    best = min(
        statistics.median(r.ms_per_image(batch) for r in runs if r.latencies)
        for name, runs in served.items()
        if name != "float"
    )
    verdict = "meets" if best <= TF_SERVING_MS else "MISSES"
    print(f"fastest standard wire format: {best:.3f} ms per image ({verdict} <= {TF_SERVING_MS})")
    if failed:
        raise SystemExit("some requests failed or answered differently from the bare forward pass")
    print(f"errors: 0 of {count * max(len(r) for r in served.values()):,} images per form")


if __name__ == "__main__":
    main()

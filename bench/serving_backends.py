"""Backends: PyTorch against ONNX Runtime (float32 and int8), bare and served.

Two models, random weights, each written as the logged model is (weights, config, the ONNX
export, a test sample of synthetic tires) into a model folder that ``tirelib serve`` serves:

- ``cnn`` at 32 px (the earlier system's CIFAR-sized workload), batches of 100 images;
- ``resnet18`` at 224 px, batches of 8 images.

For each model and each backend (``torch``; ``onnxruntime``, which is what ``--backend auto``
picks when the export matches; ``onnxruntime`` with ``--quantize int8``):

bare    the forward pass alone, in this process, on batches already preprocessed: the network
        exactly as the server prepares it (``ServedModel.build``: torch's rewrite for inference,
        or the checked ONNX Runtime session), in an inference thread as the server runs it;
served  ``tirelib serve --backend ...`` in a process of its own, sent the same images as the
        Open Inference Protocol's binary tensors (``tritonclient``'s default: no JSON numbers),
        one request of a batch at a time, every body encoded before the clock starts.

Reported: milliseconds per image (median over rounds), images per second, and each figure as a
ratio to PyTorch's bare forward pass measured in the same run (above 1: faster), the answers'
largest difference from PyTorch's, and int8's accuracy change on the test sample (random weights:
the change only shows that int8 moves answers; a trained model's is what the server checks).
Every measurement runs once per round, in shuffled order, so load from elsewhere on the machine
falls on all alike.

Run:  .venv/bin/python bench/serving_backends.py [--rounds 3] [--cnn-images 2000]
                                                 [--resnet-images 64] [--quick]
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import mlflow
import numpy as np
import onnxruntime
import torch
from serving import HOST, processor, server
from serving_cifar import FORMS, drive, labelled_tires, logged_sample

from tirelib import runtime, tracking
from tirelib.models import get_model, get_spec
from tirelib.preprocessing import Preprocessing
from tirelib.pyfunc import TireClassifier, write_model_files
from tirelib.serve.model import ServedModel
from tirelib.stack import free_port

CLASSES = ["good", "defective"]
FORM = next(f for f in FORMS if f.name == "v2-binary")


@dataclass(frozen=True)
class Case:
    model_type: str
    size: int
    batch: int


@dataclass(frozen=True)
class Backend:
    name: str
    args: tuple[str, ...]
    backend: runtime.Backend
    quantize: runtime.Quantize = "none"


BACKENDS = (
    Backend("torch", ("--backend", "torch"), "torch"),
    Backend("onnxruntime", ("--backend", "onnxruntime"), "onnxruntime"),
    # Random weights: any accuracy change is allowed, so int8 is measured whatever it does.
    Backend(
        "onnxruntime int8",
        ("--backend", "onnxruntime", "--quantize", "int8", "--max-accuracy-drop", "1"),
        "onnxruntime",
        "int8",
    ),
)


def save_model(case: Case, folder: Path) -> TireClassifier:
    """The model folder ``tirelib serve --model-uri`` serves; returns the classifier loaded
    back from it (the export and the sample included)."""
    torch.manual_seed(0)
    network = get_model(case.model_type, num_classes=len(CLASSES)).eval()
    spec = get_spec(case.model_type)
    prep = Preprocessing(case.size, spec.mean, spec.std)
    sample = logged_sample(case.size)
    artifacts = write_model_files(
        folder.parent / f"{folder.name}-files",
        network,
        model_type=case.model_type,
        classes=CLASSES,
        prep=prep,
        sample=sample,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # no input example: none is needed
        mlflow.pyfunc.save_model(
            path=str(folder),
            python_model=TireClassifier(),
            artifacts=artifacts,
            signature=tracking.signature(CLASSES),
            pip_requirements=[],
        )
    loaded = mlflow.pyfunc.load_model(str(folder)).unwrap_python_model()
    assert isinstance(loaded, TireClassifier)
    return loaded


# --------------------------------------------------------------------------- measuring


def bare_pass(
    model: ServedModel, batches: list[torch.Tensor], inference: ThreadPoolExecutor
) -> tuple[float, np.ndarray]:
    """Seconds for every batch's forward pass, and the probabilities."""
    answers, seconds = [], 0.0
    for tensor in batches:
        began = time.perf_counter()
        answers.append(inference.submit(model.predict_proba, tensor).result())
        seconds += time.perf_counter() - began
    return seconds, np.concatenate(answers)


@contextmanager
def servers(case: Case, folder: Path, state: Path) -> Iterator[dict[str, str]]:
    """One ``tirelib serve`` per backend, all up for the whole case; their infer URLs."""
    env = {**os.environ}
    env.pop("TIRE_SERVE_MODEL_URI", None)
    with ExitStack() as stack:
        urls = {}
        for backend in BACKENDS:
            port = free_port()
            argv = [sys.executable, "-m", "tirelib", "serve", "--port", str(port),
                    "--model-uri", str(folder), "--max-batch-size", str(case.batch),
                    *backend.args]  # fmt: skip
            base = f"http://{HOST}:{port}"
            name = f"serve-{case.model_type}-{backend.name.replace(' ', '-')}"
            stack.enter_context(server(name, argv, f"{base}/readyz", env, state))
            urls[backend.name] = base
        yield urls


@dataclass
class Figures:
    bare_ms: list[float]
    served_ms: list[float]
    served_rate: list[float]
    bare_answers: np.ndarray | None = None
    served_answers: np.ndarray | None = None
    reason: str = ""


def run_case(case: Case, count: int, rounds: int, root: Path) -> dict[str, Figures]:
    folder = root / f"model-{case.model_type}"
    classifier = save_model(case, folder)
    images, _ = labelled_tires(count, case.size, seed=3)
    prep = classifier.prep
    batches = [
        prep.finish(torch.from_numpy(images[s : s + case.batch]).permute(0, 3, 1, 2).float() / 255)
        for s in range(0, count, case.batch)
    ]
    sizes = [len(b) for b in batches]
    bodies = [FORM.encode(images[s : s + case.batch]) for s in range(0, count, case.batch)]
    threads = torch.get_num_threads()
    models = {
        b.name: ServedModel.build(
            classifier,
            version="1",
            uri=str(folder),
            backend=b.backend,
            quantize=b.quantize,
            max_accuracy_drop=1.0,
            threads=threads,
        )
        for b in BACKENDS
    }
    figures = {b.name: Figures([], [], []) for b in BACKENDS}
    with (
        servers(case, folder, root / "state") as urls,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference") as inference,
    ):
        for backend in BACKENDS:  # warm-up: every server and session at full size
            drive(f"{urls[backend.name]}/v2/models/tire/infer", FORM, bodies[:2], sizes[:2], 1)
            bare_pass(models[backend.name], batches[:2], inference)
            tire = httpx.get(f"{urls[backend.name]}/v1/models/tire/metadata").json()
            tire = tire["metadata"]["tire"]
            if (tire["backend"], tire["quantization"]) != (backend.backend, backend.quantize):
                raise SystemExit(f"{backend.name}: the server runs {tire}")
            figures[backend.name].reason = tire["backend_reason"]
        jobs = [(b.name, kind) for b in BACKENDS for kind in ("bare", "served")]
        order = random.Random(0)
        for _ in range(rounds):
            order.shuffle(jobs)
            for name, kind in jobs:
                got = figures[name]
                if kind == "bare":
                    seconds, got.bare_answers = bare_pass(models[name], batches, inference)
                    got.bare_ms.append(1000 * seconds / count)
                    continue
                run = drive(f"{urls[name]}/v2/models/tire/infer", FORM, bodies, sizes, 1)
                if run.errors:
                    raise SystemExit(f"{name} served: {run.errors[0]}")
                got.served_ms.append(1000 * statistics.fmean(run.latencies) / case.batch)
                got.served_rate.append(count / run.seconds)
                got.served_answers = np.concatenate(run.answers)
    return figures


def report(case: Case, count: int, figures: dict[str, Figures]) -> bool:
    """Print the case's table; return whether ONNX Runtime's bare pass beat PyTorch's."""
    torch_ms = statistics.median(figures["torch"].bare_ms)
    reference = figures["torch"].bare_answers
    assert reference is not None
    print(
        f"\n{case.model_type} at {case.size} px: {count} images in batches of {case.batch} "
        f"(ratios: PyTorch's bare ms per image / the row's; above 1 is faster)"
    )
    print(
        f"{'backend':<17} {'bare ms/img':>11} {'x torch':>8} {'served ms/img':>14} "
        f"{'img/s':>8} {'x torch bare':>13} {'max |diff|':>11}"
    )
    for name, got in figures.items():
        bare = statistics.median(got.bare_ms)
        served = statistics.median(got.served_ms)
        rate = statistics.median(got.served_rate)
        diff = max(
            float(np.abs(answers - reference).max())
            for answers in (got.bare_answers, got.served_answers)
            if answers is not None
        )
        print(
            f"{name:<17} {bare:>11.3f} {torch_ms / bare:>8.2f} {served:>14.3f} {rate:>8.0f} "
            f"{torch_ms / served:>13.2f} {diff:>11.1e}"
        )
    print("max |diff|: the largest difference of a probability from PyTorch's bare answers")
    for name, got in figures.items():
        print(f"  {name}: {got.reason}")
    return statistics.median(figures["onnxruntime"].bare_ms) < torch_ms


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3, help="passes over every measurement")
    parser.add_argument("--cnn-images", type=int, default=2000, help="cnn images per pass")
    parser.add_argument("--resnet-images", type=int, default=64, help="resnet18 images per pass")
    parser.add_argument("--quick", action="store_true", help="a smoke test: few images, 1 round")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.cnn_images, args.resnet_images = 1, 300, 16
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    warnings.simplefilter("ignore", UserWarning)  # MLflow's notes on type hints and pickling
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    load = os.getloadavg()
    print(f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} ({threads} CPUs)")
    print(f"processor: {processor()}")
    print(
        f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, {threads} threads; "
        f"served: Open Inference Protocol binary tensors, one request at a time; "
        f"{args.rounds} rounds, medians"
    )
    cases = [
        (Case("cnn", 32, 100), args.cnn_images),
        (Case("resnet18", 224, 8), args.resnet_images),
    ]
    faster = {}
    with tempfile.TemporaryDirectory(prefix="tire-bench-backends-") as tmp:
        for case, count in cases:
            figures = run_case(case, count, args.rounds, Path(tmp))
            faster[case.model_type] = report(case, count, figures)
    load = os.getloadavg()
    print(f"\nload average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    verdict = "holds" if all(faster.values()) else "DOES NOT HOLD"
    print(
        f"auto's rule (onnxruntime on the CPU where outputs match) {verdict}: onnxruntime's bare "
        f"forward pass is faster for "
        f"{', '.join(m for m, f in faster.items() if f) or 'neither model'}"
    )


if __name__ == "__main__":
    main()

"""The model server: TensorFlow Serving's REST API and the Open Inference Protocol over FastAPI.

``tirelib serve`` runs :func:`create_app` under uvicorn. Layout: :mod:`.config` (settings),
:mod:`.model` (load, warm up, swap, watch the alias), :mod:`.batching` (dynamic batching),
:mod:`.inputs` (request payloads to tensors), :mod:`.schemas` (bodies), :mod:`.limits` (what
is refused before any work: nesting depth, header caps, excerpts in errors), :mod:`.protocol`
(uvicorn's h11 with a deadline on request heads), :mod:`.metrics` (Prometheus), :mod:`.routes`
(one module per protocol, and feedback), :mod:`.request_id` (``X-Request-ID`` on every answer),
:mod:`.feedback` (recent predictions, for their true labels), :mod:`.sink` (feedback and sampled
images written to S3 in the background), :mod:`.client` (a REST client and the evaluation of a
served model).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tirelib.serve.config import ServeConfig, load_serve_config

if TYPE_CHECKING:
    from tirelib.serve.app import create_app

__all__ = ["ServeConfig", "create_app", "load_serve_config"]


def __getattr__(name: str) -> Any:
    """``create_app`` is imported on first use: the command line reads the server's settings
    (its options' help) without loading torch, FastAPI and the rest of the app."""
    if name == "create_app":
        from tirelib.serve.app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

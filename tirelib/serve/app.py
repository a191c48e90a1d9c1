"""The app factory: ``create_app(config, settings)`` gives the FastAPI app of the model server.

The model is loaded in the lifespan (startup waits for the first load, bounded by
``startup_timeout_s``; without a model the server answers ``/readyz`` with 503 and keeps trying),
the alias is watched from a background thread, and inference runs in a dynamic batcher's worker
thread. Every error is ``{"error": "..."}``: 400 for a bad request, 404 for an unknown version,
413 for a body too large or images over their pixel budget, 503 while no model is loaded or while
too many images wait to be decoded; the feedback route adds 404 for a request id it does not
remember and 409 for feedback given twice. Every answer carries ``X-Request-ID``. With S3 settings,
a sink started here writes feedback and sampled captures, and the shutdown writes what it holds.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import torch
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import tirelib
from tirelib.errors import DataError, ImageTooLargeError
from tirelib.logs import install_redaction
from tirelib.serve.batching import DynamicBatcher
from tirelib.serve.config import ServeConfig, load_serve_config
from tirelib.serve.decoding import DecodeGate, DecodePool, PixelLimits
from tirelib.serve.deps import ServeState, json_response
from tirelib.serve.feedback import FeedbackStore
from tirelib.serve.inputs import Limits
from tirelib.serve.limits import HeaderLimitMiddleware, clip, shorten
from tirelib.serve.metrics import HttpMetricsMiddleware, ServeMetrics
from tirelib.serve.model import (
    ModelHolder,
    ModelSource,
    RegistrySource,
    notify_slack,
    resolve_device,
)
from tirelib.serve.request_id import RequestIdMiddleware
from tirelib.serve.routes import feedback, health, tfserving, v2
from tirelib.serve.sink import start_sink
from tirelib.settings import Settings, get_settings, secret_values
from tirelib.urls import add_secrets, mask_credentials

log = logging.getLogger(__name__)

DESCRIPTION = """\
Tire-defect classifier behind TensorFlow Serving's REST API (`/v1`) and the Open Inference
Protocol (`/v2`). Images are HWC floats in [0, 1] of any size, or `{"b64": ...}` encoded bytes;
the model resizes and normalises them itself. Errors are `{"error": "..."}`.
"""


# --------------------------------------------------------------------------- body size limit


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than {limit} bytes, the most accepted")


class BodyLimitMiddleware:
    """Refuses bodies over ``max_bytes``: by Content-Length before reading, else while reading."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for key, value in scope["headers"]:
            if key == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > self.max_bytes:
                    error = BodyTooLarge(self.max_bytes)
                    response = json_response({"error": error.detail}, error.status_code)
                    response.headers["Connection"] = "close"
                    await response(scope, receive, send)
                    return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # An HTTPException, so FastAPI's body parsing passes it on unchanged.
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited, send)


# --------------------------------------------------------------------------- errors


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    # Masked before shortened: a cut URL would hide its password from the mask.
    response = json_response({"error": shorten(mask_credentials(message))}, status)
    if headers:
        response.headers.update(headers)
    return response


async def _data_error(request: Request, error: Exception) -> Response:
    return _error(400, str(error))


async def _too_large(request: Request, error: Exception) -> Response:
    return _error(413, str(error))


async def _validation_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, RequestValidationError)
    problems = []
    for item in error.errors():
        where = ".".join(clip(str(part), 40) for part in item.get("loc", ())) or "request"
        problems.append(f"{where}: {item.get('msg', 'invalid')}")
    return _error(400, "; ".join(problems[:5]) or "invalid request")


async def _http_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, HTTPException)
    message = str(error.detail)
    if error.status_code == 404 and message == "Not Found":
        message = f"no such endpoint: {request.method} {clip(request.url.path)} (see /docs)"
    elif error.status_code == 405:
        message = f"method {request.method} is not allowed on {clip(request.url.path)}"
    return _error(error.status_code, message, dict(error.headers or {}))


async def _unexpected(request: Request, error: Exception) -> Response:
    log.error("%s %s failed", request.method, request.url.path, exc_info=error)
    return _error(500, f"internal error: {type(error).__name__}")


# --------------------------------------------------------------------------- the factory


def create_app(
    config: ServeConfig | None = None,
    settings: Settings | None = None,
    *,
    source: ModelSource | None = None,
) -> FastAPI:
    """The model server. ``source`` replaces the MLflow registry (tests, a model in memory)."""
    config = config or load_serve_config()
    metrics = ServeMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        resolved = settings or get_settings()
        install_redaction()  # no log line of the server shows a credential
        add_secrets(*secret_values(resolved))
        torch.set_num_threads(config.resolved_threads())
        model_source = source or RegistrySource(
            config.resolved_model_uri(resolved), tracking_uri=resolved.mlflow_tracking_uri
        )
        webhook = resolved.slack_webhook_url
        holder = ModelHolder(
            model_source,
            name=config.name,
            device=resolve_device(config.device),
            optimize=config.optimize,
            backend=config.backend,
            quantize=config.quantize,
            max_accuracy_drop=config.max_accuracy_drop,
            threads=config.resolved_threads(),
            poll_interval_s=config.poll_interval_s,
            metrics=metrics,
            notify=functools.partial(notify_slack, webhook.get_secret_value() if webhook else None),
        )
        batcher = DynamicBatcher(
            _run_batch,
            max_batch_size=config.max_batch_size,
            max_wait_s=config.max_wait_ms / 1000,
            on_batch=metrics.observe_batch,
        )
        await batcher.start()
        holder.start()
        sink = start_sink(config, resolved, metrics)
        decoders = DecodePool(config.resolved_threads())
        log.info(
            "serving %s as '%s' (%s, %d threads, batches of up to %d, wait %g ms)",
            model_source.uri, config.name, holder.device, torch.get_num_threads(),
            config.max_batch_size, config.max_wait_ms,
        )  # fmt: skip
        if not await asyncio.to_thread(holder.wait_first_attempt, config.startup_timeout_s):
            log.warning("no model loaded yet; /readyz answers 503 until one is")
        app.state.serve = ServeState(
            config=config,
            holder=holder,
            batcher=batcher,
            metrics=metrics,
            limits=Limits(config.max_instances, config.max_image_side),
            pixels=PixelLimits.from_config(config),
            gate=DecodeGate(config.decode_budget_images, config.decode_queue_images),
            feedback=FeedbackStore(config.feedback_window_requests, config.feedback_ttl_seconds),
            sink=sink,
            decoders=decoders,
        )
        try:
            yield
        finally:
            holder.stop()
            await batcher.stop()
            decoders.close()
            if sink is not None:  # what the answered requests left to write is written now
                await asyncio.to_thread(sink.close)

    app = FastAPI(
        title="tirelib model server",
        version=tirelib.__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.include_router(health.router)
    app.include_router(tfserving.router)
    app.include_router(v2.router)
    app.include_router(feedback.router)
    app.add_exception_handler(DataError, _data_error)
    app.add_exception_handler(ImageTooLargeError, _too_large)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_body_bytes)
    app.add_middleware(
        HeaderLimitMiddleware,
        max_headers=config.max_headers,
        max_header_bytes=config.max_header_bytes,
    )
    app.add_middleware(RequestIdMiddleware)  # every answer carries X-Request-ID, 4xx included
    app.add_middleware(HttpMetricsMiddleware, metrics=metrics)  # outermost: counts the 413s too
    return app


def _run_batch(model: Any, images: torch.Tensor) -> Any:
    return model.predict_proba(images)

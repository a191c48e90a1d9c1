"""What the routes share: the server's state, choosing the model for a request, running it.

HTTP errors are raised here and in the routes only; the library below raises
:class:`~tirelib.errors.DataError`, which the app answers with a 400.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import msgspec
import numpy as np
import torch
from fastapi import Depends, HTTPException, Request, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.convertors import CONVERTOR_TYPES, Convertor, register_url_convertor

from tirelib.drift import image_statistics
from tirelib.errors import DataError
from tirelib.preprocessing import Preprocessing
from tirelib.serve.batching import DynamicBatcher
from tirelib.serve.config import ServeConfig
from tirelib.serve.decoding import (
    Admitted,
    DecodeGate,
    DecodePool,
    DecodeQueueFull,
    PixelLimits,
    admit,
)
from tirelib.serve.fastjson import PredictImages, read_predict_images
from tirelib.serve.feedback import FeedbackStore, Prediction
from tirelib.serve.inputs import Limits, Located, RawImage, from_columnar, from_instances
from tirelib.serve.limits import clip, excerpt
from tirelib.serve.metrics import ServeMetrics
from tirelib.serve.model import ModelHolder, ServedModel
from tirelib.serve.schemas import ErrorBody, PredictRequest, parse_body
from tirelib.serve.sink import Sink, capture_object_key, image_extension, utc_day

SIGNATURE = "serving_default"
BodyT = TypeVar("BodyT", bound=BaseModel)

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "The request is malformed; the error says how."},
    404: {"model": ErrorBody, "description": "No such model version or label."},
    413: {
        "model": ErrorBody,
        "description": "The body, an image or the request's images are over their budget.",
    },
    503: {
        "model": ErrorBody,
        "description": "No model is loaded yet, or too many images wait to be decoded.",
    },
}


class SegmentConvertor(Convertor[str]):
    """A path segment without ``:``, so ``versions/3:predict`` is never read as version
    ``3:predict`` of a GET route (TF Serving's URLs put the verb after a colon)."""

    regex = "[^/:]+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


def register_convertors() -> None:
    """Make ``{name:segment}`` usable in route paths (before the routes are built)."""
    if "segment" not in CONVERTOR_TYPES:
        register_url_convertor("segment", SegmentConvertor())


@dataclass
class ServeState:
    """Everything a request needs, made in the app's lifespan."""

    config: ServeConfig
    holder: ModelHolder
    batcher: DynamicBatcher
    metrics: ServeMetrics
    limits: Limits
    pixels: PixelLimits
    gate: DecodeGate
    feedback: FeedbackStore
    sink: Sink | None = None  # None: feedback and captures are not written to S3
    decoders: DecodePool | None = None  # None: a request's images decode in its own thread


def request_body(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` documenting a JSON body that the route reads itself.

    The app's OpenAPI hook puts the model's schema into ``components``.
    """
    schema = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def get_state(request: Request) -> ServeState:
    state: ServeState = request.app.state.serve
    return state


StateDep = Annotated[ServeState, Depends(get_state)]


def json_response(content: Any, status_code: int = 200) -> Response:
    """JSON encoded by msgspec (fast for long float lists)."""
    return Response(msgspec.json.encode(content), status_code, media_type="application/json")


def not_ready(state: ServeState) -> HTTPException:
    failed = [s for s in state.holder.status() if s.state == "UNAVAILABLE"]
    why = state.holder.problem or (
        f"version {failed[0].version} failed to load: {failed[0].error_message}"
        if failed
        else "the first version is still loading"
    )
    return HTTPException(503, f"model '{state.config.name}' is not loaded yet: {why}")


def select_model(
    state: ServeState, *, version: str | None = None, label: str | None = None
) -> ServedModel:
    """The model for this request: read once, so a swap cannot change it mid-request."""
    model = state.holder.current
    if model is None:
        raise not_ready(state)
    name = state.config.name
    if version is not None and version != model.version:
        raise HTTPException(
            404,
            f"Servable not found for request: Specific({name}, {clip(version)}); "
            f"this server serves version {model.version}",
        )
    if label is not None and label != state.holder.source.alias:
        known = state.holder.source.alias
        raise HTTPException(
            404,
            f"Servable not found for request: Label({name}, {clip(label)}); "
            + (f"the only label is '{known}'" if known else "this server has no version labels"),
        )
    return model


def check_signature(signature_name: str | None) -> None:
    if signature_name not in (None, "", SIGNATURE):
        raise DataError(
            f"unknown signature_name {excerpt(signature_name)}; this model has only {SIGNATURE!r}"
        )


async def read_body(request: Request, model: type[BodyT]) -> BodyT:
    """The JSON body as ``model``, whatever the Content-Type says (TF Serving does the same)."""
    raw = await request.body()
    return await run_in_threadpool(parse_body, raw, model)


def parse_predict_body(raw: bytes, limits: Limits) -> PredictImages:
    """A predict body's images: the common bodies straight into arrays
    (:mod:`tirelib.serve.fastjson`), any other through :class:`PredictRequest`, which also
    says what is wrong with a bad one."""
    fast = read_predict_images(raw, limits)
    if fast is not None:
        return fast
    body = parse_body(raw, PredictRequest)
    check_signature(body.signature_name)
    if body.instances is not None:
        return PredictImages(row=True, images=from_instances(body.instances, limits))
    return PredictImages(row=False, images=from_columnar(body.inputs, limits))


async def read_predict_body(request: Request, limits: Limits) -> PredictImages:
    """The images of a TF Serving predict body (row or columnar form), off the event loop."""
    raw = await request.body()
    return await run_in_threadpool(parse_predict_body, raw, limits)


@dataclass(frozen=True)
class Prepared:
    """A request's images, preprocessed, with each one's brightness and contrast; when the
    request is captured, also the images as sent with their file extension."""

    images: torch.Tensor
    brightness: list[float]
    contrast: list[float]
    captured: list[tuple[RawImage, str]] | None = None


def input_statistics(prep: Preprocessing, images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Brightness and contrast (:func:`tirelib.drift.image_statistics`) of a preprocessed batch.

    The statistics are those of the resized pixels in [0, 1], before normalisation: the
    normalisation is undone (one fused multiply-add over the batch), so the numbers are the
    baseline's, computed on the same resized images at training.
    """
    mean = torch.tensor(prep.mean, dtype=images.dtype).view(1, -1, 1, 1)
    std = torch.tensor(prep.std, dtype=images.dtype).view(1, -1, 1, 1)
    pixels = torch.addcmul(mean, images, std)
    brightness, contrast = image_statistics(pixels.numpy())
    return brightness.tolist(), contrast.tolist()


def _as_sent(found: list[Located], admitted: Admitted) -> list[tuple[RawImage, str]]:
    """Each image as the client sent it, with the extension to store it under."""
    return [
        (image, "png" if item.format is None else image_extension(item.format))
        for (_, image), item in zip(found, admitted.items, strict=True)
    ]


async def prepare_images(
    state: ServeState, model: ServedModel, find: Callable[..., list[Located]], *args: Any
) -> Prepared:
    """``find(*args)`` (the images of a request) preprocessed by ``model``, off the event loop.

    The images are checked against the pixel budget from their headers first, then decoded
    when the decode gate has room (see :mod:`tirelib.serve.decoding`). Call it inside
    ``state.batcher.arriving()``, with :func:`predict_images` right after the block. At
    ``capture_rate`` (with a sink), the request is sampled for capture: its images as sent are
    kept for :func:`predict_images` to hand to the sink.
    """
    budget = state.pixels.budget(model.prep.image_size)
    rate = state.config.capture_rate
    capture = state.sink is not None and rate > 0 and random.random() < rate  # noqa: S311
    found: list[Located] = []

    def inspect() -> Admitted:
        found.extend(find(*args))
        return admit(model.prep, found, budget, state.limits)

    def decode() -> Prepared:
        images = admitted.decode(state.decoders)
        brightness, contrast = input_statistics(model.prep, images)
        captured = _as_sent(found, admitted) if capture else None
        return Prepared(images, brightness, contrast, captured)

    admitted = await run_in_threadpool(inspect)
    try:
        async with state.gate.hold(admitted.pixels / budget.image):
            return await run_in_threadpool(decode)
    except DecodeQueueFull as error:
        raise HTTPException(503, str(error), headers={"Retry-After": "1"}) from error
    finally:
        admitted.close()


async def predict_images(
    state: ServeState, model: ServedModel, prepared: Prepared, request_id: str
) -> np.ndarray:
    """Class probabilities from a dynamic batch. The predictions and input statistics are
    counted, the answer is remembered for the feedback route, a captured request's images go
    to the sink (never waited for)."""
    probabilities = await state.batcher.submit(model, prepared.images)
    state.metrics.observe_predictions(model.classes, probabilities)
    state.metrics.observe_inputs(prepared.brightness, prepared.contrast)
    keys: list[str] | None = None
    if prepared.captured is not None and state.sink is not None:
        day = utc_day()
        objects = [
            (capture_object_key(day, request_id, index, ext), image)
            for index, (image, ext) in enumerate(prepared.captured)
        ]
        if state.sink.capture(objects):
            keys = [key for key, _ in objects]
    winners = probabilities.argmax(axis=1).tolist()
    state.feedback.remember(request_id, Prediction.of(model.version, model.classes, winners, keys))
    return probabilities

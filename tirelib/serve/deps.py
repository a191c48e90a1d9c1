"""What the routes share: the server's state, the model a request's path names, the pipeline
that answers an inference request, and the OpenAPI pieces that document them.

The routes are module-level routers (:mod:`tirelib.serve.routes`) whose paths carry the model's
name, ``/v1/models/{model_name}:predict``; the dependencies here resolve it: :data:`ServedName`
checks the name, :data:`LatestModel`, :data:`ModelVersion` and :data:`ModelLabel` give the
model the path selects (a 404 in the API's own words for a name, version or label this server
does not serve; a 503 while no model is loaded). :class:`Inference` is the pipeline of every
inference route: read the body, find its images, decode and preprocess them, predict them in a
dynamic batch.

HTTP errors are raised here and in the routes only; the library below raises
:class:`~tirelib.errors.DataError`, which the app answers with a 400.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Protocol, TypeVar

import numpy as np
import torch
from fastapi import Depends, HTTPException, Path, Request
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.convertors import CONVERTOR_TYPES, Convertor, register_url_convertor

from tirelib.drift import normalised_image_statistics
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
from tirelib.serve.feedback import FeedbackStore, Prediction
from tirelib.serve.inputs import Limits, Located, RawImage
from tirelib.serve.limits import clip
from tirelib.serve.metrics import ServeMetrics
from tirelib.serve.model import ModelHolder, ServedModel
from tirelib.serve.request_id import RequestIdDep
from tirelib.serve.schemas import ErrorBody, json_response, parse_body
from tirelib.serve.sink import Sink, capture_object_key, image_extension, utc_day

__all__ = ["json_response"]  # the routes' JSON answers; defined with the schemas

BodyT = TypeVar("BodyT", bound=BaseModel)

# --------------------------------------------------------------------------- OpenAPI

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "The request is malformed; the error says how."},
    404: {"model": ErrorBody, "description": "No such model, version or label."},
    413: {
        "model": ErrorBody,
        "description": "The body, an image or the request's images are over their budget.",
    },
    503: {
        "model": ErrorBody,
        "description": "No model is loaded yet, or too many images wait to be decoded.",
    },
    # Declaring the 4XX range also keeps FastAPI from documenting a 422 for the routes with
    # parameters: this server answers bad input with a 400, never a 422.
    "4XX": {"model": ErrorBody, "description": "Any other client error, in the same shape."},
}
"""The error answers every model route documents (``responses=`` of the routers)."""


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """``model``'s JSON schema with its nested models written out in place (``$defs`` refs
    would point nowhere inside an OpenAPI document)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                rest = {k: v for k, v in node.items() if k != "$ref"}
                return inline({**defs[ref.removeprefix("#/$defs/")], **rest})
            return {key: inline(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(item) for item in node]
        return node

    result: dict[str, Any] = inline(schema)
    return result


def request_body(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` documenting a JSON body that the route reads itself, as FastAPI's docs
    do for a body read from the request: any Content-Type is read as JSON (TF Serving does the
    same), through the fast decoder where the body is an image batch."""
    content = {"application/json": {"schema": inline_schema(model)}}
    return {"requestBody": {"required": True, "content": content}}


# --------------------------------------------------------------------------- the server's state


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


def get_state(request: Request) -> ServeState:
    state: ServeState = request.app.state.serve
    return state


StateDep = Annotated[ServeState, Depends(get_state)]


def not_ready(state: ServeState) -> HTTPException:
    failed = [s for s in state.holder.status() if s.state == "UNAVAILABLE"]
    why = state.holder.problem or (
        f"version {failed[0].version} failed to load: {failed[0].error_message}"
        if failed
        else "the first version is still loading"
    )
    return HTTPException(503, f"model '{state.config.name}' is not loaded yet: {why}")


# --------------------------------------------------------------------------- the model of a path


class SegmentConvertor(Convertor[str]):
    """A path segment without ``:``, so ``tire:predict`` is never read as the model name
    ``tire:predict`` of a GET route, nor ``versions/3:predict`` as version ``3:predict``
    (TF Serving's URLs put the verb after a colon)."""

    regex = "[^/:]+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


# Starlette compiles a route's path when the route is made, at the import of its module; the
# convertor of ``{model_name:segment}`` must be known by then.
if "segment" not in CONVERTOR_TYPES:
    register_url_convertor("segment", SegmentConvertor())

ModelName = Annotated[
    str,
    Path(description="The name the server serves its model under (`--name`).", examples=["tire"]),
]
Version = Annotated[
    str, Path(description="A model version: the one being served, else a 404 naming it.")
]
Label = Annotated[str, Path(description="A version label: the registry alias the server follows.")]


def _is_v2(request: Request) -> bool:
    return request.url.path.startswith("/v2/")


def served_name(request: Request, state: StateDep, model_name: ModelName) -> str:
    """The path's model name when it is the served model's; a 404 in the API's own words (TF
    Serving's model status, Triton's) otherwise. Needs no loaded model."""
    if model_name != state.config.name:
        raise HTTPException(
            404,
            f"Request for unknown model: '{clip(model_name)}' is not found"
            if _is_v2(request)
            else f"Could not find any versions of model {clip(model_name)}",
        )
    return model_name


def served_model(
    request: Request,
    state: ServeState,
    name: str,
    *,
    version: str | None = None,
    label: str | None = None,
) -> ServedModel:
    """The model a request names (the latest, or by ``version`` or ``label``), read once so that
    a swap cannot change it mid-request; a 404 in TF Serving's words (Triton's on ``/v2``) for
    a name, version or label not served, a 503 while no model is loaded."""
    wanted = (
        f"Specific({clip(name)}, {clip(version)})"
        if version is not None
        else f"Label({clip(name)}, {clip(label)})"
        if label is not None
        else f"Latest({clip(name)})"
    )
    if name != state.config.name:
        raise HTTPException(
            404,
            f"Request for unknown model: '{clip(name)}' is not found"
            if _is_v2(request)
            else f"Servable not found for request: {wanted}",
        )
    model = state.holder.current
    if model is None:
        raise not_ready(state)
    if version is not None and version != model.version:
        raise HTTPException(
            404,
            f"Servable not found for request: {wanted}; this server serves version {model.version}",
        )
    alias = state.holder.source.alias
    if label is not None and label != alias:
        raise HTTPException(
            404,
            f"Servable not found for request: {wanted}; "
            + (f"the only label is '{alias}'" if alias else "this server has no version labels"),
        )
    return model


def latest_model(request: Request, state: StateDep, model_name: ModelName) -> ServedModel:
    return served_model(request, state, model_name)


def model_version(
    request: Request, state: StateDep, model_name: ModelName, version: Version
) -> ServedModel:
    return served_model(request, state, model_name, version=version)


def model_label(
    request: Request, state: StateDep, model_name: ModelName, label: Label
) -> ServedModel:
    return served_model(request, state, model_name, label=label)


ServedName = Annotated[str, Depends(served_name)]
"""``{model_name}``, checked: routes that need no loaded model (status, feedback)."""
LatestModel = Annotated[ServedModel, Depends(latest_model)]
"""The model of ``/models/{model_name}…``: the version being served."""
ModelVersion = Annotated[ServedModel, Depends(model_version)]
"""The model of ``/models/{model_name}/versions/{version}…``."""
ModelLabel = Annotated[ServedModel, Depends(model_label)]
"""The model of ``/models/{model_name}/labels/{label}…``."""


# --------------------------------------------------------------------------- reading a body


async def read_body(request: Request, model: type[BodyT]) -> BodyT:
    """The JSON body as ``model``, whatever the Content-Type says (TF Serving does the same)."""
    raw = await request.body()
    return await run_in_threadpool(parse_body, raw, model)


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

    The statistics are those of the resized pixels in [0, 1], before normalisation (computed
    from the normalised batch, with no pass to undo it), so the numbers are the baseline's,
    computed on the same resized images at training.
    """
    brightness, contrast = normalised_image_statistics(images.numpy(), prep.mean, prep.std)
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


# --------------------------------------------------------------------------- the pipeline


class Found(Protocol):
    """A body as a route's reader found it: its images, and whatever else its answer needs."""

    @property
    def images(self) -> list[Located]: ...


FoundT = TypeVar("FoundT", bound=Found)


class Inference:
    """The pipeline every inference route shares, as a dependency (``InferenceDep``): the
    request, the server's state and the request's id, and :meth:`run`."""

    def __init__(self, request: Request, state: StateDep, request_id: RequestIdDep) -> None:
        self.request = request
        self.state = state
        self.request_id = request_id

    @property
    def limits(self) -> Limits:
        return self.state.limits

    async def run(
        self, model: ServedModel, read: Callable[[bytes], FoundT], body: bytes | None = None
    ) -> tuple[FoundT, np.ndarray]:
        """Read the request's body (unless given: a multipart body is in files already),
        ``read`` it into images, preprocess them and predict them in a dynamic batch.

        Returns what ``read`` found, and the class probabilities of its images. Reading,
        decoding and preprocessing run in worker threads (see :func:`prepare_images`).
        """
        found: list[FoundT] = []

        def images() -> list[Located]:
            found.append(read(raw))
            return found[0].images

        state = self.state
        with state.batcher.arriving():
            raw = await self.request.body() if body is None else body
            prepared = await prepare_images(state, model, images)
        return found[0], await predict_images(state, model, prepared, self.request_id)


InferenceDep = Annotated[Inference, Depends()]
